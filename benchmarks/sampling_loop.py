"""The cached sampling loop of this tree against an earlier revision's, measured A/B in one process.

A DAPS step samples K codes per image with a 64-step cached loop (`DapsModel._sample_from_memory`). This script
loads `tokenizer/modeling_daps.py` as it was at `--against` (a git revision; default 60468d4, before the tenth
session's changes), swaps that revision's loop and attention function in, and times, interleaved round by round,
with the trainer's own model and method (`speed.TrainingStep`, DAPS K = 6 keeping 2 on the chosen preset):

- the K-sample loop of one batch (no gradient), fp32 and bf16;
- greedy encoding of an inference batch, fp32 and bf16;
- one whole training step (forward, backward, AdamW), bf16 and fp32.

What changed since 60468d4: each cached self-attention step reads the filled part of a preallocated key/value cache,
a strided view, and bf16 matrix products on CPU copy such views first, so `attend(..., cached=True)` sends bf16 CPU
steps to `scaled_dot_product_attention`; and the Gumbel noise is formed in place in one buffer, with the division
by τ = 1 and the proposal's second log-softmax (equal to log q at τ = 1 without exploration) skipped. The loop's
outputs are bitwise identical to the revision's in fp32 (tested), and the script checks the greedy codes of both.
Per-round ratios (revision / this tree) are paired, so machine noise hits both arms alike; the table gives their
medians.

The revision's teacher-forced log q (`DapsModel._log_prob_from_memory`) is swapped in with its loop. Against 8a2beda
(`--against 8a2beda --preset mnist`), what changed is the factorized code head's draw (the mnist preset's): each
lattice coordinate is drawn on its own from its log-softmax (Σ levels = 16 noise values per token instead of V = 256,
no V-wide outer sum, log-softmax or gather), the same distribution of codes; and an update's log q sums the
coordinates' log-probabilities at the code instead of forming all V of every position.

    python benchmarks/sampling_loop.py                      # cifar, ~3 min on one core
    python benchmarks/sampling_loop.py --rounds 7 --output benchmarks/results/sampling-loop-amx.md
    python benchmarks/sampling_loop.py --against 8a2beda --preset mnist --batch-size 128 --dtypes fp32
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import tokenizer.modeling_daps as modeling  # noqa: E402
from speed import TrainingStep, autocast_context, command_line, cpu_model, interleaved_medians, make_images  # noqa: E402

FAST_ATTEND, FAST_SAMPLE = modeling.attend, modeling.DapsModel._sample_from_memory
FAST_LOG_PROB = modeling.DapsModel._log_prob_from_memory


def load_revision(revision: str):
    """`tokenizer/modeling_daps.py` at `revision`, imported as a module of the tokenizer package."""
    source = subprocess.run(["git", "show", f"{revision}:tokenizer/modeling_daps.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as folder:   # the module lives in memory once executed
        path = Path(folder) / "modeling_daps_revision.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("tokenizer._modeling_daps_revision", path)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "tokenizer"
        spec.loader.exec_module(module)
    return module


def revision_arm(function, old):
    """Run `function` with the revision's sampling loop, teacher-forced log q and attention (the revision's `attend`
    may lack `cached`)."""
    def old_attend(query, keys, values, causal=False, cached=False):
        return old.attend(query, keys, values, causal)

    def run():
        modeling.attend, modeling.DapsModel._sample_from_memory = old_attend, old.DapsModel._sample_from_memory
        modeling.DapsModel._log_prob_from_memory = old.DapsModel._log_prob_from_memory
        try:
            return function()
        finally:
            modeling.attend, modeling.DapsModel._sample_from_memory = FAST_ATTEND, FAST_SAMPLE
            modeling.DapsModel._log_prob_from_memory = FAST_LOG_PROB
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="60468d4", help="git revision to compare with (default 60468d4)")
    parser.add_argument("--preset", default="cifar", choices=["mnist", "cifar"])
    parser.add_argument("--batch-size", type=int, default=32, help="training batch (the loop samples K per image)")
    parser.add_argument("--encode-batch-size", type=int, default=256, help="greedy encoding batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=600, help="stop adding rounds after this (at least 3)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="precisions to time (default both)")
    parser.add_argument("--output", default=None, help="also write the table here (markdown)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    old = load_revision(args.against)

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

    tasks = {f"K = 6 sampling loop, batch {args.batch_size}, {d}": loop(d) for d in args.dtypes}
    tasks |= {f"greedy encode, batch {args.encode_batch_size}, {d}": greedy(d) for d in args.dtypes}
    tasks |= {f"training step (DAPS K = 6 keeping 2), {d}": train(d) for d in args.dtypes}

    same_codes = {}
    for dtype in args.dtypes:
        fast, plain = greedy(dtype)(), revision_arm(greedy(dtype), old)()
        same_codes[dtype] = (fast == plain).float().mean().item()

    rows = []
    for name, function in tasks.items():
        variants = {"plain": revision_arm(function, old), "cached": function}
        medians, rounds, samples = interleaved_medians(variants, args.rounds, args.budget_s / len(tasks))
        ratio = statistics.median(p / c for p, c in zip(samples["plain"], samples["cached"]))
        rows.append((name, medians["plain"], medians["cached"], ratio, rounds))
        print(f"{name}: {args.against} {medians['plain']:.3f} s, this tree {medians['cached']:.3f} s, {ratio:.2f}x",
              flush=True)

    lines = [
        f"`{command_line()}` — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, "
        f"torch {torch.__version__}, one thread, load average {load_before:.2f} → {os.getloadavg()[0]:.2f}",
        "",
        f"| work ({args.preset}) | {args.against} | this tree | {args.against} / this tree (median of rounds) | rounds |",
        "|---|---:|---:|---:|---:|",
        *[f"| {n} | {p:.3f} s | {c:.3f} s | **{r:.2f}×** | {k} |" for n, p, c, r, k in rows],
        "",
        "Greedy codes identical between the two: " + ", ".join(f"{d} {v:.1%} of tokens" for d, v in same_codes.items())
        + " (bf16 attention rounds differently in the two kernels).",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
