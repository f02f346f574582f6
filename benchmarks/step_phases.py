"""Where a DAPS training step's CPU time goes on the mnist preset: the K-sample draw, its no-grad decode, the update.

    python benchmarks/step_phases.py [--rounds 8] [--batch-size 128] [--method daps]

The model and step are built as `daps train --dataset mnist-5k --method M` builds them (`resolve_defaults`,
`build_config`, `build_method`: K = 6, M = 2 kept), on the same 128 training digits, one torch thread, process CPU
time, median over rounds after a warm-up round. Timed separately, each round:

- the whole optimiser step (the method's forward, backward, clipping, AdamW, `after_step`);
- drawing K codes per image from q (`_sample_from_memory`, KV cache, no gradient);
- decoding the K codes without gradient for their rewards;
- an update on M kept codes: encoder forward, teacher-forced log q and decode with gradient, backward, AdamW —
  what each extra update of `--sample_reuse` costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import trainer  # noqa: E402
from training.arguments import TrainArguments  # noqa: E402
from training.data import binarize, load_image_splits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--method", default="daps", choices=["daps", "daps-na"])
    options = parser.parse_args()
    if options.rounds < 2:
        parser.error("--rounds must be at least 2 (the first is a warm-up).")
    torch.set_num_threads(1)
    args = trainer.resolve_defaults(TrainArguments(dataset="mnist-5k", method=options.method,
                                                   batch_size=options.batch_size))
    config, _ = trainer.build_config(args, image_size=28, num_channels=1)
    torch.manual_seed(0)
    model = trainer.DapsModel(config).train()
    method = trainer.build_method(args, model, None)
    method.generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    images = load_image_splits("mnist-5k", image_size=28, seed=0).train[:options.batch_size]
    targets = binarize(images, generator=torch.Generator().manual_seed(0))
    pixel_values = trainer.to_model_input(images, config)
    k, m = args.num_samples, args.update_samples or args.num_samples
    clock = time.process_time

    def update(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def whole_step():
        out = method(pixel_values, targets, 0.5)
        update(out["loss"])
        method.after_step()

    def draw_and_score():
        with torch.no_grad():
            memory = model.encode_patches(pixel_values)
            started = clock()
            codes, _ = model._sample_from_memory(memory, k, 1.0, method.generator)
            drawn = clock()
            model._reconstruction_log_likelihood(targets, codes)
            return codes, drawn - started, clock() - drawn

    def kept_update(codes):
        started = clock()
        memory = model.encode_patches(pixel_values)
        log_q = model._log_prob_from_memory(memory, codes[:, :m])
        log_q = log_q[0] if isinstance(log_q, tuple) else log_q
        rewards, _ = model._reconstruction_log_likelihood(targets, codes[:, :m])
        update(-(log_q.float().mean() + rewards.float().mean()))
        return clock() - started

    times = {"whole step": [], "draw K codes": [], "decode K codes (no grad)": [], f"update on M = {m} codes": []}
    for _ in range(options.rounds):
        started = clock()
        whole_step()
        times["whole step"].append(clock() - started)
        codes, drawing, decoding = draw_and_score()
        times["draw K codes"].append(drawing)
        times["decode K codes (no grad)"].append(decoding)
        times[f"update on M = {m} codes"].append(kept_update(codes))
    whole = statistics.median(times["whole step"][1:])
    print(f"{options.method} on mnist, batch {options.batch_size}, K = {k}, M = {m}, one thread, median of "
          f"{options.rounds - 1} rounds")
    print("| phase | ms | share of the whole step |\n|---|---:|---:|")
    for name, values in times.items():
        value = statistics.median(values[1:])
        print(f"| {name} | {1000 * value:.1f} | {value / whole:.0%} |")


if __name__ == "__main__":
    main()
