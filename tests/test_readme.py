"""The README's usage section runs as written (so it cannot rot)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Usage", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_usage_section_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = usage_blocks()
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["enc"].codes.shape == (2, 4)
