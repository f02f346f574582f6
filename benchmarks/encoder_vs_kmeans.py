"""Has DAPS training taught a k-means-started encoder anything? Its greedy codes against the nearest pixel block.

    python benchmarks/encoder_vs_kmeans.py benchmarks/runs/cifar-refine-600s/daps/seed0 [more tokenizer folders]

For each trained tokenizer with pixel paths (the k-means start), on every test crop of its dataset (photo-crops by
default): the share of tokens where the encoder's greedy code is the code whose pixel block is nearest to the token's
pixels, and the test PSNR of the tokenizer's own decoder from its greedy codes and from those nearest-block codes.
If the nearest-block codes decode as well, the encoder's training has added nothing the decoder could use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import DapsModel  # noqa: E402
from training.data import load_image_splits  # noqa: E402
from training.evaluation import psnr  # noqa: E402
from training.warm_start import nearest_codes, token_cells  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--dataset", default="photo-crops")
    options = parser.parse_args()
    torch.set_num_threads(1)
    test = load_image_splits(options.dataset, seed=0).test * 2 - 1
    print(f"`python benchmarks/encoder_vs_kmeans.py {' '.join(sys.argv[1:])}`: {len(test)} test crops\n")
    print("| tokenizer | greedy = nearest block | test PSNR, greedy codes | test PSNR, nearest-block codes |")
    print("|---|---|---|---|")
    for folder in options.folders:
        model = DapsModel.from_pretrained(str(folder.resolve())).eval()
        config = model.config
        if not config.pixel_paths or config.likelihood != "gaussian":
            raise SystemExit(f"{folder}: needs a Gaussian tokenizer with pixel paths (the k-means start).")
        blocks = model.code_embedding.weight[:, -config.patch_dim:].detach()
        with torch.no_grad():
            greedy = model.encode(test).codes
            nearest = nearest_codes(token_cells(test, config.num_tokens), blocks)
            scores = [psnr((model.decode(codes).pixel_values.clamp(-1, 1) + 1) / 2, (test + 1) / 2).mean().item()
                      for codes in (greedy, nearest)]
        print(f"| {folder} | {(greedy == nearest).float().mean().item():.3f} | {scores[0]:.2f} | {scores[1]:.2f} |")


if __name__ == "__main__":
    main()
