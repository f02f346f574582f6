"""How fast the decoder of a k-means start learns to improve on pasting the centroids (decoder only, codes fixed).

    python benchmarks/decoder_refinement.py                          # the four designs below, 400 steps each
    python benchmarks/decoder_refinement.py --designs reads-0.3 --steps 800
    python benchmarks/decoder_refinement.py --designs reads-0.3 --steps 1800 --save benchmarks/runs/decoder-only

From the k-means start `daps train` uses on the cifar preset (`DapsMethod.fit_warm_start`: aligned patches, pixel
paths, the encoder's pixel head and each code's pixel block set from patch k-means), the encoder is left alone and
the decoder (network, gate, offsets and code embeddings) is trained by AdamW on the images' nearest-centroid codes,
with the trainer's settings (batch 32, lr 1e-3, 50 warm-up steps, weight decay 1e-4, gradient clipping at 1). Those
are the codes a DAPS step decodes while the pixel head keeps q sharp, so this isolates how much and how fast the
decoder can add over the pasted centroids. Validation PSNR (500 crops, [0, 1] images) every 50 steps, test PSNR
(every test crop, greedy = nearest-centroid codes) at the end.

Designs: `blind-G` is the seventh session's decoder (the network does not see the pixel blocks: they are zeroed in
its input, which is the same as leaving those input channels out), `reads-G` the decoder whose network reads the
whole code embedding, block included; G is the gate's starting value.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import DapsConfig, DapsModel  # noqa: E402
from training import objective  # noqa: E402
from training.data import load_image_splits  # noqa: E402
from training.evaluation import psnr  # noqa: E402
from training.methods import DapsMethod  # noqa: E402
from training.warm_start import nearest_codes, token_cells  # noqa: E402

DESIGNS = ("blind-0", "reads-0", "reads-0.3", "reads-1")


def blind(decoder) -> None:
    """Make this decoder's network blind to the pixel blocks (zeroed in its input only)."""
    network = decoder._network

    def without_blocks(embeddings):
        return network(torch.cat([embeddings[..., :-decoder.pixel_dim],
                                  torch.zeros_like(embeddings[..., -decoder.pixel_dim:])], dim=-1))
    decoder._network = without_blocks


def run(design: str, splits, steps: int, batch: int, seed: int, every: int,
        save: str | None = None) -> list[tuple[int, float, float]]:
    kind, gate = design.split("-")
    torch.manual_seed(seed)
    config = DapsConfig.from_preset("cifar", pixel_paths=True, aligned_patches=True, decoder_gate_init=float(gate))
    model = DapsModel(config)
    if kind == "blind":
        blind(model.decoder)
    control = objective.make_eta_control("bisection", rho=0.5, num_samples=7)
    method = DapsMethod(model, 6, control, lambda progress: 0.01, kmeans_init=True)
    train, validation = splits.train * 2 - 1, splits.validation[:500] * 2 - 1
    method.fit_warm_start(train, seed=seed)
    centroids = method.warm_start_centroids

    def codes_of(images):
        return nearest_codes(token_cells(images, config.num_tokens), centroids)

    train_codes, validation_codes = codes_of(train), codes_of(validation)
    parameters = [p for n, p in model.named_parameters() if n.startswith(("decoder.", "code_embedding."))]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))

    @torch.no_grad()
    def validation_psnr() -> float:
        mean = model.decode(validation_codes).pixel_values.clamp(-1, 1)
        return psnr((mean + 1) / 2, (validation + 1) / 2).mean().item()

    generator = torch.Generator().manual_seed(seed)
    rows, started = [(0, validation_psnr(), 0.0)], time.process_time()
    for step in range(1, steps + 1):
        index = torch.randint(0, train.shape[0], (batch,), generator=generator)
        log_likelihood, _ = model._reconstruction_log_likelihood(train[index], train_codes[index][:, None])
        optimizer.zero_grad()
        (-log_likelihood.mean()).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        if step % every == 0:
            rows.append((step, validation_psnr(), time.process_time() - started))
            print(f"  {design} step {step}: val {rows[-1][1]:.2f} dB, gate |g| {model.decoder.network_gate[:3].abs().mean():.3f}",
                  file=sys.stderr, flush=True)
    test = splits.test * 2 - 1
    with torch.no_grad():
        mean = model.decode(codes_of(test)).pixel_values.clamp(-1, 1)
    test_psnr = psnr((mean + 1) / 2, (test + 1) / 2).mean().item()
    if save:
        # A loadable tokenizer folder (encoder: the k-means start, untouched; decoder: as trained here).
        model.save_pretrained(Path(save) / design)
    return rows, test_psnr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--save", default=None, help="write each design's model to SAVE/<design> (save_pretrained)")
    options = parser.parse_args()
    for design in options.designs:
        kind, _, gate = design.partition("-")
        if kind not in ("blind", "reads") or not gate.replace(".", "", 1).isdigit():
            parser.error(f"a design is blind-G or reads-G with G the gate's start, got {design!r}")
    torch.set_num_threads(1)
    splits = load_image_splits("photo-crops", seed=0)
    results = {design: run(design, splits, options.steps, options.batch, options.seed, options.every, options.save)
               for design in options.designs}
    print(f"`python benchmarks/decoder_refinement.py {' '.join(sys.argv[1:])}` — {platform.machine()}, torch "
          f"{torch.__version__}, 1 thread; {splits.describe()}; seed {options.seed}; validation PSNR (500 crops, dB) "
          f"of the decoder trained on fixed nearest-centroid codes; step 0 is the k-means start\n")
    steps = [row[0] for row in next(iter(results.values()))[0]]
    print("| design | " + " | ".join(f"step {s}" for s in steps) + " | CPU s | test PSNR (all crops) |")
    print("|---" * (len(steps) + 3) + "|")
    for design, (rows, test_psnr) in results.items():
        print(f"| {design} | " + " | ".join(f"{row[1]:.2f}" for row in rows) + f" | {rows[-1][2]:.0f} | "
              f"{test_psnr:.2f} |")


if __name__ == "__main__":
    main()
