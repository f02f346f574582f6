"""How trained tokenizers generalise: greedy reconstruction PSNR on training images against unseen ones, per source.

    python benchmarks/generalisation.py benchmarks/runs/cifar-amx-1800s-cosine/daps_cosine_lr/seed0 \
        benchmarks/runs/cifar-amx-1800s-cosine/fsq_cosine_lr/seed0 --output benchmarks/results/generalisation.md

For each folder, on the dataset it was trained on (`train_args.json`): greedy codes of `--train-images` training images
(a seeded random draw) and of every validation and test image, then PSNR per split and per source. A source is a
photograph for `photo-crops` (the splits are drawn by photograph, so validation and test photographs are never seen in
training) and a label otherwise. A tokenizer that reconstructs its training photographs far better than unseen ones has
learnt those photographs rather than images; the gap between methods at equal training says which generalises.
One thread; no augmentation at evaluation.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenizer import DapsModel  # noqa: E402
from training.data import PHOTO_NAMES, load_image_splits  # noqa: E402
from training.evaluation import psnr, to_unit_range  # noqa: E402
from training.trainer import to_model_input  # noqa: E402


def greedy_psnr(model: DapsModel, images: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-image PSNR (dB) of greedy reconstructions: (N, C, H, W) in [0, 1] → (N,)."""
    values = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            codes = model.encode(to_model_input(chunk, model.config)).codes
            reconstruction = to_unit_range(model.decode(codes).pixel_values, model.config.likelihood)
            values.append(psnr(reconstruction, chunk))
    return torch.cat(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="tokenizer folders written by `daps train`")
    parser.add_argument("--train-images", type=int, default=1024, help="training images drawn (default 1024)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--output", default=None, help="also write the markdown tables here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    lines = [f"`python benchmarks/generalisation.py {' '.join(sys.argv[1:])}` — {platform.machine()}, torch "
             f"{torch.__version__}, 1 thread; greedy codes; {args.train_images} training images drawn with seed 0, "
             "every validation and test image", ""]
    summary = ["| run | train PSNR (dB) | validation | test | train − test |", "|---|---|---|---|---|"]
    detail = ["| run | split | source | images | PSNR (dB) |", "|---|---|---|---|---|"]
    for folder in map(Path, args.folders):
        model = DapsModel.from_pretrained(folder).eval()
        run_args_path = folder / "train_args.json"
        dataset = json.loads(run_args_path.read_text())["dataset"] if run_args_path.exists() else "photo-crops"
        splits = load_image_splits(dataset, image_size=model.config.image_size,
                                   num_channels=model.config.num_channels, seed=0)
        means = {}
        for split in ("train", "validation", "test"):
            images, labels = getattr(splits, split), getattr(splits, f"{split}_labels")
            if split == "train" and len(images) > args.train_images:
                chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.train_images]
                images, labels = images[chosen], None if labels is None else labels[chosen]
            values = greedy_psnr(model, images, args.batch)
            means[split] = values.mean().item()
            for label in ([] if labels is None else labels.unique().tolist()):
                source = PHOTO_NAMES[label] if dataset == "photo-crops" else f"label {label}"
                picked = values[labels == label]
                detail.append(f"| {folder} | {split} | {source} | {len(picked)} | {picked.mean().item():.2f} |")
        summary.append(f"| {folder} | {means['train']:.2f} | {means['validation']:.2f} | {means['test']:.2f} | "
                       f"{means['train'] - means['test']:.2f} |")
        print(summary[-1], flush=True)
    report = "\n".join(lines + summary + [""] + detail) + "\n"
    if args.output:
        Path(args.output).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
