"""Atomic, resumable checkpoints without pickles.

A checkpoint is a folder `checkpoints/step-<N>` holding Accelerate's `save_state` (model as safetensors, optimiser
and RNG states, read back with `weights_only=True`) plus `trainer_state.json` and `trainer_tensors.safetensors` for
the loop's own state. It is written under a temporary name and renamed into place only once complete, so a
checkpoint on disk is never half-written; `latest_checkpoint` ignores anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
TENSOR_FILE = "trainer_tensors.safetensors"


def _split_tensors(value, prefix: str, tensors: dict):
    """Nested state → JSON-able structure, tensors moved into `tensors` under their path."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_split_tensors(k, f"{prefix}.k{i}", tensors), _split_tensors(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return {"__float__": repr(value)}
    return value


def _join_tensors(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in value["__dict__"]}
        if "__list__" in value:
            return [_join_tensors(v, tensors) for v in value["__list__"]]
        if "__float__" in value:
            return float(value["__float__"])
    return value


def write_json_atomic(path: Path, payload) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_trainer_state(folder: Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_tensors(state, "state", tensors)
    save_file(tensors, str(Path(folder) / TENSOR_FILE))
    write_json_atomic(Path(folder) / STATE_FILE, structure)


def load_trainer_state(folder: Path) -> dict:
    folder = Path(folder)
    try:
        tensors = load_file(str(folder / TENSOR_FILE))
        structure = json.loads((folder / STATE_FILE).read_text())
    except Exception as error:  # a damaged file must say so, not crash deeper
        raise ValueError(f"Checkpoint {folder} is corrupt or incomplete: {error}") from error
    return _join_tensors(structure, tensors)


def save_checkpoint(accelerator, folder: Path, step: int, trainer_state: dict, keep: int = 2) -> Path:
    """Write `folder/step-<step>` atomically and prune to the `keep` newest. Collective: call on every process."""
    folder = Path(folder)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        save_trainer_state(tmp, trainer_state)
        (tmp / COMPLETE_MARKER).write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the only moment the checkpoint appears: whole or not at all
        for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob("step-*") if (p / COMPLETE_MARKER).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1])) if complete else None
