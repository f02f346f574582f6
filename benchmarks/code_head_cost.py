"""What the factorised code head costs per DAPS training step on the mnist preset, and what its implementation costs.

    python benchmarks/code_head_cost.py [--rounds 12] [--batch-size 128] [--method daps]

Three models, each built as `daps train --dataset mnist-5k --method M` builds it (`resolve_defaults`, `build_config`,
`build_method`; K and M = the trainer's defaults), on the same 128 training digits, binarised as the trainer does:

- "learned + full": `--code_embedding learned --code_head full` (the mnist default before the lattice);
- "lattice + factorized, gather": `--code_embedding lattice --code_head factorized` (the mnist default of the
  twenty-third to twenty-ninth sessions) with the head's V log-probabilities formed as the code before this benchmark
  did: gather each code's D coordinate columns, (..., V, D), then sum;
- "lattice + factorized": the same head as the model forms it (`DapsCodeTransformer.project`: an outer sum of the D
  log-softmaxes).

One optimiser step each (forward, backward, gradient clipping, AdamW, the method's `after_step`), one torch thread,
timed interleaved with the order rotated each round, in process CPU seconds (the clock `quality.py` budgets); the
first round is a warm-up. Prints the median step of each and the ratios, all measured in this one run, and writes
them as JSON when `--output` is given. It also checks that the two factorised forms give the same log-probabilities.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.modeling_daps import DapsCodeTransformer, DapsFiniteScalarQuantizer  # noqa: E402
from training import trainer  # noqa: E402
from training.arguments import TrainArguments  # noqa: E402
from training.data import binarize, load_image_splits  # noqa: E402


def gathered_project(transformer: DapsCodeTransformer):
    """The factorised head as first written: every code's D coordinate columns gathered, (..., V, D), then summed."""
    levels, basis = DapsFiniteScalarQuantizer.level_tensors(transformer.levels)
    offsets = torch.cumsum(levels, dim=0) - levels
    columns = (torch.arange(transformer.codebook_size)[:, None] // basis) % levels + offsets   # (V, D)

    def project(hidden: torch.Tensor) -> torch.Tensor:
        output = transformer.head(transformer.norm(hidden)).float()
        log_probs = torch.cat([torch.log_softmax(part, dim=-1) for part in output.split(transformer.levels, dim=-1)],
                              dim=-1)
        return log_probs[..., columns].sum(-1)

    return project


def build(method: str, batch_size: int, **choices):
    args = trainer.resolve_defaults(TrainArguments(dataset="mnist-5k", method=method, batch_size=batch_size,
                                                   **choices))
    config, _ = trainer.build_config(args, image_size=28, num_channels=1)
    torch.manual_seed(0)
    model = trainer.DapsModel(config).train()
    step_method = trainer.build_method(args, model, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    return args, model, step_method, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--method", default="daps", choices=["daps", "daps-na"])
    parser.add_argument("--output", help="Write the figures as JSON here.")
    options = parser.parse_args()
    if options.rounds < 2:
        parser.error("--rounds must be at least 2 (the first is a warm-up).")
    torch.set_num_threads(1)
    splits = load_image_splits("mnist-5k", image_size=28, seed=0)
    images = splits.train[:options.batch_size]
    targets = binarize(images, generator=torch.Generator().manual_seed(0))
    pixel_values = trainer.to_model_input(images, trainer.DapsConfig.from_preset("mnist"))

    variants = {
        "learned + full": build(options.method, options.batch_size, code_embedding="learned", code_head="full"),
        "lattice + factorized, gather": build(options.method, options.batch_size, code_embedding="lattice",
                                              code_head="factorized"),
        "lattice + factorized": build(options.method, options.batch_size, code_embedding="lattice",
                                      code_head="factorized"),
    }
    transformer = variants["lattice + factorized, gather"][1].code_transformer
    reference = variants["lattice + factorized"][1].code_transformer
    transformer.project = gathered_project(transformer)
    hidden = torch.randn(64, 8, transformer.head.in_features)
    with torch.no_grad():
        difference = (transformer.project(hidden) - reference.project(hidden)).abs().max().item()
    print(f"largest difference of the two factorised forms' log-probabilities: {difference:.2e}")

    def step(name: str) -> None:
        args, model, method, optimizer = variants[name]
        out = method(pixel_values, targets, 0.5)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step()

    names = list(variants)
    seconds = {name: [] for name in names}
    for round_index in range(options.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            start = time.process_time()
            step(name)
            seconds[name].append(time.process_time() - start)
    medians = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    args = variants["lattice + factorized"][0]
    print(f"{options.method} on mnist, batch {options.batch_size}, K = {args.num_samples}, "
          f"M = {args.update_samples}, 1 thread, {options.rounds - 1} timed rounds (CPU seconds per step):")
    for name, median in medians.items():
        print(f"  {name:30s} {median * 1000:8.1f} ms")
    ratios = {
        "gather / outer sum": medians["lattice + factorized, gather"] / medians["lattice + factorized"],
        "outer sum / learned + full": medians["lattice + factorized"] / medians["learned + full"],
        "gather / learned + full": medians["lattice + factorized, gather"] / medians["learned + full"],
    }
    for name, ratio in ratios.items():
        print(f"  {name:30s} {ratio:8.2f}")
    if options.output:
        with open(options.output, "w") as handle:
            json.dump({"method": options.method, "batch_size": options.batch_size, "num_samples": args.num_samples,
                       "update_samples": args.update_samples, "rounds_timed": options.rounds - 1,
                       "max_log_prob_difference": difference, "median_step_seconds": medians, "ratios": ratios,
                       "step_seconds": seconds}, handle, indent=2)


if __name__ == "__main__":
    main()
