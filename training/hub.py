"""Publishing a trained tokenizer: refresh its model card and upload the folder to the Hugging Face Hub.

    url = push_to_hub("outputs/daps-mnist-5k", "my-org/daps-mnist")   # `daps push DIR --repo-id ORG/NAME`

What goes up: everything a user needs to load and judge the tokenizer (config.json, model.safetensors,
preprocessor_config.json, the modelling code files that `trust_remote_code=True` loads, README.md, metrics.json,
the PNGs, the training log); what stays: resumable checkpoints and caches (`IGNORE_PATTERNS`).
The Hub endpoint is huggingface_hub's (HF_ENDPOINT, read when huggingface_hub is first imported).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["push_to_hub", "IGNORE_PATTERNS", "check_tokenizer_folder"]

# Relative to the folder (fnmatch-style, as huggingface_hub's upload_folder reads them).
IGNORE_PATTERNS = [
    "checkpoints/*", "checkpoints/**",  # resumable training state: optimiser, RNG, many copies of the weights
    "runs/*", "runs/**", "wandb/*", "wandb/**",  # tracker logs (Accelerate log_with)
    "__pycache__/*", "**/__pycache__/*", "*.pyc",
    ".cache/*", ".cache/**",  # huggingface_hub's local-dir metadata
    "*.tmp", "*.lock",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def check_tokenizer_folder(folder: str | Path) -> Path:
    """`folder` as a Path if it is a saved tokenizer (config.json of model_type "daps", safetensors weights, the code
    files its `auto_map` names); otherwise FileNotFoundError / ValueError saying what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; expected a saved tokenizer folder "
                                "(written by `daps train` or `DapsModel.save_pretrained`).")
    missing = [name for name in ("config.json",) if not (folder / name).is_file()]
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        missing.append("model.safetensors")
    if missing:
        hint = (" It has a checkpoints/ folder: pass the tokenizer folder that `daps train` finished writing, "
                "not a training run that stopped early." if (folder / "checkpoints").is_dir() else "")
        raise FileNotFoundError(f"{folder} is not a saved tokenizer folder: missing {', '.join(missing)} "
                                f"(expected config.json and model.safetensors from `save_pretrained`).{hint}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or config.get("model_type") != "daps":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{folder / 'config.json'} is not a DAPS tokenizer configuration: expected model_type "
                         f"'daps', got {found!r}.")
    for auto_class, reference in (config.get("auto_map") or {}).items():
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        if not reference or "--" in str(reference):  # an entry pointing at another repo's code
            continue
        module = str(reference).rsplit(".", 1)[0]
        if not (folder / f"{module}.py").is_file():
            raise FileNotFoundError(f"{folder} lacks {module}.py, which config.json's auto_map names for {auto_class}; "
                                    "without it `trust_remote_code=True` loading fails. Save the model again with "
                                    "save_pretrained after `import tokenizer`.")
    return folder


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Write the model card (README.md) into `folder` and upload the folder to the model repo `repo_id`.

    Args:
        folder: a saved tokenizer folder (config.json and model.safetensors at least).
        repo_id: "namespace/name"; the repo is created when missing (an existing one keeps its visibility).
        private: create the repo private.
        revision: a branch to commit to, created from main when missing; default main.
        token: a Hub token; default the saved one (HF_TOKEN or `hf auth login`).
        commit_message: default "Upload DAPS tokenizer".

    Returns the URL of the commit. Raises FileNotFoundError / ValueError for a folder that is not a saved tokenizer
    and ValueError for a malformed repo id, before anything touches the network.
    """
    folder = check_tokenizer_folder(folder)
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise ValueError(f"repo_id must be 'namespace/name' (letters, digits, '-', '_', '.'), got {repo_id!r}.")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"revision must be a non-empty branch name or None, got {revision!r}.")

    from huggingface_hub import HfApi

    from hub_cards import write_model_card

    write_model_card(folder, repo_id=repo_id)

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None and revision != "main" and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload DAPS tokenizer",
        ignore_patterns=list(IGNORE_PATTERNS),
    )
    return str(info.commit_url)
