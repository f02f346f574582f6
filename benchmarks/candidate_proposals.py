"""Where a DAPS step could find better codes: the gain in log p(x | z) over the greedy code of several proposals.

    python benchmarks/candidate_proposals.py benchmarks/runs/cifar-amx-7200s-cosine/daps_cosine_lr/seed0 --images 64
    python benchmarks/candidate_proposals.py RUN --images 64 --split test

On the first `--images` crops of a split (training crops by default: what a DAPS step sees) of a trained run (a conv decoder is needed for the per-token rewards), one
thread, each proposal's mean gain over the greedy code in nats (log p(x | z), the reward of a DAPS step), and its cost
in log q (how far the trust region has to move q to reach it):

- best of K samples at temperature 1 (what a DAPS step chooses between) and at temperature 4;
- a composite of the K samples and the greedy code: at each position, the code of the candidate whose
  log-likelihood over the 3 × 3 grid cells around that position is highest (one more decode);
- gradient-guided switches: one backward pass through the decoder at the greedy code gives ∂ log p / ∂e_t for
  each token's embedding; the n tokens whose best first-order switch gains most are switched (n = 1, 4, 16, 64);
- an embedding-space step: each token's code becomes the code nearest e_t + α ∂ log p / ∂e_t (α swept);
- local search (`encode(search="local")`, 4 codes per position, one sweep) and parallel local search
  (`encode(search="parallel")`, the same), for scale.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import DapsModel  # noqa: E402
from training.data import load_image_splits  # noqa: E402
from training.trainer import to_model_input  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a DAPS run folder written by `daps train` (conv decoder)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--samples", type=int, default=6, help="K (default 6, the cifar recipe's)")
    parser.add_argument("--dataset", default="photo-crops")
    parser.add_argument("--split", choices=("train", "validation", "test"), default="train")
    parser.add_argument("--output", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DapsModel.from_pretrained(args.folder).eval()
    config = model.config
    rows, columns = model.check_token_cells()
    splits = load_image_splits(args.dataset, image_size=config.image_size, num_channels=config.num_channels)
    images = getattr(splits, args.split)
    x = to_model_input(images[:args.images], config)
    table = model.code_embedding_weight.detach()

    def score(codes: torch.Tensor) -> torch.Tensor:                                  # (B, L) → log p(x | z), (B,)
        return model._reconstruction_log_likelihood(x, codes[:, None])[0][:, 0]

    def log_q(codes: torch.Tensor) -> torch.Tensor:
        return model._log_prob_from_memory(memory, codes[:, None])[:, 0]

    lines = [f"`python benchmarks/candidate_proposals.py {' '.join(sys.argv[1:])}` — {platform.machine()}, torch "
             f"{torch.__version__}, 1 thread; first {args.images} images of the {args.split} split; gains over the greedy "
             f"code", "",
             "| proposal | mean gain in log p(x \\| z) (nats) | share of images improved | tokens ≠ greedy | "
             "log q − log q(greedy) (nats) |", "|---|---|---|---|---|"]

    def row(name: str, codes: torch.Tensor) -> None:
        gain = score(codes) - base
        lines.append(f"| {name} | {gain.mean():.1f} | {(gain > 1e-3).float().mean():.2f} | "
                     f"{(codes != greedy).float().sum(1).mean():.1f} | {(log_q(codes) - base_q).mean():.0f} |")
        print(lines[-1], flush=True)

    with torch.no_grad():
        memory = model.encode_patches(x)
        greedy = model._sample_from_memory(memory, None, 1.0, None)[0][:, 0]
        base, base_q = score(greedy), log_q(greedy)
        for temperature in (1.0, 4.0):
            samples, _ = model._sample_from_memory(memory, args.samples, temperature, torch.Generator().manual_seed(1))
            rewards, _ = model._reconstruction_log_likelihood(x, samples, per_token=True)         # (B, K, L)
            best = samples[torch.arange(len(x)), rewards.sum(-1).argmax(1)]
            row(f"best of {args.samples} samples, temperature {temperature:g}", best)
            candidates = torch.cat([greedy[:, None], samples], 1)
            token_rewards, _ = model._reconstruction_log_likelihood(x, candidates, per_token=True)
            grid = token_rewards.reshape(-1, 1, rows, columns)
            credited = (F.avg_pool2d(grid, 3, 1, 1, count_include_pad=True) * 9).reshape(token_rewards.shape)
            composite = candidates.gather(1, credited.argmax(1)[:, None])[:, 0]
            row(f"composite of greedy + {args.samples} samples (3 × 3 cells), temperature {temperature:g}", composite)
    embeddings = F.embedding(greedy, table).requires_grad_(True)
    reward = model.log_likelihood(x, model.likelihood_parameters(embeddings)).sum()
    (gradient,) = torch.autograd.grad(reward, embeddings)
    with torch.no_grad():
        gain = gradient.float() @ table.float().T
        gain = gain - gain.gather(-1, greedy[..., None])
        best_gain, best_code = gain.max(-1)
        ranks = best_gain.argsort(1, descending=True).argsort(1)
        for n in (1, 4, 16, 64):
            row(f"gradient-guided: the {n} tokens of largest first-order gain switched",
                torch.where((ranks < n) & (best_gain > 0), best_code, greedy))
        for alpha in (0.01, 0.03, 0.1, 0.3):
            target = (embeddings.detach() + alpha * gradient).reshape(-1, table.shape[1])
            row(f"embedding step α = {alpha:g}, nearest code", torch.cdist(target, table).argmin(-1).view_as(greedy))
        row("local search, 4 codes × 1 sweep", model.encode(x, search="local", num_candidates=4, num_sweeps=1).codes)
        row("parallel local search, 4 codes × 1 sweep",
            model.encode(x, search="parallel", num_candidates=4, num_sweeps=1).codes)
    report = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
