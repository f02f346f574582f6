"""Patch k-means as a tokenizer: the reference point of the k-means initialisation (`daps train --kmeans_init`).

    python benchmarks/kmeans_tokenizer.py [--setting cifar] [--dataset photo-crops-fold2] [--seeds 0 1 2]
        [--augment flip rotate channels]

Fits the same k-means `--kmeans_init` fits (`training.warm_start.fit_kmeans` on the training images' pixel blocks
under the tokens: V centroids, 15 Lloyd iterations on at most 200k blocks, k-means++ seeding), then tokenizes each
held-out image by the nearest centroid per block and decodes by pasting the centroids back: no network, no training
beyond k-means. Prints the validation and test PSNR (on [0, 1] images), the code usage and the CPU seconds k-means
took (one thread), per seed, as a markdown table with the command. With `--augment`, k-means is fitted to one
augmented draw of each training image, as `daps train` does when given the same `--augment_*` flags; the training
PSNR is always on the training images as they are.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from tokenizer import DapsConfig
from tokenizer.configuration_daps import code_grid_shape as _grid_shape
from training.data import augment_images, load_image_splits
from training.evaluation import psnr
from training.warm_start import fit_kmeans, nearest_codes, token_cells

SETTINGS = {"cifar": ("photo-crops", "cifar"), "mnist": ("mnist-5k", "mnist")}


def reconstruct(images: torch.Tensor, centroids: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in the model's space (N, C, H, W) → (nearest-centroid codes (N, L), the pasted reconstruction)."""
    n, channels, height, width = images.shape
    rows, columns = _grid_shape(num_tokens)
    codes = nearest_codes(token_cells(images, num_tokens), centroids)
    blocks = centroids[codes].reshape(n, rows, columns, channels, height // rows, width // columns)
    return codes, blocks.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, height, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cifar")
    parser.add_argument("--dataset", default=None, help="another dataset for the setting's preset, e.g. photo-crops-fold2")
    parser.add_argument("--test-images", type=int, default=None,
                        help="test PSNR on the first N test images only, as quality.py --test-images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--augment", nargs="*", default=[], choices=["flip", "rotate", "channels"],
                        help="fit k-means to augmented training images")
    options = parser.parse_args()
    torch.set_num_threads(1)
    dataset, preset = SETTINGS[options.setting]
    dataset = options.dataset or dataset
    config = DapsConfig.from_preset(preset)
    splits = load_image_splits(dataset, seed=0)
    # The Gaussian presets work on [-1, 1], as `daps train` feeds the model; PSNR is measured back on [0, 1].
    to_model = (lambda x: x) if config.likelihood == "bernoulli" else (lambda x: x * 2 - 1)
    to_unit = (lambda x: x) if config.likelihood == "bernoulli" else (lambda x: (x + 1) / 2)
    print(f"`python benchmarks/kmeans_tokenizer.py {' '.join(sys.argv[1:])}` — {platform.machine()}, torch "
          f"{torch.__version__}, 1 thread; {splits.describe()}; {config.num_tokens} tokens × {config.codebook_size} "
          f"codes\n")
    print("| seed | augmentations | k-means CPU s | train PSNR | val PSNR | test PSNR | test code usage |")
    print("|---|---|---|---|---|---|---|")
    for seed in options.seeds:
        started = time.process_time()
        fitted = splits.train if not options.augment else augment_images(
            splits.train, seed, -1, flip="flip" in options.augment, rotate="rotate" in options.augment,
            permute_channels="channels" in options.augment)
        cells = token_cells(to_model(fitted), config.num_tokens)
        centroids = fit_kmeans(cells.reshape(-1, cells.shape[-1]), config.codebook_size, seed=seed)
        seconds = time.process_time() - started
        scores = {}
        for name in ("train", "validation", "test"):
            images = getattr(splits, name)
            if name == "test" and options.test_images is not None:
                images = images[:options.test_images]
            codes, reconstruction = reconstruct(to_model(images), centroids, config.num_tokens)
            scores[name] = float(psnr(to_unit(reconstruction).clamp(0, 1), images).mean())
            usage = codes.unique().numel() / config.codebook_size
        print(f"| {seed} | {', '.join(options.augment) or 'none'} | {seconds:.1f} | {scores['train']:.2f} | "
              f"{scores['validation']:.2f} | {scores['test']:.2f} | {usage:.3f} |")


if __name__ == "__main__":
    main()
