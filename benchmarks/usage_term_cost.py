"""What the DAPS usage term costs per training step: the cifar preset's DAPS step with and without it, interleaved.

    python benchmarks/usage_term_cost.py [--rounds 6] [--batch-size 32]

Builds both methods as `daps train --dataset photo-crops` does (`resolve_defaults`, `build_config`, `build_method`),
one torch thread, random images, and times forward + backward + the η control's `after_step` of each in turn; the
first round is a warm-up. Prints the median step of each and their ratio (measured in the same run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from training import trainer
from training.arguments import TrainArguments


def build(usage_weight: float, batch_size: int):
    args = trainer.resolve_defaults(TrainArguments(dataset="photo-crops", batch_size=batch_size,
                                                   usage_weight=usage_weight))
    config, _ = trainer.build_config(args, image_size=32, num_channels=3)
    torch.manual_seed(0)
    return trainer.build_method(args, trainer.DapsModel(config), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    options = parser.parse_args()
    if options.rounds < 2:
        parser.error("--rounds must be at least 2 (the first is a warm-up).")
    torch.set_num_threads(1)
    images = torch.rand(options.batch_size, 3, 32, 32) * 2 - 1
    methods = {"no usage term": build(0.0, options.batch_size), "usage 0.3 + MI": build(0.3, options.batch_size)}
    times = {name: [] for name in methods}
    for _ in range(options.rounds):
        for name, method in methods.items():
            start = time.perf_counter()
            method(images, images, progress=0.5)["loss"].backward()
            method.after_step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name}: median DAPS step {median:.3f} s (batch {options.batch_size}, cifar preset, 1 thread)")
    print(f"ratio: {medians['usage 0.3 + MI'] / medians['no usage term']:.3f}")


if __name__ == "__main__":
    main()
