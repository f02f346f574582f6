"""Search encoding against greedy: quality, rate and time on the held-out test split, for trained tokenizer folders.

    python benchmarks/search_encoding.py benchmarks/runs/cifar-amx-600s/daps/seed0 benchmarks/runs/cifar-amx-600s/fsq/seed0
    python benchmarks/search_encoding.py RUN --images 256 --local 4:1 4:2 8:2 --best-of 16 --parallel 4:1 4:2 4:4

For each folder, on the first `--images` test images of the dataset the run was trained on (`train_args.json`), in
one thread: greedy codes; optionally one sample at given temperatures; best-of-n (`encode(search="best-of-n")`); and local search (`encode(search="local")`,
`num_candidates:num_sweeps` per `--local` entry); and parallel local search (`encode(search="parallel")`, the same
setting format per `--parallel` entry; conv decoder only); with `--objectives likelihood squared_error`, each search
also maximising minus the squared error (rows marked "for PSNR") instead of log p(x | z). Reported: PSNR and SSIM of the reconstruction, log p(x | z) per image
(nats), the rate −log q(z | x) of the chosen code (nats per image; greedy codes are what an entropy coder driven by
the encoder would pay), the share of tokens that differ from greedy, and CPU seconds per image. A deterministic
quantiser (FSQ, VQ) has no samples, so it has no best-of-n or sampled rows; its local and parallel searches try the
lattice points or codebook vectors nearest its latent at each position.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenizer import DapsModel  # noqa: E402
from training.data import load_image_splits  # noqa: E402
from training.evaluation import psnr, ssim, to_unit_range  # noqa: E402
from training.trainer import to_model_input  # noqa: E402


SUFFIX = {"likelihood": "", "squared_error": ", for PSNR"}  # the row names of the search objectives


def parse_local(spec: str) -> tuple[int, int]:
    candidates, _, sweeps = spec.partition(":")
    try:
        return int(candidates), int(sweeps or 1)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--local takes CANDIDATES:SWEEPS, e.g. 4:2, got {spec!r}") from error


def measure(model: DapsModel, images: torch.Tensor, encode, batch: int) -> dict:
    config = model.config
    codes, seconds = [], 0.0
    for start in range(0, len(images), batch):
        x = to_model_input(images[start:start + batch], config)
        started = time.process_time()
        codes.append(encode(x).codes)
        seconds += time.process_time() - started
    codes = torch.cat(codes)
    with torch.no_grad():
        x = to_model_input(images, config)
        reconstruction = to_unit_range(model.decode(codes).pixel_values, config.likelihood)
        log_likelihood = model.reconstruction_log_likelihood(x, codes)
        rate = -model.log_prob(x, codes) if config.quantizer == "categorical" else None
    return {
        "codes": codes, "psnr": psnr(reconstruction, images).mean().item(),
        "ssim": ssim(reconstruction, images).mean().item(), "log_likelihood": log_likelihood.mean().item(),
        "rate_nats": None if rate is None else rate.mean().item(), "seconds_per_image": seconds / len(images),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="tokenizer folders written by `daps train`")
    parser.add_argument("--images", type=int, default=256, help="first N test images (default 256)")
    parser.add_argument("--best-of", type=int, nargs="*", default=[16], help="best-of-n candidates (default 16)")
    parser.add_argument("--local", type=parse_local, nargs="*", default=[(4, 1), (4, 2)],
                        help="local search settings CANDIDATES:SWEEPS (default 4:1 4:2)")
    parser.add_argument("--parallel", type=parse_local, nargs="*", default=[],
                        help="parallel local search settings CANDIDATES:SWEEPS (default none)")
    parser.add_argument("--sample-temperatures", type=float, nargs="*", default=[],
                        help="also one sampled code per image at each of these temperatures (no search)")
    parser.add_argument("--objectives", nargs="+", default=["likelihood"], choices=["likelihood", "squared_error"],
                        help="what the searches maximise (`encode(search_objective=...)`); one row per objective")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dataset", default=None, help="default: the run's train_args.json dataset")
    parser.add_argument("--output", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    lines = [f"`python benchmarks/search_encoding.py {' '.join(sys.argv[1:])}` — {platform.machine()}, torch "
             f"{torch.__version__}, 1 thread; first {args.images} test images; CPU seconds per image of encoding", "",
             "| run | encoding | PSNR (dB) | SSIM | log p(x \\| z) (nats) | rate −log q (nats) | tokens ≠ greedy | "
             "s per image |", "|---|---|---|---|---|---|---|---|"]
    for folder in args.folders:
        folder = Path(folder)
        model = DapsModel.from_pretrained(folder).eval()
        config = model.config
        run_args_path = folder / "train_args.json"
        dataset = args.dataset or (json.loads(run_args_path.read_text())["dataset"] if run_args_path.exists()
                                   else "photo-crops")
        images = load_image_splits(dataset, image_size=config.image_size,
                                   num_channels=config.num_channels).test[:args.images]
        encodings = {"greedy": lambda x: model.encode(x)}
        if config.quantizer == "categorical":
            for n in args.best_of:
                for objective in args.objectives:
                    encodings[f"best-of-{n}{SUFFIX[objective]}"] = (lambda n, objective: lambda x: model.encode(
                        x, search="best-of-n", num_candidates=n, generator=torch.Generator().manual_seed(0),
                        search_objective=objective))(n, objective)
            for tau in args.sample_temperatures:
                encodings[f"1 sample at temperature {tau:g}"] = (lambda tau: lambda x: type(
                    "Codes", (), {"codes": model.encode(x, num_samples=1, temperature=tau,
                                                       generator=torch.Generator().manual_seed(0)).codes[:, 0]}))(tau)
        # FSQ and VQ codes are searched too: the codes tried are the lattice points or codebook vectors nearest the
        # encoder's latent (`DapsModel._search_candidates`).
        for search, settings in (("local", args.local), ("parallel", args.parallel)):
            for (n, sweeps), objective in ((setting, objective) for setting in settings
                                           for objective in args.objectives):
                encodings[f"{search} {n} × {sweeps} sweeps{SUFFIX[objective]}"] = (
                    lambda search, n, sweeps, objective: lambda x: model.encode(
                        x, search=search, num_candidates=n, num_sweeps=sweeps, search_objective=objective)
                )(search, n, sweeps, objective)
        greedy_codes = None
        for name, encode in encodings.items():
            result = measure(model, images, encode, args.batch)
            if greedy_codes is None:
                greedy_codes = result["codes"]
            changed = (result["codes"] != greedy_codes).float().mean().item()
            rate = "–" if result["rate_nats"] is None else f"{result['rate_nats']:.1f}"
            lines.append(f"| {folder} | {name} | {result['psnr']:.2f} | {result['ssim']:.3f} | "
                         f"{result['log_likelihood']:.0f} | {rate} | {changed:.3f} | "
                         f"{result['seconds_per_image']:.3f} |")
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
