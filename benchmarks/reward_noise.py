"""How much one random binarisation of the targets moves DAPS's weighting of a step's K samples (Bernoulli models).

    python benchmarks/reward_noise.py RUN_FOLDER [--images 256] [--num-samples 6] [--beta 0.5] [--seed 0]

A Bernoulli model (the mnist preset) is trained by default on a fresh binarisation of each batch
(`--bernoulli_targets sampled`). DAPS's rewards r_k = log p(x | z_k) then carry the binarisation's noise, and the
weights of a step (softmax of (A − β log q)/(η + β) with η solved for the ESS target) rank the K samples on it. From
the trained model in RUN_FOLDER, on the first `--images` training images: K codes per image sampled from q once, their
rewards scored on the grey levels (`--bernoulli_targets expected`, the expectation over binarisations) and on two
independent binarisations, η solved for each as the trainer's bisection control does (ρ = 0.33), and printed:

- the spread of the rewards over an image's K samples (std, nats, mean over images), and the binarisation's noise
  in those centred rewards (std of the difference to the expected-target rewards);
- η for each set of rewards;
- how often the heaviest sample is the same (binarised against expected; between the two binarisations);
- the mean total-variation distance between the weight vectors.

One thread; a few seconds. Prints a Markdown table (and writes it with `--output`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import DapsModel  # noqa: E402
from training import objective  # noqa: E402
from training.data import binarize, load_image_splits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished DAPS run folder (or any saved DapsModel) with a Bernoulli likelihood")
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=6)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--rho", type=float, default=0.33)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the table here")
    options = parser.parse_args()
    torch.set_num_threads(1)
    model = DapsModel.from_pretrained(options.run).eval()
    if model.config.likelihood != "bernoulli":
        raise SystemExit(f"{options.run}: likelihood {model.config.likelihood!r}; the binarisation applies to "
                         "Bernoulli models only.")
    images = load_image_splits(options.dataset, image_size=model.config.image_size, seed=0).train[:options.images]
    k = options.num_samples
    with torch.no_grad():
        memory = model.encode_patches(images)
        codes, log_q = model._sample_from_memory(memory, k, 1.0, torch.Generator().manual_seed(options.seed))
        expected = model.reconstruction_log_likelihood(images, codes)
        binarised = [model.reconstruction_log_likelihood(
            binarize(images, generator=torch.Generator().manual_seed(options.seed * 100 + 10 + i)), codes)
            for i in range(2)]

    def weigh(rewards):
        control = objective.make_eta_control("bisection", rho=options.rho, num_samples=k)
        eta = control.eta_for_step(rewards, log_q, options.beta, None)
        return objective.daps_weights(rewards, log_q, options.beta, eta, None), eta

    def centred(rewards):
        return rewards - rewards.mean(1, keepdim=True)

    (w_e, eta_e), (w_1, eta_1), (w_2, eta_2) = weigh(expected), weigh(binarised[0]), weigh(binarised[1])
    same = lambda a, b: (a.argmax(1) == b.argmax(1)).float().mean().item()  # noqa: E731
    tv = lambda a, b: 0.5 * (a - b).abs().sum(1).mean().item()  # noqa: E731
    rows = [
        ("reward spread over an image's K samples, expected targets (nats)", f"{centred(expected).std(1).mean():.2f}"),
        ("binarisation noise in the centred rewards (nats)",
         f"{(centred(binarised[0]) - centred(expected)).std(1).mean():.2f} / "
         f"{(centred(binarised[1]) - centred(expected)).std(1).mean():.2f}"),
        ("η: expected / binarisation 1 / binarisation 2", f"{eta_e:.2f} / {eta_1:.2f} / {eta_2:.2f}"),
        ("heaviest sample as with expected targets (binarisation 1 / 2)", f"{same(w_1, w_e):.3f} / {same(w_2, w_e):.3f}"),
        ("heaviest sample the same under the two binarisations", f"{same(w_1, w_2):.3f}"),
        ("total variation of the weights: binarised vs expected (1 / 2)", f"{tv(w_1, w_e):.3f} / {tv(w_2, w_e):.3f}"),
        ("total variation of the weights: the two binarisations", f"{tv(w_1, w_2):.3f}"),
    ]
    table = [f"`python benchmarks/reward_noise.py {options.run} --images {options.images} --num-samples {k} "
             f"--beta {options.beta} --seed {options.seed}`", "",
             f"| {len(images)} training images, K = {k}, β = {options.beta}, ρ = {options.rho} | value |", "|---|---:|"]
    table += [f"| {name} | {value} |" for name, value in rows]
    text = "\n".join(table) + "\n"
    print(text)
    if options.output:
        Path(options.output).write_text(text)


if __name__ == "__main__":
    main()
