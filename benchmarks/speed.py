"""Speed of the DAPS tokenizer: inference, the trainer's training steps, FLOPs, efficiency, scaling, bf16 parity.

What the default run measures, all in one process so that the figures are comparable:

1. The machine's limit: fp32 and bf16 GEMM throughput (n×n @ n×n, median over repeats) at the chosen thread count
   (on CUDA: on the GPU).
2. Per preset, at `--batch-size`, in `torch.inference_mode()` with `model.eval()`: greedy encode (KV cache, L
   sequential steps), sampled encode (`num_samples=1`), one teacher-forced `log_prob` pass, `decode`, in images/s;
   the ratio (greedy encode time) / (teacher-forced pass time), the median of the per-round ratios (each round
   times both back to back); parameter counts.
3. Per preset, one training step of the trainer's own methods (`training.trainer.build_config` / `build_method`,
   so `DapsMethod` with the default η control (`objective.make_eta_control`) and β schedule, `VqMethod`,
   `FsqMethod`, each on the preset's backbone as `daps train --method ...` builds it): forward (under
   `torch.autocast(device, dtype=torch.bfloat16)` for bf16, as Accelerate's `--mixed_precision bf16`), backward,
   `clip_grad_norm_`, AdamW step, the method's `after_step`. DAPS at K = 8 (the paper's) and K = 4 (the trainer's
   default); every method × dtype is timed interleaved, and the DAPS/VQ and DAPS/FSQ step-time ratios are the
   medians of the per-round ratios. (Not included: the trainer's data loading, logging and learning-rate scheduler.)
4. FLOPs per image, counted with `torch.utils.flop_counter.FlopCounterMode`, and every measured speed also as a
   fraction of the measured GEMM limit of the same dtype (achieved GFLOP/s / limit).
5. The default `daps train` (`python -m training train`, mnist-5k, batch 128, K = 4) for `--default-train-steps`
   steps in a child process: steps/s from its metrics.json (training time only) and the child's peak RSS
   (`ru_maxrss`), which is what `/usr/bin/time -v` reports as "Maximum resident set size".

Extra modes (each writes its own report under benchmarks/results/):

- `--scaling`: greedy encode and DAPS training-step time against batch size, K, L (num_tokens) and image size on
  the cifar backbone, and one measured step of the imagenet preset, to plan a larger run.
- `--parity`: bf16 against fp32 training "after the same steps": `python -m training train` twice from the same
  seed (`--mixed_precision no` and `bf16`), same steps, then the held-out PSNR of both and its difference.

FLOP counting: FlopCounterMode counts matrix products (mm, addmm, bmm, baddbmm), convolutions (including transposed
ones, and their backward) and, through a mapping added here, the CPU attention kernels
(`_scaled_dot_product_flash_attention_for_cpu` and its backward, which FlopCounterMode does not know of: without the
mapping it counts no attention at all). A multiply-add is 2 FLOPs. Causal attention is counted as the full square
(as FlopCounterMode does for every attention kernel); cached attention steps are counted at their real prefix length.
Not counted: element-wise work, layer norms, softmax / log-softmax, GELU/SiLU, embedding look-ups, Gumbel noise,
argmax, the loss, the η solve, the optimiser update. Every FLOP figure is counted once in fp32 and used for both
dtypes.

Methodology: `torch.set_num_threads(--threads)` (1 by default: on this shared 2-core machine single-thread timings
are the stable ones); warm-up before timing; the variants compared (every operation × dtype, or every method ×
dtype) are timed interleaved in one loop, the order rotated each round, so that noise hits them alike; the figure
reported is the median over rounds. A time budget per section (`--section-budget-s`) may stop a section before
`--repeats` rounds (never before 3); the table states the rounds actually used. On CUDA (`--device cuda`, or
`auto` when a GPU is visible) every timed call is bracketed by `torch.cuda.synchronize()`.

    python benchmarks/speed.py                     # mnist + cifar, 1 thread, fp32 + bf16, default train (~5 min)
    python benchmarks/speed.py --quick             # smoke run (~1 min)
    python benchmarks/speed.py --presets cifar --profile   # adds torch.profiler tables (greedy encode, bf16 step)
    python benchmarks/speed.py --scaling           # scaling tables (~5 min)
    python benchmarks/speed.py --parity --steps 150        # bf16 vs fp32 held-out PSNR on photo-crops (~10 min)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizer.configuration_daps import DapsConfig  # noqa: E402
from tokenizer.modeling_daps import DapsModel  # noqa: E402

OPERATIONS = ("greedy", "sampled", "log_prob", "decode")
OPERATION_TITLES = {
    "greedy": "greedy encode",
    "sampled": "sampled encode (K=1)",
    "log_prob": "teacher-forced log_prob",
    "decode": "decode",
}
# The dataset `daps train` pairs with each preset (training/arguments.py DATASET_PRESETS); only its β schedule and
# name matter here, the benchmark feeds random images of the preset's size.
PRESET_DATASETS = {"mnist": "mnist-5k", "cifar": "photo-crops", "imagenet": "photo-crops", "tiny": "photo-crops"}


# ----------------------------------------------------------------------------------------------- helpers
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["mnist", "cifar"], choices=list(DapsConfig.presets))
    parser.add_argument("--batch-size", type=int, default=None, help="inference batch (default 256; --quick: 64)")
    parser.add_argument("--train-batch-size", type=int, default=None,
                        help="images per training step (default 32; --quick: 8). A cifar DAPS step at 256 images "
                             "× K=8 takes about a minute on one thread.")
    parser.add_argument("--num-samples", type=_daps_step, nargs="+", default=[(8, 8), (4, 4), (6, 2)],
                        help="the DAPS training steps timed, each K (all K samples kept for the update, the paper's "
                             "step) or K:M (M of them kept, `--update_samples M`); default: 8 (the paper's), 4, and "
                             "6:2 (the trainer's default)")
    parser.add_argument("--methods", nargs="+", default=["daps", "vq", "fsq"], choices=["daps", "vq", "fsq"],
                        help="training methods timed (default: daps vq fsq)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when a GPU is visible, else cpu")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per inference section (default 12; --quick: 3); training uses half, "
                             "at least 3")
    parser.add_argument("--section-budget-s", type=float, default=None,
                        help="stop a section's rounds after this many seconds, never before 3 rounds "
                             "(default 75; training sections 2×; --quick: 8)")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--gemm-size", type=int, default=2048, help="n of the n×n GEMM limit (default 2048)")
    parser.add_argument("--default-train-steps", type=int, default=None,
                        help="steps of the default `daps train` timed in a child process (default 300; --quick: 30; "
                             "0 skips it)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches: a smoke run")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one fp32 greedy encode and one bf16 DAPS step per preset (top ops)")
    parser.add_argument("--scaling", action="store_true",
                        help="run the scaling study instead (batch, K, L, image size; imagenet preset)")
    parser.add_argument("--parity", action="store_true",
                        help="run the bf16-vs-fp32 training parity check instead (two `daps train` runs)")
    parser.add_argument("--steps", type=int, default=150, help="--parity: training steps per run (default 150)")
    parser.add_argument("--parity-preset", default="cifar", choices=["mnist", "cifar"],
                        help="--parity: cifar on photo-crops (default) or mnist on mnist-5k")
    parser.add_argument("--parity-batch-size", type=int, default=32, help="--parity: batch size (default 32)")
    parser.add_argument("--parity-seeds", type=int, nargs="+", default=[0],
                        help="--parity: seeds; a second seed gives the fp32 seed-to-seed spread as a noise scale")
    parser.add_argument("--runs-dir", default="benchmarks/runs", help="where child training runs write (git-ignored)")
    parser.add_argument("--output", default=None,
                        help="report file (default benchmarks/speed_results.md; --scaling: "
                             "benchmarks/results/speed-scaling.md; --parity: benchmarks/results/speed-parity.md)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 64 if args.quick else 256
    if args.train_batch_size is None:
        args.train_batch_size = 8 if args.quick else 32
    if args.repeats is None:
        args.repeats = 3 if args.quick else 12
    if args.section_budget_s is None:
        args.section_budget_s = 8.0 if args.quick else 75.0
    if args.default_train_steps is None:
        args.default_train_steps = 30 if args.quick else 300
    if args.output is None:
        args.output = ("benchmarks/results/speed-scaling.md" if args.scaling else
                       "benchmarks/results/speed-parity.md" if args.parity else "benchmarks/speed_results.md")
    if args.scaling and args.parity:
        parser.error("--scaling and --parity are separate runs")
    args.daps_steps = args.num_samples
    args.num_samples = [k for k, _ in args.daps_steps]
    if min(args.batch_size, args.train_batch_size, *args.num_samples, args.threads, args.repeats, args.steps) < 1:
        parser.error("sizes, threads, steps and repeats must be >= 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible to torch")
    return args


def _daps_step(text: str) -> tuple[int, int]:
    """'K' → (K, K); 'K:M' → (K, M), the samples drawn and the samples kept for the update."""
    try:
        k, _, m = text.partition(":")
        k, m = int(k), int(m or k)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or K:M, got {text!r}") from None
    if not 1 <= m <= k:
        raise argparse.ArgumentTypeError(f"need 1 <= M <= K, got {text!r}")
    return k, m


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
                return ", ".join(flag for flag in wanted if flag in flags) or "none of avx2/avx512/amx"
    except OSError:
        pass
    return "unknown"


def device_description(device: str) -> str:
    if device == "cuda":
        return f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU: {cpu_model()} ({os.cpu_count()} logical cores visible; flags: {cpu_flags()})"


def autocast_context(dtype: str, device: str = "cpu"):
    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


_DEVICE = "cpu"  # set by main(); timed() synchronises around every call on CUDA


def timed(function) -> float:
    synchronize(_DEVICE)
    start = time.perf_counter()
    function()
    synchronize(_DEVICE)
    return time.perf_counter() - start


def median_time(function, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    return statistics.median(timed(function) for _ in range(repeats))


def load_average() -> float:
    return os.getloadavg()[0]


def command_line() -> str:
    return " ".join(shlex.quote(part) for part in ["python", *sys.argv])


def interleaved_medians(variants: dict, repeats: int, budget_s: float, warmup: int = 1) -> tuple[dict, int, dict]:
    """Time every variant once per round, rotating the order each round; medians after `warmup` untimed rounds.

    Returns ({name: median seconds}, rounds timed, {name: list of seconds}) so callers can pair rounds.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    start = time.perf_counter()
    rounds = 0
    try:
        while rounds < repeats:
            order = names[rounds % len(names):] + names[: rounds % len(names)]
            for name in order:
                samples[name].append(timed(variants[name]))
            rounds += 1
            if rounds >= 3 and time.perf_counter() - start > budget_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}, rounds, samples


