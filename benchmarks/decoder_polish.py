"""The decoder polish after the fact: how much a trained tokenizer gains when only its decoder is trained further on
its encoder's greedy codes, at which learning rate, after how many steps.

    python benchmarks/decoder_polish.py benchmarks/runs/mnist-600s-polish-controls/daps_no_polish/seed0
    python benchmarks/decoder_polish.py RUN --learning-rates 1e-3 1e-4 --steps 1600 --every 200 --output results.md

This is the phase `daps train --polish_fraction` runs at the end of a run (`training.methods.decoder_polish_step`:
the encoder frozen, the decoder network and its code table trained by AdamW, weight decay 1e-4, gradient clipping at
1, on the greedy codes of the training images, encoded once), here started from a finished run folder so that the
learning rate and the length can be chosen without training the encoder again. Each learning rate starts from the
folder's weights with a fresh optimiser and the same batches. Validation PSNR (the run's held-out validation images,
greedy codes, fixed binarisation for Bernoulli models) every `--every` steps, the choice is made on it; the test split
is read once per learning rate, after its last step. Times are process CPU seconds on `--threads` threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import DapsModel  # noqa: E402
from training.data import EpochSampler, binarize, binarize_fixed, load_image_splits  # noqa: E402
from training.evaluation import evaluate  # noqa: E402
from training.methods import decoder_parameters, decoder_polish_step  # noqa: E402
from training.trainer import to_model_input  # noqa: E402


def held_out_psnr(model, images: torch.Tensor, bernoulli: bool) -> float:
    targets = binarize_fixed(images, seed=0) if bernoulli else None
    model.eval()
    metrics = evaluate(model, images, batch_size=256, binarized_targets=targets, compute_fid=False,
                       generator=torch.Generator().manual_seed(1234))
    return float(metrics["psnr"])


def polish(folder: Path, splits, learning_rate: float, steps: int, every: int, batch_size: int, seed: int):
    """Returns [(step, CPU s, validation PSNR)], starting with step 0, and the test PSNR after the last step."""
    model = DapsModel.from_pretrained(folder)
    config = model.config
    bernoulli = config.likelihood == "bernoulli"
    validation = splits.validation
    rows = [(0, 0.0, held_out_psnr(model, validation, bernoulli))]
    for p in model.parameters():
        p.requires_grad_(False)
    params = decoder_parameters(model)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-4)
    sampler = EpochSampler(len(splits.train), batch_size, seed=seed)
    binarize_generator = torch.Generator().manual_seed(seed)
    inputs = to_model_input(splits.train, config)
    started = time.process_time()
    model.eval()
    with torch.no_grad():
        codes = torch.cat([model.encode(inputs[i:i + 256]).codes for i in range(0, len(inputs), 256)])
    seconds = time.process_time() - started
    for step in range(1, steps + 1):
        started = time.process_time()
        model.train()
        indices = next(sampler)
        targets = binarize(splits.train[indices], generator=binarize_generator) if bernoulli else inputs[indices]
        loss = decoder_polish_step(model, codes[indices], targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        seconds += time.process_time() - started
        if step % every == 0 or step == steps:
            rows.append((step, seconds, held_out_psnr(model, validation, bernoulli)))
    return rows, held_out_psnr(model, splits.test, bernoulli)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a finished `daps train` output folder")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4, 3e-5])
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (markdown)")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    for name in ("steps", "every"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be >= 1")
    arguments = json.loads((options.folder / "train_args.json").read_text())
    batch_size = options.batch_size or arguments["batch_size"]
    model_config = json.loads((options.folder / "config.json").read_text())
    splits = load_image_splits(arguments["dataset"], image_size=model_config["image_size"],
                               num_channels=model_config["num_channels"], seed=0)
    results = {lr: polish(options.folder, splits, lr, options.steps, options.every, batch_size, options.seed)
               for lr in options.learning_rates}
    steps = [row[0] for row in next(iter(results.values()))[0]]
    lines = [f"### Decoder polish of `{options.folder}`", "",
             f"`python benchmarks/decoder_polish.py {' '.join(sys.argv[1:])}` — {date.today()}, "
             f"{platform.machine()}, torch {torch.__version__}, {options.threads} thread(s); batch {batch_size}. "
             f"Validation PSNR (dB, greedy codes) after each number of decoder-only steps; test PSNR after the last; "
             f"CPU seconds of the last step count include encoding the training images once.", "",
             "| learning rate | " + " | ".join(f"step {s}" for s in steps) + " | CPU s | test PSNR |",
             "|---|" + "---:|" * (len(steps) + 2)]
    for lr, (rows, test) in results.items():
        lines.append(f"| {lr:g} | " + " | ".join(f"{row[2]:.2f}" for row in rows)
                     + f" | {rows[-1][1]:.1f} | {test:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if options.output:
        options.output.parent.mkdir(parents=True, exist_ok=True)
        options.output.write_text(text)


if __name__ == "__main__":
    main()
