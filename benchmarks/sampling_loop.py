"""The cached sampling loop's attention paths, measured A/B in one process.

A DAPS step samples K codes per image with a 64-step cached loop (`DapsModel._sample_from_memory`); each step's
self-attention reads the filled part of a preallocated key/value cache, a strided view. `attend(..., cached=True)`
sends that read to `scaled_dot_product_attention` for bf16 on CPU, because bf16 matrix products there copy strided
views first; the plain path (matmul–softmax–matmul) is what every step used before. This script swaps the plain path
back in (`tokenizer.modeling_daps.attend` with `cached` ignored) and times, interleaved round by round, with the
trainer's own model and method (`speed.TrainingStep`, DAPS K = 6 keeping 2 on the chosen preset):

- the K-sample loop of one batch (no gradient), fp32 and bf16;
- greedy encoding of an inference batch, fp32 and bf16;
- one whole training step (forward, backward, AdamW), bf16 (and fp32 as a control: its path did not change).

It also checks that both paths give the same greedy codes on the batch. Per-round ratios (plain / cached) are
paired, so machine noise hits both arms alike; the table gives their medians.

    python benchmarks/sampling_loop.py                      # cifar, ~3 min on one core
    python benchmarks/sampling_loop.py --rounds 7 --output benchmarks/results/sampling-loop-amx.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import tokenizer.modeling_daps as modeling  # noqa: E402
from speed import TrainingStep, autocast_context, command_line, cpu_model, interleaved_medians, make_images  # noqa: E402

FAST_ATTEND = modeling.attend


def plain_attend(query, keys, values, causal=False, cached=False):
    """The path every cached step took before: `cached` ignored."""
    return FAST_ATTEND(query, keys, values, causal)


def with_attend(function, attend):
    def run():
        modeling.attend = attend
        try:
            return function()
        finally:
            modeling.attend = FAST_ATTEND
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar", choices=["mnist", "cifar"])
    parser.add_argument("--batch-size", type=int, default=32, help="training batch (the loop samples K per image)")
    parser.add_argument("--encode-batch-size", type=int, default=256, help="greedy encoding batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=600, help="stop adding rounds after this (at least 3)")
    parser.add_argument("--output", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]

    step = TrainingStep(args.preset, "daps", 6, "cpu", update_samples=2)
    model, generator = step.model, torch.Generator().manual_seed(0)
    images = make_images(step.config, args.batch_size, generator)
    encode_images = make_images(step.config, args.encode_batch_size, generator)
    with torch.no_grad():
        memory = model.encode_patches(images)

    def loop(dtype):
        def run():
            with torch.no_grad(), autocast_context(dtype):
                model._sample_from_memory(memory, 6, 1.0, torch.Generator().manual_seed(0), return_proposal=True)
        return run

    def greedy(dtype):
        def run():
            with torch.no_grad(), autocast_context(dtype):
                return model.encode(encode_images).codes
        return run

    def train(dtype):
        return lambda: step.run(images, dtype)

    tasks = {f"K = 6 sampling loop, batch {args.batch_size}, {d}": loop(d) for d in ("fp32", "bf16")}
    tasks |= {f"greedy encode, batch {args.encode_batch_size}, {d}": greedy(d) for d in ("fp32", "bf16")}
    tasks |= {f"training step (DAPS K = 6 keeping 2), {d}": train(d) for d in ("bf16", "fp32")}

    same_codes = {}
    for dtype in ("fp32", "bf16"):
        fast, plain = greedy(dtype)(), with_attend(greedy(dtype), plain_attend)()
        same_codes[dtype] = (fast == plain).float().mean().item()

    rows = []
    for name, function in tasks.items():
        variants = {"plain": with_attend(function, plain_attend), "cached": function}
        medians, rounds, samples = interleaved_medians(variants, args.rounds, args.budget_s / len(tasks))
        ratio = statistics.median(p / c for p, c in zip(samples["plain"], samples["cached"]))
        rows.append((name, medians["plain"], medians["cached"], ratio, rounds))
        print(f"{name}: plain {medians['plain']:.3f} s, cached path {medians['cached']:.3f} s, {ratio:.2f}x", flush=True)

    lines = [
        f"`{command_line()}` — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, "
        f"torch {torch.__version__}, one thread, load average {load_before:.2f} → {os.getloadavg()[0]:.2f}",
        "",
        "| work (" + args.preset + ") | plain path | cached path (new) | plain / cached (median of rounds) | rounds |",
        "|---|---:|---:|---:|---:|",
        *[f"| {n} | {p:.3f} s | {c:.3f} s | **{r:.2f}×** | {k} |" for n, p, c, r, k in rows],
        "",
        "Greedy codes identical between the paths: " + ", ".join(f"{d} {v:.1%} of tokens" for d, v in same_codes.items())
        + " (bf16 rounds differently in the two kernels).",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
