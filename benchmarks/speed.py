"""Speed of the DAPS tokenizer on this machine's CPU: inference, one DAPS training step, FLOPs and efficiency.

What it measures, all in one run so that the figures are comparable:

1. The machine's limit: fp32 and bf16 GEMM throughput (n×n @ n×n, median over repeats) at the chosen thread count.
2. Per preset, at `--batch-size`, in `torch.inference_mode()` with `model.eval()`: greedy encode (KV cache, L
   sequential steps), sampled encode (`num_samples=1`), one teacher-forced `log_prob` pass, `decode`, in images/s;
   the ratio (greedy encode time) / (teacher-forced pass time), the median of the per-round ratios (each round
   times both back to back); parameter counts.
3. Per preset, one DAPS training step (K samples per image without gradient, teacher-forced log q and decoder
   log-likelihood with gradient, the DAPS weighted loss, backward, gradient clipping, AdamW step) in fp32 and
   under `torch.autocast("cpu", dtype=torch.bfloat16)`: step time and images/s, at `--train-batch-size`.
4. FLOPs per image, counted with `torch.utils.flop_counter.FlopCounterMode`, and every measured speed also as a
   fraction of the measured GEMM limit of the same dtype (achieved GFLOP/s / limit).

FLOP counting: FlopCounterMode counts matrix products (mm, addmm, bmm, baddbmm), convolutions (including transposed
ones, and their backward) and, through a mapping added here, the CPU attention kernels
(`_scaled_dot_product_flash_attention_for_cpu` and its backward, which FlopCounterMode does not know of: without the
mapping it counts no attention at all). A multiply-add is 2 FLOPs. Causal attention is counted as the full square
(as FlopCounterMode does for every attention kernel); cached attention steps are counted at their real prefix length.
Not counted: element-wise work, layer norms, softmax / log-softmax, GELU/SiLU, embedding look-ups, Gumbel noise,
argmax, the loss, the optimiser update. Every FLOP figure is counted once in fp32 and used for both dtypes.

Methodology: `torch.set_num_threads(--threads)` (1 by default: on this shared 2-core machine single-thread timings
are the stable ones); warm-up before timing; the variants compared (every operation × dtype, or fp32 vs bf16
training) are timed interleaved in one loop, the order rotated each round, so that noise hits them alike; the
figure reported is the median over rounds. A time budget per section (`--section-budget-s`) may stop a section
before `--repeats` rounds (never before 3); the table states the rounds actually used.

    python benchmarks/speed.py                     # mnist + cifar, batch 256, 1 thread, fp32 + bf16 (~5 min)
    python benchmarks/speed.py --quick             # smoke run (~1 min)
    python benchmarks/speed.py --presets cifar --profile   # adds a torch.profiler table of one greedy encode
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.configuration_daps import DapsConfig  # noqa: E402
from tokenizer.modeling_daps import DapsModel  # noqa: E402

OPERATIONS = ("greedy", "sampled", "log_prob", "decode")
OPERATION_TITLES = {
    "greedy": "greedy encode",
    "sampled": "sampled encode (K=1)",
    "log_prob": "teacher-forced log_prob",
    "decode": "decode",
}


# ----------------------------------------------------------------------------------------------- helpers
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["mnist", "cifar"], choices=list(DapsConfig.presets))
    parser.add_argument("--batch-size", type=int, default=None, help="inference batch (default 256; --quick: 64)")
    parser.add_argument("--train-batch-size", type=int, default=None,
                        help="images per training step, each with K samples (default 32; --quick: 8). A cifar "
                             "step at 256 images × K=8 takes about a minute on one thread.")
    parser.add_argument("--num-samples", type=int, default=8, help="K of the training step (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per inference section (default 12; --quick: 3); training uses half, "
                             "at least 3")
    parser.add_argument("--section-budget-s", type=float, default=None,
                        help="stop a section's rounds after this many seconds, never before 3 rounds "
                             "(default 75; --quick: 8)")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--gemm-size", type=int, default=2048, help="n of the n×n GEMM limit (default 2048)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches: a smoke run")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one fp32 greedy encode per preset with torch.profiler (top ops)")
    parser.add_argument("--output", default="benchmarks/speed_results.md")
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
    if min(args.batch_size, args.train_batch_size, args.num_samples, args.threads, args.repeats) < 1:
        parser.error("sizes, threads and repeats must be >= 1")
    return args


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


def autocast_context(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


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
def make_images(config: DapsConfig, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    shape = (batch_size, config.num_channels, config.image_size, config.image_size)
    images = torch.rand(shape, generator=generator)
    if config.likelihood == "bernoulli":
        return (images > 0.5).float()  # binarised digits
    return images * 2 - 1  # the processor's [-1, 1] normalisation


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


def daps_training_step(model: DapsModel, optimizer, images: torch.Tensor, num_samples: int, dtype: str,
                       beta: float = 0.1, eta: float = 1.0) -> None:
    """One DAPS step (DAPS.md, "One training step") with a fixed η and β: the cost of the step, not its control."""
    with autocast_context(dtype):
        output = model(images, num_samples=num_samples)
    log_q = output.log_prob.float()
    rewards = output.reconstruction_log_likelihood.float()
    advantages = rewards.detach() - rewards.detach().logsumexp(1, keepdim=True)
    weights = torch.softmax((advantages - beta * log_q.detach()) / (eta + beta), dim=1)
    loss = -(weights * log_q).sum(1).mean() - rewards.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def benchmark_inference(preset: str, args, generator: torch.Generator) -> dict:
    config = DapsConfig.from_preset(preset)
    model = DapsModel(config).eval()
    images = make_images(config, args.batch_size, generator)
    with torch.inference_mode():
        codes = model.encode(images).codes

    def operation(name: str, dtype: str):
        def run():
            with torch.inference_mode(), autocast_context(dtype):
                if name == "greedy":
                    model.encode(images)
                elif name == "sampled":
                    model.encode(images, num_samples=1, generator=generator)
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


def benchmark_training(preset: str, args, generator: torch.Generator) -> dict:
    config = DapsConfig.from_preset(preset)
    base = DapsModel(config).train()
    images = make_images(config, args.train_batch_size, generator)
    states = {}
    for dtype in args.dtype:
        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4)
        states[dtype] = (model, optimizer)

    counting_model = copy.deepcopy(base)
    counting_optimizer = torch.optim.AdamW(counting_model.parameters(), lr=3e-4, weight_decay=1e-4)
    total, by_op = count_flops(
        lambda: daps_training_step(counting_model, counting_optimizer, images, args.num_samples, "fp32")
    )
    del counting_model, counting_optimizer

    def step(dtype):
        model, optimizer = states[dtype]
        return lambda: daps_training_step(model, optimizer, images, args.num_samples, dtype)

    variants = {dtype: step(dtype) for dtype in args.dtype}
    repeats = max(3, args.repeats // 2)
    medians, rounds, _ = interleaved_medians(variants, repeats, args.section_budget_s)
    return {"flops": {"per_image": total / args.train_batch_size, "by_op": by_op},
            "seconds": medians, "rounds": rounds}


def measure_gemm_limit(args) -> dict:
    n = args.gemm_size
    operands = {}
    for dtype in args.dtype:
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        a = torch.randn(n, n).to(torch_dtype)
        b = torch.randn(n, n).to(torch_dtype)
        out = torch.empty(n, n, dtype=torch_dtype)
        operands[dtype] = (a, b, out)
    variants = {dtype: (lambda a=a, b=b, out=out: torch.mm(a, b, out=out)) for dtype, (a, b, out) in operands.items()}
    repeats = 5 if args.quick else 15
    medians, rounds, _ = interleaved_medians(variants, repeats, budget_s=30.0, warmup=2)
    return {dtype: {"gflops": 2 * n**3 / seconds / 1e9, "seconds": seconds, "rounds": rounds}
            for dtype, seconds in medians.items()}


def profile_greedy(preset: str, args, generator: torch.Generator, top: int = 15) -> str:
    config = DapsConfig.from_preset(preset)
    model = DapsModel(config).eval()
    images = make_images(config, args.batch_size, generator)
    with torch.inference_mode():
        model.encode(images)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            model.encode(images)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return f"### Profile: one fp32 greedy encode, {preset}, batch {args.batch_size}\n\n```\n{table}\n```\n"


# ----------------------------------------------------------------------------------------------- report
def percent(gflops: float, limit: float | None) -> str:
    return f"{100 * gflops / limit:.1f}%" if limit else "n/a"


def render(args, limit, inference, training, profiles, started, elapsed, load_before, load_after) -> str:
    command = " ".join(shlex.quote(part) for part in ["python", *sys.argv])
    lines = [
        "# DAPS tokenizer speed (CPU)",
        "",
        f"- command: `{command}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M:%S %Z')}, run time {elapsed:.0f} s",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores visible; flags: {cpu_flags()})",
        f"- threads: torch.set_num_threads({args.threads}); load average before / after: "
        f"{load_before:.2f} / {load_after:.2f}",
        f"- inference batch {args.batch_size}; training batch {args.train_batch_size} images × "
        f"K = {args.num_samples} samples; medians over the rounds stated, variants interleaved",
        "",
        f"## Machine limit ({args.gemm_size}² GEMM, {args.threads} thread(s))",
        "",
        "| dtype | GFLOP/s (median) | ms per GEMM | rounds |",
        "|---|---:|---:|---:|",
    ]
    for dtype, row in limit.items():
        lines.append(f"| {dtype} | {row['gflops']:.1f} | {1e3 * row['seconds']:.2f} | {row['rounds']} |")
    lines += [
        "",
        "## Inference (torch.inference_mode, model.eval())",
        "",
        "images/s (achieved GFLOP/s as a share of the same-dtype GEMM limit); bf16 = "
        "`torch.autocast(\"cpu\", dtype=torch.bfloat16)` around the call.",
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
        "## One DAPS training step (forward with K samples, backward, clip, AdamW)",
        "",
        "| preset | dtype | images × K | step time (ms) | images/s | achieved GFLOP/s | share of limit | rounds |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for preset, result in training.items():
        for dtype in args.dtype:
            seconds = result["seconds"][dtype]
            rate = args.train_batch_size / seconds
            gflops = result["flops"]["per_image"] * rate / 1e9
            lines.append(
                f"| {preset} | {dtype} | {args.train_batch_size} × {args.num_samples} | {1e3 * seconds:,.1f} | "
                f"{rate:,.1f} | {gflops:.1f} | {percent(gflops, limit.get(dtype, {}).get('gflops'))} | "
                f"{result['rounds']} |"
            )
    lines += [
        "",
        "## FLOPs per image and parameters",
        "",
        "Counted with `torch.utils.flop_counter.FlopCounterMode` in fp32: matmuls, convolutions (incl. transposed "
        "and backward) and the CPU attention kernels (mapped here; FlopCounterMode alone counts no CPU attention). "
        "Multiply-add = 2 FLOPs; causal attention counted as the full square; element-wise ops, norms, softmax, "
        "embeddings and the optimiser are not counted. The training step's count includes the K-sample encode "
        "(no gradient), the teacher-forced pass and decoder on K codes, and the backward.",
        "",
        "| preset | greedy encode | sampled encode | teacher-forced encode | decode | training step | "
        "params encoder | params decoder | params total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for preset, result in inference.items():
        flops = result["flops"]
        train = training.get(preset)
        train_cell = f"{train['flops']['per_image'] / 1e6:,.1f} M" if train else "–"
        params = result["params"]
        lines.append(
            f"| {preset} | " + " | ".join(f"{flops[name]['per_image'] / 1e6:,.1f} M" for name in OPERATIONS)
            + f" | {train_cell} | {params['encoder']:,} | {params['decoder']:,} | {params['total']:,} |"
        )
    lines += ["", "FLOPs by operator (whole batch, GFLOP):", ""]
    for preset, result in inference.items():
        for name in ("log_prob", "decode"):
            by_op = ", ".join(f"{op} {count / 1e9:.2f}" for op, count in result["flops"][name]["by_op"].items())
            lines.append(f"- {preset} {OPERATION_TITLES[name]} (batch {args.batch_size}): {by_op}")
        if preset in training:
            by_op = ", ".join(f"{op} {count / 1e9:.2f}" for op, count in training[preset]["flops"]["by_op"].items())
            lines.append(f"- {preset} training step (batch {args.train_batch_size} × K={args.num_samples}): {by_op}")
    if profiles:
        lines += ["", "## Profiles", ""] + profiles
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.perf_counter()
    load_before = os.getloadavg()[0]
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} cpu={cpu_model()}", flush=True)

    limit = measure_gemm_limit(args)
    for dtype, row in limit.items():
        print(f"GEMM {args.gemm_size}² {dtype}: {row['gflops']:.1f} GFLOP/s", flush=True)
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
    report = render(args, limit, inference, training, profiles, started, time.perf_counter() - clock,
                    load_before, os.getloadavg()[0])
    print(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report)
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
