"""How trained tokenizers generalise: greedy reconstruction PSNR on training images against unseen ones, per source.

    python benchmarks/generalisation.py benchmarks/runs/cifar-amx-1800s-cosine/daps_cosine_lr/seed0 \
        benchmarks/runs/cifar-amx-1800s-cosine/fsq_cosine_lr/seed0 --output benchmarks/results/generalisation.md

For each folder, on the dataset it was trained on (`train_args.json`): greedy codes of `--train-images` training images
(a seeded random draw) and of every validation and test image, then PSNR per split and per source. A source is a
photograph for `photo-crops` (the splits are drawn by photograph, so validation and test photographs are never seen in
training) and a label otherwise. A tokenizer that reconstructs its training photographs far better than unseen ones has
learnt those photographs rather than images; the gap between methods at equal training says which generalises.
Per source, the squared error is also split into the error of each crop's mean colour (per channel: a whole crop
too dark, too bright or tinted) and the rest. With `--search parallel:4:1` (or `local:N:S`), the validation and test
rows are repeated with searched codes (`encode(search=...)`), which says whether a better code existed for the
decoder and the encoder missed it. One thread; no augmentation at evaluation.
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
from training.data import PHOTO_NAMES, load_image_splits, photo_fold  # noqa: E402
from training.evaluation import psnr, to_unit_range  # noqa: E402
from training.trainer import to_model_input  # noqa: E402


def reconstruct(model: DapsModel, images: torch.Tensor, batch: int, **search) -> torch.Tensor:
    """Reconstructions in [0, 1] of greedy (or searched) codes: (N, C, H, W) → (N, C, H, W)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            codes = model.encode(to_model_input(chunk, model.config), **search).codes
            out.append(to_unit_range(model.decode(codes).pixel_values, model.config.likelihood).clamp(0, 1))
    return torch.cat(out)


def parse_search(spec: str) -> dict:
    method, _, rest = spec.partition(":")
    candidates, _, sweeps = rest.partition(":")
    if method not in ("local", "parallel") or not candidates.isdigit() or not (sweeps or "1").isdigit():
        raise argparse.ArgumentTypeError(f"--search takes local|parallel:CANDIDATES:SWEEPS, got {spec!r}")
    return dict(search=method, num_candidates=int(candidates), num_sweeps=int(sweeps or 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="tokenizer folders written by `daps train`")
    parser.add_argument("--train-images", type=int, default=1024, help="training images drawn (default 1024)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--search", type=parse_search, default=None,
                        help="also searched codes on validation and test, e.g. parallel:4:1")
    parser.add_argument("--output", default=None, help="also write the markdown tables here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    lines = [f"`python benchmarks/generalisation.py {' '.join(sys.argv[1:])}` — {platform.machine()}, torch "
             f"{torch.__version__}, 1 thread; greedy codes; {args.train_images} training images drawn with seed 0, "
             "every validation and test image", ""]
    summary = ["| run | train PSNR (dB) | validation | test | train − test |", "|---|---|---|---|---|"]
    detail = ["| run | split | codes | source | images | PSNR (dB) | MSE × 10⁴ | of which the crops' mean colour |",
              "|---|---|---|---|---|---|---|---|"]
    for folder in map(Path, args.folders):
        model = DapsModel.from_pretrained(folder).eval()
        run_args_path = folder / "train_args.json"
        dataset = json.loads(run_args_path.read_text())["dataset"] if run_args_path.exists() else "photo-crops"
        splits = load_image_splits(dataset, image_size=model.config.image_size,
                                   num_channels=model.config.num_channels, seed=0)
        means = {}
        for split, codes in (("train", "greedy"), ("validation", "greedy"), ("test", "greedy"),
                             *((("validation", "searched"), ("test", "searched")) if args.search else ())):
            images, labels = getattr(splits, split), getattr(splits, f"{split}_labels")
            if split == "train" and len(images) > args.train_images:
                chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.train_images]
                images, labels = images[chosen], None if labels is None else labels[chosen]
            reconstruction = reconstruct(model, images, args.batch, **(args.search if codes == "searched" else {}))
            values = psnr(reconstruction, images)
            if codes == "greedy":
                means[split] = values.mean().item()
            error = reconstruction - images
            squared, colour = error.pow(2).flatten(1).mean(1), error.mean((2, 3)).pow(2).mean(1)   # (N,) each
            for label in ([None] if labels is None else labels.unique().tolist()):
                source = ("all" if label is None else PHOTO_NAMES[label] if photo_fold(dataset) is not None
                          else f"label {label}")
                picked = torch.ones(len(images), dtype=torch.bool) if label is None else labels == label
                detail.append(f"| {folder} | {split} | {codes} | {source} | {int(picked.sum())} | "
                              f"{values[picked].mean().item():.2f} | {squared[picked].mean().item() * 1e4:.1f} | "
                              f"{colour[picked].mean().item() / squared[picked].mean().item():.0%} |")
        summary.append(f"| {folder} | {means['train']:.2f} | {means['validation']:.2f} | {means['test']:.2f} | "
                       f"{means['train'] - means['test']:.2f} |")
        print(summary[-1], flush=True)
    report = "\n".join(lines + summary + [""] + detail) + "\n"
    if args.output:
        Path(args.output).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
