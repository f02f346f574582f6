"""The README's Python snippets run as written (so they cannot rot)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_blocks() -> list[str]:
    """Every ```python block of the README, in order (they share one namespace, like a reader's session)."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_usage_section_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = usage_blocks()
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["enc"].codes.shape == (2, 4)