# ----------------------------------------------------------------------------------------------- FLOP counting
def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v  # QKᵀ and PV


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    # Recomputed scores, dP = dO Vᵀ, dV = Pᵀ dO, dQ = dS K, dK = dSᵀ Q (as FlopCounterMode counts the GPU kernels).
    return 2 * b * h * s_q * s_k * (3 * d + 2 * d_v)


def _cpu_attention_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _attention_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _attention_backward_flops
    return mapping


def count_flops(function) -> tuple[int, dict]:
    """FLOPs of one call of `function` (matmuls, convolutions, attention; see the module docstring), by operator."""
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_mapping()) as counter:
        function()
    by_op = {str(op).replace("aten.", ""): int(count) for op, count in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op


# ----------------------------------------------------------------------------------------------- the model
def make_images(config: DapsConfig, batch_size: int, generator: torch.Generator, device: str = "cpu") -> torch.Tensor:
    shape = (batch_size, config.num_channels, config.image_size, config.image_size)
    images = torch.rand(shape, generator=generator)
    if config.likelihood == "bernoulli":
        images = (images > 0.5).float()  # binarised digits
    else:
        images = images * 2 - 1  # the processor's [-1, 1] normalisation
    return images.to(device)


def parameter_counts(model: DapsModel) -> dict:
    counts = {"encoder": 0, "decoder": 0, "other": 0}
    for name, parameter in model.named_parameters():
        if name.startswith(("patch_encoder.", "code_transformer.")):
            counts["encoder"] += parameter.numel()
        elif name.startswith(("code_embedding.", "decoder.")):
            counts["decoder"] += parameter.numel()
        else:  # the VQ codebook: shared by both sides
            counts["other"] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


class TrainingStep:
    """One optimiser step of the trainer's method, built as `daps train --preset P --method M --num_samples K` builds
    it (training.trainer.build_config / build_method: the default η control and β schedule for DAPS), on random
    images of the preset's size; `run(dtype)` does forward (autocast for bf16), backward, clip, AdamW, after_step."""

    def __init__(self, preset: str, method: str, num_samples: int, device: str, seed: int = 0,
                 image_size: int | None = None, **overrides):
        from training import trainer
        from training.arguments import TrainArguments

        # The step: K teacher-forced passes and K decodes with gradient (no --update_samples trimming).
        overrides.setdefault("update_samples", num_samples)
        arguments = TrainArguments(dataset=PRESET_DATASETS.get(preset, "photo-crops"), preset=preset, method=method,
                                   num_samples=num_samples, **overrides)
        self.args = trainer.resolve_defaults(arguments)
        base = DapsConfig.from_preset(preset)
        self.config, _ = trainer.build_config(self.args, image_size or base.image_size, base.num_channels)
        torch.manual_seed(seed)
        self.model = DapsModel(self.config).to(device).train()
        self.method = trainer.build_method(self.args, self.model, None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.args.learning_rate,
                                           weight_decay=self.args.weight_decay)
        self.max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        self.device = device
        self.name = method if method not in ("daps", "daps-na") else f"{method} K={num_samples}" + (
            f" keep {self.args.update_samples}" if self.args.update_samples != num_samples else "")

    def run(self, images: torch.Tensor, dtype: str, progress: float = 0.5) -> None:
        with autocast_context(dtype, self.device):
            out = self.method(images, images, progress)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        out["loss"].detach().item()  # the trainer's finiteness check reads the loss (a device sync on CUDA)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step()


def benchmark_inference(preset: str, args, generator: torch.Generator) -> dict:
    config = DapsConfig.from_preset(preset)
    model = DapsModel(config).to(args.device).eval()
    images = make_images(config, args.batch_size, generator, args.device)
    sampling_generator = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.inference_mode():
        codes = model.encode(images).codes

    def operation(name: str, dtype: str):
        def run():
            with torch.inference_mode(), autocast_context(dtype, args.device):
                if name == "greedy":
                    model.encode(images)
                elif name == "sampled":
                    model.encode(images, num_samples=1, generator=sampling_generator)
                elif name == "log_prob":
                    model.log_prob(images, codes)
                else:
                    model.decode(codes)
        return run

    flops = {}
    for name in OPERATIONS:
        total, by_op = count_flops(operation(name, "fp32"))
        flops[name] = {"per_image": total / args.batch_size, "by_op": by_op}

    variants = {(name, dtype): operation(name, dtype) for dtype in args.dtype for name in OPERATIONS}
    medians, rounds, samples = interleaved_medians(variants, args.repeats, args.section_budget_s)
    ratios = {
        dtype: statistics.median(
            g / t for g, t in zip(samples[("greedy", dtype)], samples[("log_prob", dtype)])
        )
        for dtype in args.dtype
    }
    return {
        "config": config, "params": parameter_counts(model), "flops": flops,
        "seconds": medians, "rounds": rounds, "ratios": ratios,
    }


def training_variants(args) -> list[tuple[str, int, int]]:
    """(method, K, M) of every training step timed."""
    variants = []
    for method in args.methods:
        if method == "daps":
            variants += [("daps", k, m) for k, m in args.daps_steps]
        else:
            variants.append((method, 1, 1))
    return variants


def benchmark_training(preset: str, args, generator: torch.Generator) -> dict:
    """Every method × K × dtype of `args`, interleaved; FLOPs of each method counted once in fp32."""
    config = DapsConfig.from_preset(preset)
    images = make_images(config, args.train_batch_size, generator, args.device)
    steps, flops = {}, {}
    for method, k, m in training_variants(args):
        # its own copy: the count steps it
        counting = TrainingStep(preset, method, k, args.device, seed=args.seed, update_samples=m)
        total, by_op = count_flops(lambda step=counting: step.run(images, "fp32"))
        name = counting.name
        flops[name] = {"per_image": total / args.train_batch_size, "by_op": by_op}
        for dtype in args.dtype:
            steps[(name, dtype)] = TrainingStep(preset, method, k, args.device, seed=args.seed, update_samples=m)

    variants = {key: (lambda step=step, dtype=key[1]: step.run(images, dtype)) for key, step in steps.items()}
    repeats = max(3, args.repeats // 2)
    medians, rounds, samples = interleaved_medians(variants, repeats, 2 * args.section_budget_s)
    ratios = {}
    names = list(dict.fromkeys(name for name, _ in steps))
    for dtype in args.dtype:
        for name in names:
            for baseline in ("vq", "fsq"):
                if name.startswith("daps") and (baseline, dtype) in samples:
                    ratios[(name, baseline, dtype)] = statistics.median(
                        a / b for a, b in zip(samples[(name, dtype)], samples[(baseline, dtype)]))
        for name in names:
            if dtype == "bf16" and ("fp32" in args.dtype):
                ratios[(name, "bf16 speed-up", "")] = statistics.median(
                    a / b for a, b in zip(samples[(name, "fp32")], samples[(name, "bf16")]))
    memory = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    return {"flops": flops, "seconds": medians, "rounds": rounds, "ratios": ratios, "names": names,
            "cuda_peak_bytes": memory}


def measure_gemm_limit(args) -> dict:
    n = args.gemm_size
    operands = {}
    for dtype in args.dtype:
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        a = torch.randn(n, n, device=args.device).to(torch_dtype)
        b = torch.randn(n, n, device=args.device).to(torch_dtype)
        out = torch.empty(n, n, dtype=torch_dtype, device=args.device)
        operands[dtype] = (a, b, out)
    # On a GPU one 2048² GEMM is far too short to time alone: repeat it inside each timed call.
    inner = 50 if args.device == "cuda" else 1
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 limit is plain fp32, as the model runs it

    def gemm(a, b, out):
        for _ in range(inner):
            torch.mm(a, b, out=out)

    variants = {dtype: (lambda a=a, b=b, out=out: gemm(a, b, out)) for dtype, (a, b, out) in operands.items()}
    repeats = 5 if args.quick else 15
    medians, rounds, _ = interleaved_medians(variants, repeats, budget_s=30.0, warmup=2)
    return {dtype: {"gflops": inner * 2 * n**3 / seconds / 1e9, "seconds": seconds / inner, "rounds": rounds}
            for dtype, seconds in medians.items()}


# Runs a command and writes its peak RSS (KiB) to a file. A child forked straight from this (large) benchmark process
# would report this process's peak as its own (Linux keeps the pre-exec high-water mark in ru_maxrss); forked from this
# small wrapper, the trainer's figure is its own, as `/usr/bin/time -v` would report it.
_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def run_child_training(arguments: list[str], threads: int) -> dict:
    """`python -m training train ARGS` in a child process; its metrics.json, wall time and peak RSS."""
    import tempfile

    command = [sys.executable, "-m", "training", "train", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        started = time.perf_counter()
        process = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, rss_file.name, *command], cwd=ROOT,
                                 env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
        peak_kib = int(Path(rss_file.name).read_text() or 0)
    if process.returncode != 0:
        output = process.stdout.decode(errors="replace")
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    output_dir = Path(arguments[arguments.index("--output_dir") + 1])
    metrics = json.loads((ROOT / output_dir / "metrics.json").read_text())
    return {"metrics": metrics, "wall_s": wall, "peak_rss_mib": peak_kib / 1024,
            "command": "daps train " + " ".join(shlex.quote(a) for a in arguments)}


def benchmark_default_train(args) -> dict:
    arguments = ["--max_steps", str(args.default_train_steps), "--num_threads", str(args.threads),
                 "--eval_every", "0", "--save_every", "0", "--progress", "false", "--overwrite_output_dir", "true",
                 "--output_dir", f"{args.runs_dir}/speed-default-train"]
    result = run_child_training(arguments, args.threads)
    metrics = result["metrics"]
    result["steps_per_second"] = metrics["steps"] / metrics["training_seconds"]
    return result


def profile_greedy(preset: str, args, generator: torch.Generator, top: int = 15) -> str:
    config = DapsConfig.from_preset(preset)
    model = DapsModel(config).to(args.device).eval()
    images = make_images(config, args.batch_size, generator, args.device)
    with torch.inference_mode():
        model.encode(images)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            model.encode(images)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return f"### Profile: one fp32 greedy encode, {preset}, batch {args.batch_size}\n\n```\n{table}\n```\n"


def profile_training(preset: str, args, generator: torch.Generator, dtype: str = "bf16", top: int = 20) -> str:
    config = DapsConfig.from_preset(preset)
    images = make_images(config, args.train_batch_size, generator, args.device)
    k = args.num_samples[0]
    step = TrainingStep(preset, "daps", k, args.device, seed=args.seed)
    step.run(images, dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        step.run(images, dtype)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return (f"### Profile: one {dtype} DAPS training step, {preset}, {args.train_batch_size} images × K={k}\n\n"
            f"```\n{table}\n```\n")


# ----------------------------------------------------------------------------------------------- report
def percent(gflops: float, limit: float | None) -> str:
    return f"{100 * gflops / limit:.1f}%" if limit else "n/a"


def header_lines(title: str, args, started, elapsed, load_before, load_after) -> list[str]:
    return [
        f"# {title}",
        "",
        f"- command: `{command_line()}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M:%S %Z')}, run time {elapsed:.0f} s",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- {device_description(args.device)}",
        f"- threads: torch.set_num_threads({args.threads}); load average (1 min) before / after: "
        f"{load_before:.2f} / {load_after:.2f}",
    ]


def limit_lines(args, limit) -> list[str]:
    lines = [
        f"## Machine limit ({args.gemm_size}² GEMM, {args.device}, {args.threads} thread(s))",
        "",
        "| dtype | GFLOP/s (median) | ms per GEMM | rounds |",
        "|---|---:|---:|---:|",
    ]
    for dtype, row in limit.items():
        lines.append(f"| {dtype} | {row['gflops']:.1f} | {1e3 * row['seconds']:.2f} | {row['rounds']} |")
    return lines


def render(args, limit, inference, training, default_train, profiles, started, elapsed, load_before,
           load_after) -> str:
    lines = header_lines(f"DAPS tokenizer speed ({args.device})", args, started, elapsed, load_before, load_after)
    lines += [
        f"- inference batch {args.batch_size}; training batch {args.train_batch_size} images (DAPS: × K samples); "
        "medians over the rounds stated, variants interleaved",
        "",
        *limit_lines(args, limit),
        "",
        "## Inference (torch.inference_mode, model.eval())",
        "",
        "images/s (achieved GFLOP/s as a share of the same-dtype GEMM limit); bf16 = "
        f"`torch.autocast(\"{args.device}\", dtype=torch.bfloat16)` around the call.",
        "",
        "| preset | dtype | greedy encode | sampled encode (K=1) | teacher-forced log_prob | decode | "
        "greedy / teacher-forced time | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for preset, result in inference.items():
        for dtype in args.dtype:
            cells = []
            for name in OPERATIONS:
                seconds = result["seconds"][(name, dtype)]
                rate = args.batch_size / seconds
                gflops = result["flops"][name]["per_image"] * rate / 1e9
                cells.append(f"{rate:,.0f} ({percent(gflops, limit.get(dtype, {}).get('gflops'))})")
            lines.append(f"| {preset} | {dtype} | " + " | ".join(cells)
                         + f" | {result['ratios'][dtype]:.2f} | {result['rounds']} |")
    lines += [
        "",
        "## Training steps of the trainer's methods (forward, backward, clip, AdamW, after_step)",
        "",
        "`training.trainer.build_config` + `build_method` as `daps train --method M --num_samples K` builds them "
        "(DAPS: the trainer's default η control and β schedule, decoder weighting, learning rate); "
        "every method × dtype timed interleaved.",
        "",
        "| preset | method | dtype | images (× K) | step time (ms) | images/s | GFLOP per step | achieved GFLOP/s | "
        "share of limit | rounds |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for preset, result in training.items():
        for name in result["names"]:
            for dtype in args.dtype:
                seconds = result["seconds"][(name, dtype)]
                rate = args.train_batch_size / seconds
                per_step = result["flops"][name]["per_image"] * args.train_batch_size / 1e9
                gflops = per_step / seconds
                k = name.split("K=")[1].split()[0] if "K=" in name else None
                size = f"{args.train_batch_size} × {k}" if k else f"{args.train_batch_size}"
                lines.append(
                    f"| {preset} | {name} | {dtype} | {size} | {1e3 * seconds:,.1f} | {rate:,.1f} | {per_step:,.1f} | "
                    f"{gflops:.1f} | {percent(gflops, limit.get(dtype, {}).get('gflops'))} | {result['rounds']} |"
                )
    for preset, result in training.items():
        if result.get("cuda_peak_bytes"):
            lines += ["", f"GPU memory: peak allocated after the {preset} training section "
                          f"{result['cuda_peak_bytes'] / 2**20:,.0f} MiB (`torch.cuda.max_memory_allocated`)."]
    lines += ["", "Step-time ratios (median of the per-round ratios, same run):", "",
              "| preset | ratio | dtype | value |", "|---|---|---|---:|"]
    for preset, result in training.items():
        for (name, other, dtype), value in result["ratios"].items():
            if other == "bf16 speed-up":
                lines.append(f"| {preset} | {name}: fp32 time / bf16 time | | {value:.2f}× |")
            else:
                lines.append(f"| {preset} | {name} / {other} | {dtype} | {value:.2f} |")
    if default_train:
        metrics = default_train["metrics"]
        lines += [
            "",
            "## The default `daps train` (child process)",
            "",
            f"`{default_train['command']}` (mnist-5k, mnist preset, DAPS with the trainer's defaults, batch 128, K = 6 with 2 kept; "
            "evaluation only at the end): steps/s over the training time the run logs itself; peak RSS of the training process (its "
            "`ru_maxrss`, as `/usr/bin/time -v` reports it); wall time includes start-up, data loading and the final "
            "evaluation.",
            "",
            "| steps | training seconds | steps/s | wall seconds | peak RSS | held-out PSNR |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {metrics['steps']} | {metrics['training_seconds']:.1f} | {default_train['steps_per_second']:.2f} | "
            f"{default_train['wall_s']:.1f} | {default_train['peak_rss_mib']:.0f} MiB | {metrics['psnr']:.2f} dB |",
        ]
    lines += [
        "",
        "## FLOPs per image and parameters",
        "",
        "Counted with `torch.utils.flop_counter.FlopCounterMode` in fp32: matmuls, convolutions (incl. transposed "
        "and backward) and the CPU attention kernels (mapped here; FlopCounterMode alone counts no CPU attention). "
        "Multiply-add = 2 FLOPs; causal attention counted as the full square; element-wise ops, norms, softmax, "
        "embeddings and the optimiser are not counted. A DAPS step's count includes the K-sample encode "
        "(no gradient), the teacher-forced pass and decoder on K codes, and the backward.",
        "",
        "| preset | greedy encode | sampled encode | teacher-forced encode | decode | "
        + " | ".join(f"step: {name}" for name in next(iter(training.values()))["names"]) if training else "",
    ]
    if training:
        names = next(iter(training.values()))["names"]
        lines[-1] += " | params encoder | params decoder | params total |"
        lines.append("|---|" + "---:|" * (4 + len(names) + 3))
        for preset, result in inference.items():
            flops = result["flops"]
            train = training.get(preset)
            train_cells = [f"{train['flops'][name]['per_image'] / 1e6:,.1f} M" if train else "–" for name in names]
            params = result["params"]
            lines.append(
                f"| {preset} | " + " | ".join(f"{flops[name]['per_image'] / 1e6:,.1f} M" for name in OPERATIONS)
                + " | " + " | ".join(train_cells)
                + f" | {params['encoder']:,} | {params['decoder']:,} | {params['total']:,} |"
            )
    lines += ["", "FLOPs by operator (whole batch, GFLOP):", ""]
    for preset, result in inference.items():
        for name in ("log_prob", "decode"):
            by_op = ", ".join(f"{op} {count / 1e9:.2f}" for op, count in result["flops"][name]["by_op"].items())
            lines.append(f"- {preset} {OPERATION_TITLES[name]} (batch {args.batch_size}): {by_op}")
        if preset in training:
            for name in training[preset]["names"]:
                by_op = ", ".join(f"{op} {count / 1e9:.2f}"
                                  for op, count in training[preset]["flops"][name]["by_op"].items())
                lines.append(f"- {preset} training step {name} (batch {args.train_batch_size}): {by_op}")
    if profiles:
        lines += ["", "## Profiles", ""] + profiles
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- --scaling
def scaling_study(args, generator: torch.Generator) -> list[dict]:
    """Greedy encode and DAPS (fp32, the trainer's default recipe) training-step times as one factor varies.

    Sizes are timed one after another (not interleaved: their times differ by orders of magnitude); each figure is
    the median of a few calls after one warm-up call."""
    quick = args.quick
    repeats = 2 if quick else 3
    rows = []

    def encode_row(factor: str, value, config: DapsConfig, batch: int) -> None:
        model = DapsModel(config).to(args.device).eval()
        images = make_images(config, batch, generator, args.device)
        with torch.inference_mode():
            seconds = median_time(lambda: model.encode(images), repeats)
        rows.append({"factor": factor, "value": value, "what": "greedy encode", "batch": batch, "k": None,
                     "num_tokens": config.num_tokens, "image_size": config.image_size, "seconds": seconds,
                     "per_image_ms": 1e3 * seconds / batch})
        print(f"  encode {factor}={value}: {1e3 * seconds / batch:.2f} ms/image", flush=True)

    def train_row(factor: str, value, preset: str, batch: int, k: int, image_size=None, **overrides) -> None:
        step = TrainingStep(preset, "daps", k, args.device, seed=args.seed, image_size=image_size, **overrides)
        images = make_images(step.config, batch, generator, args.device)
        seconds = median_time(lambda: step.run(images, "fp32"), repeats)
        rows.append({"factor": factor, "value": value, "what": "DAPS step", "batch": batch, "k": k,
                     "num_tokens": step.config.num_tokens, "image_size": step.config.image_size,
                     "seconds": seconds, "per_image_ms": 1e3 * seconds / batch,
                     "per_sample_ms": 1e3 * seconds / (batch * k)})
        print(f"  train {factor}={value}: {1e3 * seconds:.0f} ms/step", flush=True)

    cifar = DapsConfig.from_preset("cifar")
    encode_batches = [16, 32] if quick else [32, 64, 128, 256]
    train_batches = [4, 8] if quick else [8, 16, 32, 64]
    ks = [1, 2] if quick else [1, 2, 4, 8]
    base_batch, base_k = (4, 2) if quick else (16, 4)
    encode_batch = 16 if quick else 64
    for batch in encode_batches:
        encode_row("batch", batch, cifar, batch)
    for batch in train_batches:
        train_row("batch", batch, "cifar", batch, base_k)
    for k in ks:
        train_row("K", k, "cifar", base_batch, k)
    # L on 32×32: one code per patch, patch side 8, 4, 2.
    for num_tokens, patch in ([(16, 8), (64, 4)] if quick else [(16, 8), (64, 4), (256, 2)]):
        config = DapsConfig.from_preset("cifar", num_tokens=num_tokens, patch_size=patch)
        encode_row("L", num_tokens, config, encode_batch)
        train_row("L", num_tokens, "cifar", base_batch, base_k, num_tokens=num_tokens, patch_size=patch)
    # Image size at L = 64 (patch side size/8): the decoder gains one upsampling per doubling.
    for size in ([32, 64] if quick else [32, 64, 128]):
        config = DapsConfig.from_preset("cifar", image_size=size, patch_size=size // 8)
        encode_row("image size", size, config, encode_batch)
        train_row("image size", size, "cifar", base_batch, base_k, image_size=size, patch_size=size // 8)
    if not quick:
        # The imagenet preset itself (256², L = 1024, V = 1024), at a tiny batch: one measured anchor.
        imagenet = DapsConfig.from_preset("imagenet")
        encode_row("imagenet preset", "256², L=1024", imagenet, 4)
        train_row("imagenet preset", "256², L=1024", "imagenet", 2, 4)
    return rows


def render_scaling(args, limit, rows, started, elapsed, load_before, load_after) -> str:
    lines = header_lines(f"DAPS scaling ({args.device})", args, started, elapsed, load_before, load_after)
    lines += [
        "- greedy encode: `model.encode` in inference mode; DAPS step: the trainer's `DapsMethod` (default η control, "
        "β schedule, decoder weighting), fp32, forward + backward + clip + AdamW; cifar backbone (d = 128, 2 + 2 "
        "layers, V = 512, conv decoder width 128) unless the row says otherwise",
        "- each figure: median of a few calls after one warm-up; sizes timed one after another",
        "",
        *limit_lines(args, limit),
        "",
        "| factor | value | what | batch | K | L | image | time per call (ms) | ms per image | ms per image × K |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        per_sample = f"{row['per_sample_ms']:.1f}" if "per_sample_ms" in row else ""
        lines.append(
            f"| {row['factor']} | {row['value']} | {row['what']} | {row['batch']} | {row['k'] or ''} | "
            f"{row['num_tokens']} | {row['image_size']}² | {1e3 * row['seconds']:,.1f} | {row['per_image_ms']:.2f} | "
            f"{per_sample} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- --parity
def parity_study(args) -> list[dict]:
    """`daps train` with --mixed_precision no and bf16 from the same seed, same steps; held-out metrics of both."""
    dataset = "photo-crops" if args.parity_preset == "cifar" else "mnist-5k"
    results = []
    for seed in args.parity_seeds:
        for precision in ("no", "bf16"):
            name = f"speed-parity-{args.parity_preset}-{precision}-seed{seed}"
            arguments = ["--dataset", dataset, "--preset", args.parity_preset, "--max_steps", str(args.steps),
                         "--batch_size", str(args.parity_batch_size), "--mixed_precision", precision,
                         "--seed", str(seed), "--num_threads", str(args.threads), "--eval_every", "0",
                         "--save_every", "0", "--progress", "false", "--overwrite_output_dir", "true",
                         "--output_dir", f"{args.runs_dir}/{name}"]
            print(f"  training {name} ...", flush=True)
            result = run_child_training(arguments, args.threads)
            result.update(seed=seed, precision=precision)
            print(f"  {name}: PSNR {result['metrics']['psnr']:.3f} dB, "
                  f"{result['metrics']['training_seconds']:.0f} s training", flush=True)
            results.append(result)
    return results


def render_parity(args, results, started, elapsed, load_before, load_after) -> str:
    lines = header_lines("DAPS bf16 vs fp32 training parity", args, started, elapsed, load_before, load_after)
    lines += [
        f"- `daps train` (DAPS, defaults otherwise) on {args.parity_preset} "
        f"({'photo-crops' if args.parity_preset == 'cifar' else 'mnist-5k'}), {args.steps} steps, batch "
        f"{args.parity_batch_size}, evaluation only at the end on the held-out (validation) images, greedy codes; "
        "the two precisions run one after the other from the same seed",
        "",
        "| seed | --mixed_precision | held-out PSNR (dB), greedy codes | PSNR, sampled codes | SSIM | −ELBO (bits) | "
        "training s | steps/s | wall s | peak RSS |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        metrics = result["metrics"]
        elbo = metrics.get("neg_elbo_bits")
        lines.append(
            f"| {result['seed']} | {result['precision']} | {metrics['psnr']:.3f} | "
            f"{metrics.get('psnr_sampled', float('nan')):.3f} | {metrics.get('ssim', float('nan')):.3f} | "
            f"{elbo:.1f} | {metrics['training_seconds']:.1f} | {metrics['steps'] / metrics['training_seconds']:.3f} | "
            f"{result['wall_s']:.1f} | {result['peak_rss_mib']:.0f} MiB |"
        )
    lines += ["", "| seed | PSNR bf16 − fp32 (dB) | training time fp32 / bf16 |", "|---:|---:|---:|"]
    by_key = {(r["seed"], r["precision"]): r for r in results}
    for seed in args.parity_seeds:
        fp32, bf16 = by_key[(seed, "no")], by_key[(seed, "bf16")]
        lines.append(f"| {seed} | {bf16['metrics']['psnr'] - fp32['metrics']['psnr']:+.3f} | "
                     f"{fp32['metrics']['training_seconds'] / bf16['metrics']['training_seconds']:.2f}× |")
    if len(args.parity_seeds) > 1:
        values = [by_key[(seed, "no")]["metrics"]["psnr"] for seed in args.parity_seeds]
        lines += ["", f"fp32 seed-to-seed spread (max − min over seeds {args.parity_seeds}): "
                      f"{max(values) - min(values):.3f} dB (the noise scale of one such comparison)."]
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in results]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main
def write_report(args, report: str, data: dict | None = None) -> None:
    print(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    if data is not None:
        output.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"written to {output}")


def main(argv=None) -> int:
    global _DEVICE
    args = parse_args(argv)
    _DEVICE = args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    load_before = load_average()
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} {device_description(args.device)}", flush=True)

    if args.parity:
        results = parity_study(args)
        report = render_parity(args, results, started, time.perf_counter() - clock, load_before, load_average())
        write_report(args, report, {"results": results})
        return 0

    limit = measure_gemm_limit(args)
    for dtype, row in limit.items():
        print(f"GEMM {args.gemm_size}² {dtype}: {row['gflops']:.1f} GFLOP/s", flush=True)

    if args.scaling:
        rows = scaling_study(args, generator)
        report = render_scaling(args, limit, rows, started, time.perf_counter() - clock, load_before,
                                load_average())
        write_report(args, report, {"limit": limit, "rows": rows})
        return 0

    inference, training, profiles = {}, {}, []
    for preset in args.presets:
        inference[preset] = benchmark_inference(preset, args, generator)
        print(f"{preset} inference: {inference[preset]['rounds']} rounds, "
              f"{time.perf_counter() - clock:.0f} s elapsed", flush=True)
        training[preset] = benchmark_training(preset, args, generator)
        print(f"{preset} training: {training[preset]['rounds']} rounds, "
              f"{time.perf_counter() - clock:.0f} s elapsed", flush=True)
        if args.profile:
            profiles.append(profile_greedy(preset, args, generator))
            if "bf16" in args.dtype:
                profiles.append(profile_training(preset, args, generator))
    default_train = None
    if args.default_train_steps:
        default_train = benchmark_default_train(args)
        print(f"default daps train: {default_train['steps_per_second']:.2f} steps/s, "
              f"peak RSS {default_train['peak_rss_mib']:.0f} MiB", flush=True)
    report = render(args, limit, inference, training, default_train, profiles, started,
                    time.perf_counter() - clock, load_before, load_average())
    write_report(args, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
