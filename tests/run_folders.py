"""Helpers for tests that read a training run's folder: a checkpoint's weights, and a copy of a finished run cut back
to what a run killed after some checkpoint would have left on disk."""

import shutil
from pathlib import Path

from safetensors.torch import load_file


def checkpoint_weights(folder: Path, step: int) -> dict:
    """The model weights of checkpoint `step` (it holds the prepared training method, whose model sits under
    "model.")."""
    tensors = load_file(str(Path(folder) / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))
    return {name.removeprefix("model."): value for name, value in tensors.items()}


def copy_as_killed_after(finished: Path, copy: Path, step: int) -> Path:
    """Copy the finished run `finished` to `copy` as if the run had been killed after step `step`'s checkpoint:
    later checkpoints and the finished files are gone (the log is left as it is)."""
    shutil.copytree(finished, copy)
    for folder in (copy / "checkpoints").iterdir():
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    for name in ("model.safetensors", "metrics.json"):
        (copy / name).unlink()
    return copy
