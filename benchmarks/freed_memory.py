"""What `daps train --keep_freed_memory` (glibc mallopt) saves per training step, measured A/B.

Each round starts two child processes one after the other, one with the allocator setting applied and one without
(the order alternates between rounds), and each child times the trainer's training steps (`speed.TrainingStep`:
DAPS with the trainer's default K = 6 keeping 2, and FSQ, on the chosen preset, fp32 and bf16) after warm-up steps,
reporting the median step time and its peak RSS. The table gives the median over rounds of each arm and the median
of the per-round ratios (untuned time / tuned time), so that machine noise hits both arms alike.

    python benchmarks/freed_memory.py                  # cifar, 3 rounds (~4 min on one core)
    python benchmarks/freed_memory.py --rounds 5 --output benchmarks/results/freed-memory.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def child(preset: str, tuned: bool, steps: int, warmup: int, dtypes: list[str]) -> dict:
    import torch

    from training.trainer import keep_freed_memory

    torch.set_num_threads(1)
    applied = keep_freed_memory() if tuned else False
    if tuned and not applied:
        raise SystemExit("mallopt is not available here (not Linux with glibc): nothing to compare.")
    from speed import TrainingStep, make_images

    result = {"applied": applied, "seconds": {}}
    for name, method, k, m in (("daps K=6 keep 2", "daps", 6, 2), ("fsq", "fsq", 1, 1)):
        step = TrainingStep(preset, method, k, "cpu", update_samples=m)
        images = make_images(step.config, 32, torch.Generator().manual_seed(0), "cpu")
        for dtype in dtypes:
            for _ in range(warmup):
                step.run(images, dtype)
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                step.run(images, dtype)
                times.append(time.perf_counter() - started)
            result["seconds"][f"{name} {dtype}"] = statistics.median(times)
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar", choices=["mnist", "cifar"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per child and variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--output", default="benchmarks/results/freed-memory.md")
    parser.add_argument("--child", choices=["tuned", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.preset, args.child == "tuned", args.steps, args.warmup, args.dtype)))
        return

    started = time.time()
    rounds = []
    for index in range(args.rounds):
        order = ["tuned", "default"] if index % 2 == 0 else ["default", "tuned"]
        results = {}
        for arm in order:
            command = [sys.executable, __file__, "--child", arm, "--preset", args.preset, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--dtype", *args.dtype]
            process = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
            if process.returncode != 0:
                raise SystemExit(f"child {arm} failed:\n{process.stderr[-3000:]}")
            results[arm] = json.loads(process.stdout.strip().splitlines()[-1])
        rounds.append(results)
        print(f"round {index + 1}/{args.rounds}: " + ", ".join(
            f"{key}: {results['default']['seconds'][key]:.3f} → {results['tuned']['seconds'][key]:.3f} s"
            for key in results["tuned"]["seconds"]), flush=True)

    keys = list(rounds[0]["tuned"]["seconds"])
    lines = [
        f"# Keeping freed memory (glibc mallopt) in the training step, {args.preset}",
        "",
        f"- command: `python benchmarks/freed_memory.py {' '.join(sys.argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, run time {time.time() - started:.0f} s; "
        f"{platform.processor() or platform.machine()}; one thread per child; batch 32",
        f"- {args.rounds} rounds, each a child process per arm (order alternating), {args.warmup} warm-up and "
        f"{args.steps} timed steps per variant; medians",
        "",
        "| step | default allocator (s) | freed memory kept (s) | default / kept (median of per-round ratios) |",
        "|---|---:|---:|---:|",
    ]
    for key in keys:
        default = statistics.median(r["default"]["seconds"][key] for r in rounds)
        tuned = statistics.median(r["tuned"]["seconds"][key] for r in rounds)
        ratio = statistics.median(r["default"]["seconds"][key] / r["tuned"]["seconds"][key] for r in rounds)
        lines.append(f"| {key} | {default:.3f} | {tuned:.3f} | {ratio:.3f}× |")
    rss_default = statistics.median(r["default"]["max_rss_mib"] for r in rounds)
    rss_tuned = statistics.median(r["tuned"]["max_rss_mib"] for r in rounds)
    lines += ["", f"Peak RSS of a child (all variants run): default {rss_default:.0f} MiB, kept {rss_tuned:.0f} MiB."]
    report = "\n".join(lines) + "\n"
    output = REPO / args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
