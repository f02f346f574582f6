"""Quality at equal bits and equal wall-clock: DAPS against the baselines, same data, decoder, loop and evaluation.

    python benchmarks/quality.py --setting mnist --budget 300            # every method, 5 CPU-minutes each
    python benchmarks/quality.py --setting cifar --budget 600 --methods daps fsq vq
    python benchmarks/quality.py --setting mnist --ablation --budget 150  # DAPS levers at equal wall-clock
    python benchmarks/quality.py --quick                                   # smoke check, a few minutes

Each run is `daps train` in its own process with one torch thread (two side by side on a 2-core machine do not
slow each other, DESIGN.md), stopped by `--max_time` (training time only: periodic evaluations are not charged).
Final figures are on the held-out **test** split, which nothing is tuned on; the validation split gives the
PSNR-against-time curves. Each run is evaluated in a child process as soon as it has trained, so evaluations overlap
the training of the runs still going; `--reuse` evaluates finished run folders again without training them (after
an interrupted evaluation). Writes `benchmarks/results/<name>.json`, `<name>.md` and PNGs; RESULTS.md cites them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {
    # name: dataset, preset, extra training arguments (same for every method)
    "mnist": ("mnist-5k", "mnist", ["--batch_size", "128"]),
    "cifar": ("photo-crops", "cifar", ["--batch_size", "32"]),
    "digits": ("digits", "mnist", ["--batch_size", "64"]),
}
METHODS = ["daps", "daps-na", "fsq", "vq", "gumbel", "gumbel-na"]

# DAPS levers, each one change from the default recipe, measured at equal wall-clock (issue: make DAPS win).
ABLATION = {
    "default (K=6 keep 2, head 0.3, decoder on q*, exact η)": [],
    "keep all K (no trimming)": ["--update_samples", "6"],
    "head init 0.02 (q starts uniform)": ["--head_initializer_range", "0.02"],
    "K=4, all kept, head 0.02 (session-1 default)": ["--num_samples", "4", "--update_samples", "4",
                                                     "--head_initializer_range", "0.02"],
    "K=8 keep 3": ["--num_samples", "8", "--update_samples", "3"],
    "K=8, all kept (paper)": ["--num_samples", "8", "--update_samples", "8"],
    "η: reference Adam control (η0 100, lr 1e-3)": ["--eta_control", "adam"],
    "η: Adam control from η0 1, lr 0.05": ["--eta_control", "adam", "--initial_eta", "1", "--eta_learning_rate", "0.05"],
    "decoder on all K samples (paper)": ["--decoder_weighting", "uniform"],
    "init std 0.02 everywhere": ["--initializer_range", "0.02", "--head_initializer_range", "0.02"],
    "rho 0.1": ["--ess_target", "0.1"],
    "lr 3e-4 (paper)": ["--learning_rate", "3e-4"],
    "batch 64": ["--batch_size", "64"],
}


def run_folder(out: Path, name: str, seed: int) -> Path:
    return out / name.replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "").replace(":", "") \
        .replace(",", "").replace("→", "-").replace("*", "star").replace("=", "-") / f"seed{seed}"


def run_one(name: str, dataset: str, preset: str, extra: list[str], budget: float, seed: int, out: Path,
            eval_every: int, threads: int) -> Path:
    folder = run_folder(out, name, seed)
    command = [sys.executable, "-m", "training", "train", "--dataset", dataset, "--preset", preset,
               "--max_time", str(budget), "--time_clock", "process", "--max_steps", "10000000", "--output_dir", str(folder),
               "--eval_every", str(eval_every), "--eval_images", "500", "--save_every", "0", "--progress", "false",
               "--num_threads", str(threads), "--seed", str(seed), "--overwrite_output_dir", "true", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"seed{seed}.log", "w") as log:
        subprocess.run(command, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return folder


def test_metrics(folder: Path, dataset: str, num_candidates: int, fid_images: int = 0,
                 test_images: int | None = None) -> dict:
    """Held-out test-split metrics: greedy codes, one sample, best-of-n search for categorical encoders, and local
    search (4 codes per position, one sweep) for every method. `test_images`: only the first N test images (the
    split is shuffled, so a prefix is a uniform sample of it); None: all."""
    from tokenizer import DapsModel
    from training.data import binarize_fixed, load_image_splits
    from training.evaluation import evaluate, psnr, to_unit_range
    from training.trainer import to_model_input

    model = DapsModel.from_pretrained(folder).eval()
    config = model.config
    splits = load_image_splits(dataset, image_size=config.image_size, num_channels=config.num_channels)
    images = splits.test if test_images is None else splits.test[:test_images]
    targets = binarize_fixed(images, seed=0) if config.likelihood == "bernoulli" else None
    metrics = evaluate(model, images, binarized_targets=targets, generator=torch.Generator().manual_seed(0))
    if fid_images:
        # FID of greedy reconstructions against the originals, on the first `fid_images` test images (the optional
        # `fid` extra; ~0.17 s per image on one core here, hence a subset).
        metrics["fid"] = evaluate(model, images[:fid_images], binarized_targets=None if targets is None
                                  else targets[:fid_images], compute_fid=True)["fid"]
    if config.quantizer == "categorical":
        values, started = [], time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        for start in range(0, len(images), 128):
            batch = images[start:start + 128]
            codes = model.encode(to_model_input(batch, config), search="best-of-n", num_candidates=num_candidates,
                                 generator=generator).codes
            reconstruction = to_unit_range(model.decode(codes).pixel_values, config.likelihood)
            values.append(psnr(reconstruction, batch))
        metrics[f"psnr_best_of_{num_candidates}"] = torch.cat(values).mean().item()
        metrics["best_of_n_seconds"] = time.perf_counter() - started
    # Search encoding for every method (FSQ and VQ codes are searched too, from the lattice points nearest their
    # latent): parallel local search with the conv decoder, the sequential one otherwise; 4 codes per position, one
    # sweep. CPU seconds per image, so its cost stands next to its gain.
    search = "parallel" if config.decoder_type == "conv" else "local"
    values, started = [], time.process_time()
    for start in range(0, len(images), 128):
        batch = images[start:start + 128]
        codes = model.encode(to_model_input(batch, config), search=search, num_candidates=4, num_sweeps=1).codes
        values.append(psnr(to_unit_range(model.decode(codes).pixel_values, config.likelihood), batch))
    metrics["search"] = f"{search} 4×1"
    metrics["psnr_search"] = torch.cat(values).mean().item()
    metrics["search_seconds_per_image"] = (time.process_time() - started) / len(images)
    return metrics


def evaluate_in_child(folder: Path, dataset: str, num_candidates: int, fid_images: int, threads: int,
                      test_images: int | None = None) -> dict:
    """`test_metrics` in a child process with `threads` torch threads (so a finished run's evaluation overlaps the
    other runs' training); the child writes `test_metrics.json` into the run folder, which this returns."""
    command = [sys.executable, str(Path(__file__).resolve()), "--evaluate", str(folder), "--dataset", dataset,
               "--num-candidates", str(num_candidates), "--fid-images", str(fid_images), "--threads", str(threads)]
    if test_images is not None:
        command += ["--test-images", str(test_images)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(folder.parent / f"{folder.name}-evaluation.log", "w") as log:
        subprocess.run(command, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return json.loads((folder / "test_metrics.json").read_text())["metrics"]


def train_and_evaluate(job_name: str, seed: int, args, dataset: str, preset: str, extra: list[str], out: Path,
                       eval_every: int) -> tuple[Path, dict]:
    """One job: train (unless --reuse finds the run finished), then its held-out evaluation in a child process."""
    folder = run_folder(out, job_name, seed)
    if not (args.reuse and (folder / "metrics.json").exists()):
        folder = run_one(job_name, dataset, preset, extra, args.budget, seed, out, eval_every, args.threads)
    return folder, evaluate_in_child(folder, dataset, args.num_candidates, args.fid_images, args.threads,
                                     args.test_images)


def curve(folder: Path) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [(row["time"], row["eval/psnr"]) for row in rows if "eval/psnr" in row]


def time_to_reach(points: list[tuple[float, float]], level: float) -> float | None:
    for seconds, value in points:
        if value >= level:
            return seconds
    return None


def fmt(values: list[float | None], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="mnist")
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--ablation", action="store_true", help="Run the DAPS levers instead of the methods.")
    parser.add_argument("--budget", type=float, default=300, help="Training seconds per run.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--parallel", type=int, default=2, help="Runs side by side (one thread each).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=None, help="Validation curve every N steps.")
    parser.add_argument("--num-candidates", type=int, default=16)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="An extra DAPS run: a name (without '='), '=', then `daps train` flags, e.g. "
                             "'beta 0.1=--beta_start 0.1'. Repeatable; with --ablation adds to its rows, otherwise "
                             "replaces the method list unless --methods is given too.")
    parser.add_argument("--fid-images", type=int, default=0,
                        help="Also report FID of greedy reconstructions on this many test images (needs the fid extra).")
    parser.add_argument("--quick", action="store_true", help="60 s per run, mnist, four methods: a smoke check.")
    parser.add_argument("--name", default=None, help="Results name (default: setting[-ablation]-budget).")
    parser.add_argument("--reuse", action="store_true",
                        help="Skip training for runs whose folder holds a finished run (metrics.json), e.g. when an "
                             "earlier invocation was interrupted during its evaluation; evaluate them again.")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="FOLDER",
                        help="Internal: evaluate one trained folder on the test split and write test_metrics.json.")
    parser.add_argument("--test-images", type=int, default=None,
                        help="Test metrics on the first N test images only (a uniform sample: the split is "
                             "shuffled); default all. The photo-crops folds' test splits hold up to 8,834 crops.")
    parser.add_argument("--dataset", default=None,
                        help="Train and test on this dataset instead of the setting's (same preset and batch), e.g. "
                             "photo-crops-fold2 for the cifar setting with other held-out photographs. With --evaluate: "
                             "the dataset the folder was trained on.")
    args = parser.parse_args()
    if args.test_images is not None and args.test_images < 1:
        parser.error(f"--test-images must be >= 1, got {args.test_images}.")
    if args.evaluate is not None:
        if args.dataset is None or not (args.evaluate / "config.json").exists():
            parser.error("--evaluate FOLDER needs --dataset and a trained tokenizer folder (with config.json).")
        torch.set_num_threads(args.threads)
        metrics = test_metrics(args.evaluate, args.dataset, args.num_candidates, args.fid_images, args.test_images)
        payload = {"num_candidates": args.num_candidates, "fid_images": args.fid_images, "metrics": metrics}
        temporary = args.evaluate / "test_metrics.json.tmp"
        temporary.write_text(json.dumps(payload, indent=1))
        temporary.replace(args.evaluate / "test_metrics.json")
        return
    if args.quick:
        args.budget, args.setting = 60, "mnist"
        args.methods = args.methods or ["daps", "fsq", "vq", "gumbel-na"]
    dataset, preset, extra = SETTINGS[args.setting]
    dataset = args.dataset or dataset
    variants = {}
    for spec in args.variant:
        name, separator, flags = spec.partition("=")
        if not separator or not name.strip():
            parser.error(f"--variant needs NAME=FLAGS, got {spec!r}")
        if any(not flag.startswith("-") for flag in flags.split()[:1]):
            parser.error(f"--variant {spec!r}: the flags after the first '=' must start with a '--' option "
                         f"(a NAME cannot contain '=')")
        variants[name.strip()] = extra + flags.split()
    if args.ablation:
        runs = {name: extra + change for name, change in ABLATION.items()}
    elif variants and not args.methods:
        runs = {}
    else:
        runs = {method: extra + ["--method", method] for method in (args.methods or METHODS)}
    runs.update(variants)
    name = args.name or f"{args.setting}{'-ablation' if args.ablation else ''}-{int(args.budget)}s"
    out = REPO / "benchmarks" / "runs" / name
    results_dir = REPO / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    eval_every = args.eval_every or (200 if args.setting in ("mnist", "digits") else 20)

    jobs = [(run, seed) for run in runs for seed in args.seeds]
    print(f"{len(jobs)} runs of {args.budget:.0f} s, {args.parallel} at a time, {args.threads} thread(s) each")
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {job: pool.submit(train_and_evaluate, job[0], job[1], args, dataset, preset, runs[job[0]], out,
                                    eval_every) for job in jobs}
        finished = {job: future.result() for job, future in futures.items()}
    folders = {job: folder for job, (folder, _) in finished.items()}

    table = {}
    for run in runs:
        per_seed = []
        for seed in args.seeds:
            folder, metrics = finished[(run, seed)]
            train_metrics = json.loads((folder / "metrics.json").read_text())
            per_seed.append({**metrics, "steps": train_metrics["steps"], "validation_psnr": train_metrics["psnr"],
                             "train_seconds": train_metrics["training_seconds"], "curve": curve(folder),
                             **{key: train_metrics[key] for key in ("best_model_step", "best_model_eval_psnr")
                                if key in train_metrics}})
        table[run] = per_seed
        print(run, fmt([m["psnr"] for m in per_seed]), "dB")

    # The compute question: time for each method to reach the best baseline's final (validation) PSNR.
    baselines = [r for r in runs if r in ("fsq", "vq", "gumbel", "gumbel-na")]
    reference = max((statistics.mean(m["curve"][-1][1] for m in table[r]) for r in baselines), default=None) \
        if baselines and all(table[r][0]["curve"] for r in baselines) else None

    lines = [f"### {name}", "",
             f"`python benchmarks/quality.py {' '.join(sys.argv[1:])}` — {date.today()}, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {args.threads} thread(s) per run, {args.parallel} runs side by side, "
             f"{args.budget:.0f} s of training each (process CPU time, `--time_clock process`), seeds {args.seeds}. Dataset `{dataset}`, preset `{preset}`; "
             f"held-out **test** split" + (f" (its first {args.test_images} images)" if args.test_images else "")
             + "; PSNR on [0, 1] images.", ""]
    search_key = f"psnr_best_of_{args.num_candidates}"
    lines += ["| run | steps | val PSNR | test PSNR greedy (dB) | PSNR 1 sample | PSNR best-of-" + str(args.num_candidates)
              + " | PSNR searched, 4×1 (s/img) | SSIM" + (f" | FID ({args.fid_images} imgs)" if args.fid_images else "")
              + " | β-ELBO (nats) | −ELBO (bits) | code usage | perplexity | s to reach ref |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.fid_images else "")]
    for run, per_seed in table.items():
        reach = [time_to_reach(m["curve"], reference) if reference is not None else None for m in per_seed]
        lines.append("| " + " | ".join([
            run, fmt([m["steps"] for m in per_seed], 0), fmt([m["validation_psnr"] for m in per_seed]),
            fmt([m["psnr"] for m in per_seed]),
            fmt([m["psnr_sampled"] for m in per_seed]), fmt([m.get(search_key) for m in per_seed]),
            f"{fmt([m.get('psnr_search') for m in per_seed])} "
            f"({fmt([m.get('search_seconds_per_image') for m in per_seed], 3)})",
            fmt([m["ssim"] for m in per_seed], 3),
            *([fmt([m.get("fid") for m in per_seed], 1)] if args.fid_images else []),
            fmt([m.get("beta_elbo_nats") for m in per_seed], 1),
            fmt([m.get("neg_elbo_bits") for m in per_seed], 1), fmt([m["code_usage"] for m in per_seed], 3),
            fmt([m["code_perplexity"] for m in per_seed], 1),
            ("never" if reference is not None and all(r is None for r in reach) else fmt(reach, 0)),
        ]) + " |")
    if reference is not None:
        lines += ["", f"Reference for the last column: the best baseline's final validation PSNR, {reference:.2f} dB."]
    markdown = "\n".join(lines) + "\n"
    (results_dir / f"{name}.md").write_text(markdown)
    (results_dir / f"{name}.json").write_text(json.dumps({"command": sys.argv, "runs": table}, indent=1))

    from training.plots import save_psnr_vs_time, save_reconstruction_grid

    save_psnr_vs_time({run: table[run][0]["curve"] for run in runs}, results_dir / f"{name}-psnr-vs-time.png",
                      title=f"{name}: held-out PSNR against training seconds")
    from tokenizer import DapsModel
    from training.data import load_image_splits
    from training.evaluation import reconstruct_examples

    first = folders[(next(iter(runs)), args.seeds[0])]
    config = DapsModel.from_pretrained(first).config
    images = load_image_splits(dataset, image_size=config.image_size, num_channels=config.num_channels).test[:10]
    rows = {}
    for run in runs:
        _, reconstruction = reconstruct_examples(DapsModel.from_pretrained(folders[(run, args.seeds[0])]).eval(),
                                                 images, n=10)
        rows[run] = reconstruction
    first_run = next(iter(runs))
    save_reconstruction_grid(images, rows.pop(first_run), results_dir / f"{name}-reconstructions.png",
                             title=f"{name}: test images, then each run's greedy reconstruction",
                             extra_rows=rows, reconstruction_label=first_run)
    print(markdown)


if __name__ == "__main__":
    main()
