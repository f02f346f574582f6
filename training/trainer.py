"""The training loop: one Accelerate loop for DAPS and every baseline.

batch → method forward (DAPS: K samples → rewards → weights → losses) → backward → clip → skip if non-finite →
optimiser step → η/VQ bookkeeping → log, evaluate, checkpoint. At the end the output folder holds a complete
tokenizer: config.json, model.safetensors, preprocessor_config.json, README.md (model card), metrics.json,
reconstructions.png, training_curves.png, log.jsonl and checkpoints/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from tokenizer import DapsConfig, DapsImageProcessor, DapsModel
from tokenizer.configuration_daps import CODE_EMBEDDING_TYPES, CODE_HEADS

from . import objective
from .arguments import (AUGMENT_SHIFTS, BETA_SCHEDULES, DAPS_BETA_ENDS, DAPS_LATTICE_PRESETS, DAPS_ORDINAL_METHODS,
                        DATASET_PRESETS, DEFAULT_WEIGHT_DECAY, KMEANS_START_PRESETS, METHODS, USAGE_WEIGHTS,
                        WEIGHT_DECAYS, TrainArguments)
from .checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint, write_json_atomic
from .data import EpochSampler, binarize, binarize_fixed, augment_images, load_image_splits
from .methods import DapsMethod, FsqMethod, GumbelMethod, VqMethod, decoder_parameters
from .monitor import CollapseMonitor

logger = logging.getLogger("daps")

FSQ_LEVELS = {16: [4, 4], 64: [4, 4, 4], 256: [4, 4, 4, 4], 512: [8, 8, 8], 1000: [8, 5, 5, 5], 1024: [8, 8, 4, 4],
              4096: [8, 8, 8, 8]}


# ----------------------------------------------------------------------------------------------- configuration
def _largest_patch_size(image_size: int, wanted: int) -> int:
    """The largest divisor of image_size not above `wanted` (at least 1)."""
    return max(d for d in range(1, min(wanted, image_size) + 1) if image_size % d == 0)


def build_config(args: TrainArguments, image_size: int, num_channels: int) -> tuple[DapsConfig, list[str]]:
    """The model configuration for this run: the preset, adapted to the data, with the method's encoder/quantiser.
    Returns the configuration and the list of adaptations made (for the log)."""
    notes = []
    preset = args.preset or DATASET_PRESETS.get(args.dataset, "cifar")
    config = DapsConfig.from_preset(preset)
    changes: dict = {}
    if image_size != config.image_size:
        changes["image_size"] = image_size
        notes.append(f"image_size {config.image_size} → {image_size} (the data's)")
    if num_channels != config.num_channels:
        changes["num_channels"] = num_channels
        notes.append(f"num_channels {config.num_channels} → {num_channels} (the data's)")
    patch = args.patch_size or config.patch_size
    if image_size % patch != 0:
        new_patch = _largest_patch_size(image_size, patch)
        notes.append(f"patch_size {patch} → {new_patch} (must divide image_size {image_size})")
        patch = new_patch
    if patch != config.patch_size:
        changes["patch_size"] = patch
    for name in ("num_tokens", "codebook_size", "initializer_range", "head_initializer_range"):
        if getattr(args, name):
            changes[name] = getattr(args, name)
    if args.decoder_gate_init is not None:
        changes["decoder_gate_init"] = float(args.decoder_gate_init)
    if args.aligned_patches is not None:
        changes["aligned_patches"] = bool(args.aligned_patches)
    # Unresolved arguments (None) mean the plain choices; resolve_defaults fills in the preset's.
    code_embedding, code_head = args.code_embedding or "learned", args.code_head or "full"
    if args.pixel_paths is not None:
        changes["pixel_paths"] = bool(args.pixel_paths)
    elif args.method in ("daps", "daps-na") and preset in KMEANS_START_PRESETS and code_embedding == "learned" \
            and code_head == "full":
        # The k-means start, where each token owns one patch (else the preset's plain encoder, with a note).
        side = image_size // patch
        num_tokens = changes.get("num_tokens", config.num_tokens)
        if side * side == num_tokens:
            changes["pixel_paths"] = True
            if args.aligned_patches is None:
                changes["aligned_patches"] = True
        else:
            notes.append(f"no k-means start: {side}² patches for {num_tokens} tokens (it needs one patch per token)")
    if args.method in ("daps-na", "gumbel-na", "vq", "fsq"):
        changes["encoder_type"] = "parallel"
    if args.method == "vq":
        changes["quantizer"] = "vq"
    if code_embedding not in CODE_EMBEDDING_TYPES:
        raise ValueError(f"--code_embedding must be one of {', '.join(CODE_EMBEDDING_TYPES)}, got {code_embedding!r}.")
    if code_head not in CODE_HEADS:
        raise ValueError(f"--code_head must be one of {', '.join(CODE_HEADS)}, got {code_head!r}.")
    lattice, factorized = code_embedding == "lattice", code_head != "full"   # every head but 'full' reads the lattice
    if (lattice or factorized) and args.method in ("vq", "fsq"):
        raise ValueError(f"--code_embedding lattice and --code_head factorized or ordinal are for the categorical "
                         f"methods; {args.method} has its own codes.")
    if args.method == "fsq" or lattice or factorized:
        codebook_size = changes.get("codebook_size", config.codebook_size)
        if args.fsq_levels:
            levels = [int(v) for v in args.fsq_levels.split(",")]
        elif codebook_size in FSQ_LEVELS:
            levels = FSQ_LEVELS[codebook_size]
        else:
            raise ValueError(f"No default FSQ levels for codebook_size {codebook_size}; pass --fsq_levels, e.g. 8,8,8.")
        changes.update(fsq_levels=levels, codebook_size=math.prod(levels))
        if args.method == "fsq":
            changes["quantizer"] = "fsq"
        if lattice:
            changes["code_embedding_type"] = "lattice"
        if factorized:
            changes["code_head"] = code_head
        if math.prod(levels) != codebook_size:
            notes.append(f"codebook_size {codebook_size} → {math.prod(levels)} (lattice levels {levels})")
    for key, value in parse_config_overrides(args.config_overrides).items():
        notes.append(f"{key} {getattr(config, key)} → {value} (--config_overrides)")
        changes[key] = value
    return replace_config(config, **changes), notes


# DapsConfig fields that --config_overrides refuses, with the reason: the method or the data sets them, or a flag of
# their own does (with the checks and defaults that go with it).
_NOT_OVERRIDABLE = {
    "image_size": "the data's (resize with --image_size)", "num_channels": "the data's",
    "encoder_type": "set by --method", "quantizer": "set by --method", "fsq_levels": "set by --fsq_levels",
    "code_embedding_type": "set by --code_embedding", "code_head": "set by --code_head",
    "aligned_patches": "set by --aligned_patches", "pixel_paths": "set by --pixel_paths",
    "decoder_gate_init": "set by --decoder_gate_init", "num_tokens": "set by --num_tokens",
    "codebook_size": "set by --codebook_size", "patch_size": "set by --patch_size",
    "initializer_range": "set by --initializer_range", "head_initializer_range": "set by --head_initializer_range",
}


def parse_config_overrides(text: str | None) -> dict:
    """`--config_overrides 'code_layers=1,decoder_hidden_size=1024'` as a dict of typed DapsConfig values.

    Each value is converted to the type of the field's default (int, float, bool or str); an unknown field, a field
    another flag or the method sets, a repeated field or a value of the wrong type raises a ValueError naming it.
    The configuration's own checks (e.g. num_heads dividing hidden_size) run when the configuration is built."""
    if not text or not text.strip():
        return {}
    fields = {name: default for name, default in vars(DapsConfig).items()
              if name in DapsConfig.__annotations__ and isinstance(default, (bool, int, float, str))}
    out: dict = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ValueError(f"--config_overrides expects comma-separated key=value pairs, got {item.strip()!r}.")
        if key in _NOT_OVERRIDABLE:
            raise ValueError(f"--config_overrides cannot change {key!r}: {_NOT_OVERRIDABLE[key]}.")
        if key not in fields:
            allowed = ", ".join(sorted(k for k in fields if k not in _NOT_OVERRIDABLE))
            raise ValueError(f"--config_overrides: unknown configuration field {key!r}; one of: {allowed}.")
        if key in out:
            raise ValueError(f"--config_overrides sets {key!r} twice.")
        default = fields[key]
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value = raw.lower() in ("true", "1")
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            raise ValueError(f"--config_overrides: {key}={raw!r} is not a valid {type(default).__name__}.") from None
        out[key] = value
    return out


def replace_config(config: DapsConfig, **changes) -> DapsConfig:
    values = {**config.to_dict(), **changes}
    for key in ("architectures", "auto_map", "transformers_version", "model_type", "_name_or_path", "dtype"):
        values.pop(key, None)
    return DapsConfig(**values)


# DAPS's code head starts sharp enough that q is image-dependent and low-entropy from step one (std 0.3 instead of the
# configuration's 0.02): the decoder gets informative codes at once and greedy codes do not collapse on natural images
# (benchmarks/RESULTS.md, "The recipe"). The baselines keep the configuration's value they were measured with.
DAPS_HEAD_INITIALIZER_RANGE = 0.3


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(args: TrainArguments, step: int, progress: float) -> float:
    """The learning rate's multiplier at optimiser step `step` (0-based) and run progress `progress` in [0, 1]:
    a linear warm-up over `warmup_steps`, times the schedule's decay (1 for 'constant'; for 'cosine',
    f + (1 − f)(1 + cos πp)/2 with f = `lr_end_fraction`)."""
    warmup = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if args.lr_schedule == "constant":
        return warmup
    progress = min(1.0, max(0.0, progress))
    floor = args.lr_end_fraction
    return warmup * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _resolve_code_choices(args: TrainArguments, preset: str) -> tuple[str, str]:
    """--code_embedding and --code_head where they were left to the preset: the saved model's with --init_from (its
    configuration is kept), the FSQ lattice and a factorised head for daps and daps-na on DAPS_LATTICE_PRESETS when
    the codebook size has default lattice levels (or --fsq_levels is given; the ordinal head for
    DAPS_ORDINAL_METHODS, else one softmax per coordinate), else a learned embedding and the full head."""
    if args.init_from and (args.code_embedding is None or args.code_head is None):
        saved = DapsConfig.from_pretrained(args.init_from)
        return (args.code_embedding or saved.code_embedding_type, args.code_head or saved.code_head)
    codebook_size = args.codebook_size or DapsConfig.from_preset(preset).codebook_size
    lattice = (args.method in ("daps", "daps-na") and preset in DAPS_LATTICE_PRESETS
               and (bool(args.fsq_levels) or codebook_size in FSQ_LEVELS))
    head = ("ordinal" if args.method in DAPS_ORDINAL_METHODS else "factorized") if lattice else "full"
    return (args.code_embedding or ("lattice" if lattice else "learned"), args.code_head or head)


def resolve_defaults(args: TrainArguments) -> TrainArguments:
    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}.")
    if args.eta_control not in ("adam", "bisection"):
        raise ValueError(f"--eta_control must be 'adam' or 'bisection', got {args.eta_control!r}.")
    if args.time_clock not in ("wall", "process"):
        raise ValueError(f"--time_clock must be 'wall' or 'process', got {args.time_clock!r}.")
    if args.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"--mixed_precision must be 'no' or 'bf16', got {args.mixed_precision!r}.")
    for name in ("max_steps", "batch_size", "num_samples", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.warm_start_steps < 0:
        raise ValueError(f"--warm_start_steps must be >= 0, got {args.warm_start_steps}.")
    if args.config_overrides and args.init_from:
        raise ValueError("--config_overrides changes the preset's architecture; --init_from keeps the saved model's.")
    if args.kmeans_init and args.init_from:
        raise ValueError("--kmeans_init would overwrite the pixel paths of the model given by --init_from.")
    if (args.warm_start_steps or args.kmeans_init) and args.method not in ("daps", "daps-na"):
        raise ValueError(f"--warm_start_steps and --kmeans_init are DAPS options (method daps or daps-na), got "
                         f"--method {args.method}.")
    if args.bernoulli_targets not in (None, "sampled", "expected"):
        raise ValueError(f"--bernoulli_targets must be 'sampled' or 'expected', got {args.bernoulli_targets!r}.")
    if args.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {args.lr_schedule!r}.")
    if not 0 <= args.lr_end_fraction <= 1:
        raise ValueError(f"--lr_end_fraction must be in [0, 1], got {args.lr_end_fraction}.")
    if not (math.isfinite(args.polish_fraction) and 0 <= args.polish_fraction < 1):
        raise ValueError(f"--polish_fraction must be in [0, 1), got {args.polish_fraction}.")
    if args.sample_reuse != 1:
        if args.method not in ("daps", "daps-na"):
            raise ValueError(f"--sample_reuse is a DAPS option; --method {args.method} has no samples to reuse.")
        if args.gradient_accumulation_steps != 1:
            raise ValueError("--sample_reuse > 1 needs --gradient_accumulation_steps 1 (it repeats one update on the "
                             "batch's kept samples).")
    if args.decoder_greedy_weight != 0 and args.method not in ("daps", "daps-na"):
        raise ValueError(f"--decoder_greedy_weight is a DAPS option; --method {args.method} decodes one code per image.")
    if isinstance(args.polish_max_steps, bool) or not isinstance(args.polish_max_steps, int) \
            or args.polish_max_steps < 0:
        raise ValueError(f"--polish_max_steps must be a non-negative integer (0: no cap), got "
                         f"{args.polish_max_steps!r}.")
    if args.polish_learning_rate is not None and not (math.isfinite(args.polish_learning_rate)
                                                      and args.polish_learning_rate > 0):
        raise ValueError(f"--polish_learning_rate must be a positive number, got {args.polish_learning_rate}.")
    if not 0 < args.ess_target <= 1:
        raise ValueError(f"--ess_target (ρ) must be in (0, 1], got {args.ess_target}.")
    if args.weight_decay is not None and not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight_decay must be a finite number >= 0, got {args.weight_decay}.")
    if args.augment_shift is not None and (isinstance(args.augment_shift, bool)
                                           or not isinstance(args.augment_shift, int) or args.augment_shift < 0):
        raise ValueError(f"--augment_shift must be a whole number of pixels >= 0, got {args.augment_shift!r}.")
    if args.load_best_model_at_end and args.eval_every <= 0:
        raise ValueError("--load_best_model_at_end chooses among the periodic evaluations: give --eval_every > 0.")
    preset = args.preset or DATASET_PRESETS.get(args.dataset, "cifar")
    beta_start, beta_end = BETA_SCHEDULES.get(preset, BETA_SCHEDULES["cifar"])
    if args.method in ("daps", "daps-na"):
        beta_end = DAPS_BETA_ENDS.get(preset, beta_end)
    dataset_name = Path(args.dataset).name if os.path.isdir(args.dataset) else args.dataset.replace("/", "-")
    update_samples = args.update_samples
    if update_samples is None:
        # Keep as many samples as the ESS target: ceil(ρK) carries most of the weight mass (benchmarks/RESULTS.md).
        trimmed = args.decoder_weighting == "posterior" and not args.greedy_candidate
        update_samples = min(args.num_samples, math.ceil(args.ess_target * args.num_samples - 1e-9)) \
            if trimmed else args.num_samples
    usage_weight = args.usage_weight
    if usage_weight is None:
        usage_weight = USAGE_WEIGHTS.get(preset, 0.0) if args.method in ("daps", "daps-na") else 0.0
    head_initializer_range = args.head_initializer_range
    if head_initializer_range is None and args.method in ("daps", "daps-na"):
        head_initializer_range = DAPS_HEAD_INITIALIZER_RANGE
    code_embedding, code_head = _resolve_code_choices(args, preset)
    return replace(
        args,
        code_embedding=code_embedding,
        code_head=code_head,
        bernoulli_targets=args.bernoulli_targets or ("expected" if args.method == "daps" else "sampled"),
        update_samples=update_samples,
        usage_weight=usage_weight,
        weight_decay=args.weight_decay if args.weight_decay is not None
        else WEIGHT_DECAYS.get(preset, DEFAULT_WEIGHT_DECAY),
        augment_shift=args.augment_shift if args.augment_shift is not None else AUGMENT_SHIFTS.get(args.dataset, 0),
        head_initializer_range=head_initializer_range,
        beta_start=args.beta_start if args.beta_start is not None else beta_start,
        beta_end=args.beta_end if args.beta_end is not None else beta_end,
        gumbel_temperature_end=args.gumbel_temperature_end
        if args.gumbel_temperature_end is not None else (0.1 if args.method == "gumbel-na" else 0.75),
        output_dir=args.output_dir or os.path.join("outputs", f"{args.method}-{dataset_name}"),
        polish_learning_rate=args.polish_learning_rate if args.polish_learning_rate is not None
        else 0.1 * args.learning_rate,
    )


def to_model_input(images: torch.Tensor, config: DapsConfig) -> torch.Tensor:
    """Images in [0, 1] → the model's normalisation (the processor's: [0, 1] Bernoulli, [-1, 1] Gaussian)."""
    return images if config.likelihood == "bernoulli" else images * 2 - 1


def build_method(args: TrainArguments, model: DapsModel, gather):
    beta_schedule = objective.BetaSchedule(args.beta_start, args.beta_end, total_steps=1).at_progress
    if args.method in ("daps", "daps-na"):
        control = objective.make_eta_control(
            args.eta_control, rho=args.ess_target, num_samples=args.num_samples + int(args.greedy_candidate),
            initial_eta=args.initial_eta, lr=args.eta_learning_rate,
        )
        return DapsMethod(model, args.num_samples, control, beta_schedule, gather,
                          decoder_weighting=args.decoder_weighting, greedy_candidate=args.greedy_candidate,
                          exploration=args.exploration, proposal_temperature=args.proposal_temperature,
                          update_samples=args.update_samples,
                          usage_weight=args.usage_weight,
                          usage_mutual_information=args.usage_mutual_information,
                          usage_weight_end=args.usage_weight_end, usage_margin=args.usage_margin,
                          credit=args.credit, credit_window=args.credit_window,
                          warm_start_steps=args.warm_start_steps,
                          kmeans_init=args.kmeans_init if args.kmeans_init is not None
                          else bool(model.config.pixel_paths and not args.init_from),
                          kmeans_temperature=args.kmeans_temperature, proposal=args.proposal,
                          local_candidates=args.local_candidates, local_colours=args.local_colours,
                          local_kl=args.local_kl, fixed_code_blocks=args.fixed_code_blocks,
                          sample_reuse=args.sample_reuse, decoder_greedy_weight=args.decoder_greedy_weight)
    if args.method == "vq":
        return VqMethod(model, commitment=args.vq_commitment, restart_dead_codes=args.vq_restart_dead_codes)
    if args.method == "fsq":
        return FsqMethod(model)
    return GumbelMethod(model, beta_schedule, args.gumbel_temperature_start, args.gumbel_temperature_end)


def keep_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed memory for reuse: no mmap for large blocks (threshold 1 GiB) and no
    trimming of the heap. PyTorch on CPU frees and re-allocates its large activation buffers on every step; by
    default each such buffer is a fresh mmap whose pages fault in again at first touch. Returns whether it applied
    (False off glibc, e.g. macOS or musl, where nothing changes)."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


# ----------------------------------------------------------------------------------------------- the loop
def train(args: TrainArguments) -> dict:
    """Train a tokenizer as `args` says; returns the final held-out metrics (also written to metrics.json)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .evaluation import evaluate, reconstruct_examples
    from .plots import save_reconstruction_grid, save_training_curves

    args = resolve_defaults(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    freed_memory_kept = keep_freed_memory() if args.keep_freed_memory else False
    output_dir = Path(args.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    resume_from = latest_checkpoint(checkpoint_dir) if args.resume else None
    if args.resume and resume_from is None:
        logger.warning("--resume given but no complete checkpoint in %s: starting from scratch.", checkpoint_dir)
    if (not args.resume and not args.overwrite_output_dir and output_dir.is_dir()
            and (output_dir / "log.jsonl").exists()):
        raise ValueError(
            f"Output directory {output_dir} already holds a training run. Pass --resume to continue it, "
            f"--overwrite_output_dir to start over, or choose another --output_dir."
        )

    # train() may run several times in one process (tests, notebooks, examples) with different precisions: the
    # precision lives in Accelerate's process-wide state, so start that afresh (the distributed state is kept).
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.log_with,
        project_dir=str(output_dir),
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.batch_size % (world * args.gradient_accumulation_steps) != 0:
        raise ValueError(
            f"--batch_size {args.batch_size} must be divisible by processes × accumulation steps "
            f"({world} × {args.gradient_accumulation_steps})."
        )
    micro_batch = args.batch_size // args.gradient_accumulation_steps
    set_seed(args.seed)

    # ---- data and model
    # Splits are fixed (seed 0) whatever the run's seed, so every run is evaluated on the same unseen images.
    splits = load_image_splits(args.dataset, image_size=args.image_size, seed=0)
    if args.init_from:
        model = DapsModel.from_pretrained(args.init_from)
        if (model.config.image_size, model.config.num_channels) != (splits.image_size, splits.num_channels):
            splits = load_image_splits(args.dataset, image_size=model.config.image_size,
                                       num_channels=model.config.num_channels, seed=0)
        notes = [f"initialised from {args.init_from}"]
    else:
        config, notes = build_config(args, splits.image_size, splits.num_channels)
        model = DapsModel(config)
    config = model.config
    if args.augment_channels and config.num_channels < 2:
        raise ValueError(f"--augment_channels permutes colour channels; {args.dataset} has one channel.")
    if args.augment_rotate and tuple(splits.train.shape[-2:]) != (config.image_size, config.image_size):
        raise ValueError(f"--augment_rotate needs square images, got {tuple(splits.train.shape[-2:])}.")
    if args.augment_shift >= min(splits.train.shape[-2:]):     # its type and sign: checked in resolve_defaults
        raise ValueError(f"--augment_shift must be in [0, {min(splits.train.shape[-2:])}) pixels for "
                         f"{args.dataset}'s {tuple(splits.train.shape[-2:])} images, got {args.augment_shift}.")
    augment = args.augment_flip or args.augment_rotate or args.augment_channels or args.augment_shift > 0
    processor = DapsImageProcessor.from_model_config(config)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        logger.info("Data: %s", splits.describe())
        for note in notes:
            logger.info("Configuration adapted: %s", note)
        logger.info("Model: %d parameters, %d tokens × %d codes = %.0f bits per image",
                    model.num_parameters(), config.num_tokens, config.codebook_size, config.bits_per_image)
        if freed_memory_kept:
            logger.info("Freed memory is kept for reuse (glibc mallopt; --keep_freed_memory)")

    gather = accelerator.gather if world > 1 else None
    method = build_method(args, model, gather)
    # The decay follows the run's progress on the β clock, which the loop writes here before each scheduler step
    # (a time budget has no step count to decay over); restored on resume from the step and elapsed time.
    schedule_progress = {"value": 0.0}
    polishing = {"on": False}
    if args.polish_fraction > 0:
        # Two groups with the same settings (AdamW treats each parameter alone, so this is the one-group update)
        # until the polish, which holds the encoder's learning rate at 0 and gives the decoder its own.
        decoder_ids = {id(p) for p in decoder_parameters(model)}
        groups = [{"params": [p for p in model.parameters() if id(p) not in decoder_ids]},
                  {"params": [p for p in model.parameters() if id(p) in decoder_ids]}]
        polish_factors = (0.0, args.polish_learning_rate / args.learning_rate)
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
        lambdas = [
            (lambda step, f=factor: f if polishing["on"] else lr_factor(args, step, schedule_progress["value"]))
            for factor in polish_factors
        ]
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        lambdas = lambda step: lr_factor(args, step, schedule_progress["value"])  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    method, optimizer, scheduler = accelerator.prepare(method, optimizer, scheduler)
    inner = accelerator.unwrap_model(method)
    model = inner.model
    sampler = EpochSampler(len(splits.train), args.batch_size, seed=args.seed)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + rank)
    binarize_generator = torch.Generator(device="cpu").manual_seed(args.seed * 1000 + 500 + rank)
    if hasattr(inner, "generator"):
        inner.generator = generator
    validation = splits.validation
    validation_targets = binarize_fixed(validation, seed=0) if config.likelihood == "bernoulli" else None

    step, elapsed, history, skipped = 0, 0.0, [], 0
    polish_from = None   # the step the decoder polish began (--polish_fraction), once it has
    # --load_best_model_at_end: the best periodic evaluation so far (validation PSNR, its step, a CPU copy of the
    # weights); checkpointed with the run, so a resumed run chooses among the same evaluations.
    best = {"psnr": None, "step": None, "weights": None}
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = load_trainer_state(resume_from)
        step, elapsed, skipped = state["step"], state["elapsed"], state["skipped"]
        history = state["history"]
        polish_from = state.get("polish_from")
        if state.get("best"):
            best.update(state["best"])
        sampler.load_state_dict(state["sampler"])
        generator.set_state(state["generators"][rank]["sampling"])
        binarize_generator.set_state(state["generators"][rank]["binarize"])
        if hasattr(inner, "load_state_dict_extra"):
            inner.load_state_dict_extra(state["method"])
        if accelerator.is_main_process:
            logger.info("Resumed from %s at step %d", resume_from, step)

    # The DAPS encoder's dead state (all samples one code, no gradient) is reported once, not left to be found in the
    # final PSNR. A resumed run replays its history so that a warning already given is not repeated.
    monitor = None
    if isinstance(inner, DapsMethod):
        monitor = CollapseMonitor(inner.num_samples + int(inner.greedy_candidate), config.codebook_size)
        for past in history:
            monitor.update(past)
    run_config = {k: v for k, v in asdict(args).items()}
    if args.log_with and accelerator.is_main_process:
        accelerator.init_trackers("daps", config={k: v for k, v in run_config.items()
                                                  if isinstance(v, (int, float, str, bool))})
    log_path = output_dir / "log.jsonl"
    if accelerator.is_main_process and resume_from is None:
        log_path.write_text("")
        write_json_atomic(output_dir / "train_args.json", {**run_config, "command": _command_line()})

    def progress_of(step_now: int, seconds: float) -> float:
        by_steps = step_now / args.max_steps
        by_time = seconds / args.max_time if args.max_time else 0.0
        return min(1.0, max(by_steps, by_time))

    def gather_state() -> list:
        own = {"sampling": generator.get_state(), "binarize": binarize_generator.get_state()}
        if world == 1:
            return [own]
        from accelerate.utils import gather_object
        return gather_object([own])

    def checkpoint():
        states = gather_state()
        trainer_state = {
            "step": step, "elapsed": elapsed, "skipped": skipped, "history": history, "polish_from": polish_from,
            "sampler": sampler.state_dict(), "generators": states,
            "method": inner.state_dict_extra() if hasattr(inner, "state_dict_extra") else {},
            "best": best if args.load_best_model_at_end else None,
        }
        save_checkpoint(accelerator, checkpoint_dir, step, trainer_state, keep=args.keep_checkpoints)

    def run_evaluation(final: bool = False) -> dict:
        images = validation if final else validation[: args.eval_images]
        targets = None if validation_targets is None else validation_targets[: len(images)]
        beta = inner.beta_schedule(progress_of(step, elapsed)) if hasattr(inner, "beta_schedule") else 1.0
        return evaluate(model, images.to(accelerator.device), beta=beta, batch_size=256,
                        binarized_targets=None if targets is None else targets.to(accelerator.device),
                        generator=torch.Generator(device=accelerator.device).manual_seed(1234))

    def log_evaluation(polish_start: bool = False) -> None:
        model.eval()
        metrics = run_evaluation()
        model.train()
        eval_row = {"step": step, "time": round(elapsed, 3), **{f"eval/{k}": v for k, v in metrics.items()}}
        if polish_start:
            eval_row["polish_start"] = True
        if (args.load_best_model_at_end and not polishing["on"] and math.isfinite(metrics["psnr"])
                and (best["psnr"] is None or metrics["psnr"] > best["psnr"])):
            # Polish steps are not candidates: the choice is among encoders, which the polish then serves.
            best.update(psnr=metrics["psnr"], step=step,
                        weights={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
            eval_row["best_so_far"] = True
        history.append(eval_row)
        if accelerator.is_main_process:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(eval_row) + "\n")
            bar.write(f"step {step}: held-out PSNR {metrics['psnr']:.2f} dB, code usage {metrics['code_usage']:.2f}"
                      + (" (decoder polish starts)" if polish_start else ""))
        if args.log_with:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    clock = time.perf_counter if args.time_clock == "wall" else time.process_time
    if getattr(inner, "warm_start_pending", False):
        # The k-means codebook is part of training: its time is charged to the run (recomputed, identically, on
        # resume while warm-start steps remain).
        started = clock()
        # With augmentations, the codebook is fitted to one augmented draw of each training image (step −1, a
        # draw no training step makes): it stands for the images the loop will train on.
        kmeans_images = splits.train if not augment else augment_images(
            splits.train, args.seed, -1, flip=args.augment_flip, rotate=args.augment_rotate,
            permute_channels=args.augment_channels, shift=args.augment_shift)
        inner.fit_warm_start(to_model_input(kmeans_images, config), seed=args.seed)
        elapsed += clock() - started
        if accelerator.is_main_process:
            logger.info("Warm start: k-means codebook of %d pixel blocks fitted in %.1f s; %d warm-start steps%s",
                        config.codebook_size, clock() - started, max(0, args.warm_start_steps - inner.steps_done),
                        "; pixel paths set from it" if args.kmeans_init else "")
    polish_at = 1.0 - args.polish_fraction if args.polish_fraction > 0 else None
    polish_codes = None

    def start_polish() -> torch.Tensor | None:
        """Freeze the encoder: its learning rate → 0, the decoder's → the polish rate, from this step on. Returns an
        empty cache (N, L) of −1 for the greedy codes of the training images when the loop reads them unaugmented:
        each image is encoded the first time a batch holds it and its code reused after, so no image is encoded twice
        and none that the polish does not reach (with augmentations every batch is encoded as it comes). The encoder
        no longer changes, so a resumed run finds the same codes."""
        polishing["on"] = True
        for group, factor in zip(optimizer.param_groups, polish_factors):
            group["lr"] = args.learning_rate * factor
        if augment:
            return None
        return torch.full((len(splits.train), config.num_tokens), -1, dtype=torch.long)

    def restore_best() -> None:
        """--load_best_model_at_end: return to the weights of the best evaluation (all of them: encoder, decoder,
        code table, buffers). The optimiser's moments stay as they are; only the polish steps after this use them."""
        if not args.load_best_model_at_end or best["weights"] is None or best["step"] == step:
            return
        model.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in best["weights"].items()})
        if accelerator.is_main_process:
            logger.info("Returned to the weights of step %d (held-out PSNR %.2f dB, the best periodic evaluation) "
                        "from step %d", best["step"], best["psnr"], step)

    def greedy_codes(pixel_values: torch.Tensor) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            codes = model.encode(pixel_values).codes
        model.train()
        return codes

    def clipped_update(loss: torch.Tensor) -> tuple[float, bool]:
        """After a backward pass: clip the gradients, apply the optimizer's update only if their total norm (before
        clipping; an infinite bound only measures it) and the loss are finite, zero the gradients. Returns the norm
        and whether the update was applied."""
        max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
        norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
        applied = math.isfinite(norm) and math.isfinite(loss.item())
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def polish_done() -> bool:
        """Whether the decoder polish has made its --polish_max_steps steps (never, with no cap)."""
        return bool(polishing["on"] and args.polish_max_steps and step - polish_from >= args.polish_max_steps)

    bar = tqdm(total=args.max_steps, initial=step, disable=not (args.progress and accelerator.is_local_main_process),
               desc=f"{args.method} on {args.dataset}", dynamic_ncols=True)
    model.train()
    stop = False
    while not stop and step < args.max_steps:
        if polish_at is not None and not polishing["on"] and progress_of(step, elapsed) >= polish_at:
            resumed_in_polish = polish_from is not None
            evaluated_here = bool(history) and history[-1].get("step") == step and "eval/psnr" in history[-1]
            if args.eval_every and not resumed_in_polish and not evaluated_here:
                # Where the polish starts from, on the validation images (not charged to the budget).
                log_evaluation(polish_start=True)
            if not resumed_in_polish:
                restore_best()   # not charged to the budget, like the evaluations it chooses among
            started = clock()
            polish_codes = start_polish()
            elapsed += clock() - started
            if not resumed_in_polish:
                polish_from = step
                if accelerator.is_main_process:
                    logger.info("Decoder polish from step %d (%.0f%% of the run): encoder frozen, decoder lr %.3g, "
                                "trained on the encoder's greedy codes", step, 100 * progress_of(step, elapsed),
                                args.polish_learning_rate)
        if polish_done():
            break   # a run resumed after its polish's last step (the check below ends an uninterrupted one)
        started = clock()
        indices = next(sampler)
        local = indices[rank * (args.batch_size // world):(rank + 1) * (args.batch_size // world)]
        stats_sum: dict[str, float] = {}
        for micro in range(args.gradient_accumulation_steps):
            chunk = local[micro * (micro_batch // world):(micro + 1) * (micro_batch // world)]
            images = splits.train[chunk]
            if augment:
                images = augment_images(images, args.seed, step, micro, flip=args.augment_flip,
                                        rotate=args.augment_rotate, permute_channels=args.augment_channels,
                                        shift=args.augment_shift)
            pixel_values = to_model_input(images, config).to(accelerator.device)
            if config.likelihood == "bernoulli" and args.bernoulli_targets == "sampled":
                targets = binarize(images, generator=binarize_generator).to(accelerator.device)
            else:
                targets = pixel_values   # Gaussian; or Bernoulli scored on the grey levels (the expectation)
            codes = None
            if polishing["on"]:
                if polish_codes is None:
                    codes = greedy_codes(pixel_values)
                else:
                    missing = (polish_codes[chunk] < 0).any(dim=1)
                    if bool(missing.any()):
                        polish_codes[chunk[missing]] = greedy_codes(pixel_values[missing.to(pixel_values.device)]).cpu()
                    codes = polish_codes[chunk].to(accelerator.device)
            with accelerator.accumulate(method):
                with accelerator.autocast():
                    if codes is None:
                        out = method(pixel_values, targets, progress_of(step, elapsed))
                    else:
                        out = method(pixel_values, targets, progress_of(step, elapsed), polish_codes=codes,
                                     touch_all=world > 1)
                accelerator.backward(out["loss"])
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm, applied = clipped_update(out["loss"])
                    if applied:
                        schedule_progress["value"] = progress_of(step + 1, elapsed + clock() - started)
                        scheduler.step()
                    else:
                        skipped += 1  # a non-finite update is dropped, never applied
            for _ in range(args.sample_reuse - 1 if getattr(inner, "replay_ready", False) else 0):
                # --sample_reuse: more updates on this step's kept samples (time charged to the step).
                with accelerator.autocast():
                    replayed = method(pixel_values, targets, progress_of(step, elapsed), replay=True)
                accelerator.backward(replayed["loss"])
                grad_norm, applied = clipped_update(replayed["loss"])
                skipped += not applied
            for key, value in out.items():
                value = value.item() if isinstance(value, torch.Tensor) else value
                stats_sum[key] = stats_sum.get(key, 0.0) + float(value) / args.gradient_accumulation_steps
        if not polishing["on"]:
            inner.after_step()
        step += 1
        elapsed += clock() - started
        if args.max_time and elapsed >= args.max_time:
            stop = True
        if polish_done():
            stop = True   # the polish has made its steps: more would fit the decoder to the training codes only
            if accelerator.is_main_process:
                logger.info("Decoder polish done after %d steps (--polish_max_steps): the run ends at step %d",
                            step - polish_from, step)

        logging_now = step % args.log_every == 0 or step == 1
        if world > 1 and logging_now:
            # The log shows the global batch: statistics averaged over processes (every process reduces together).
            keys = sorted(stats_sum)
            values = accelerator.reduce(torch.tensor([stats_sum[k] for k in keys], device=accelerator.device,
                                                     dtype=torch.float64), reduction="mean")
            stats_sum = dict(zip(keys, values.tolist()))
        row = {"step": step, "time": round(elapsed, 3), **{k: _round(v) for k, v in stats_sum.items()},
               "grad_norm": _round(grad_norm), "lr": scheduler.get_last_lr()[-1], "skipped": skipped}
        if polishing["on"]:
            row["polish"] = True   # a decoder-polish step; "lr" is the decoder's (the encoder's is 0)
        bar.update(1)
        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "ess", "eta", "beta", "code_usage") if k in row},
                        refresh=False)
        if logging_now:
            history.append(row)
            warning = monitor.update(row) if monitor is not None else None
            if warning and accelerator.is_main_process:
                logger.warning(warning)
            if accelerator.is_main_process:
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
            if args.log_with:
                accelerator.log(row, step=step)
        if args.eval_every and step % args.eval_every == 0 and step < args.max_steps and not stop:
            log_evaluation()
        if args.save_every and step % args.save_every == 0 and step < args.max_steps and not stop:
            checkpoint()
    bar.close()
    if args.load_best_model_at_end and polish_at is None:
        if not (history and history[-1].get("step") == step and "eval/psnr" in history[-1]):
            log_evaluation()   # the run's last weights are a candidate too
        restore_best()
    checkpoint()

    # ---- the finished tokenizer
    model.eval()
    metrics = run_evaluation(final=True)
    if args.time_clock == "wall":
        metrics["wall_clock_seconds"] = round(elapsed, 2)
    metrics.update(
        method=args.method, dataset=args.dataset, split="validation", steps=step,
        training_seconds=round(elapsed, 2), time_clock=args.time_clock, steps_per_second=round(step / max(elapsed, 1e-9), 3),
        skipped_updates=skipped, train_command=_command_line(),
    )
    if polish_at is not None:
        metrics["polish_from_step"] = polish_from
        metrics["polish_steps"] = None if polish_from is None else step - polish_from
    if args.load_best_model_at_end:
        metrics["best_model_step"] = best["step"]
        metrics["best_model_eval_psnr"] = best["psnr"]
    if monitor is not None and monitor.collapsed_at is not None:
        metrics["encoder_collapsed_at_step"] = monitor.collapsed_at
    if accelerator.is_main_process:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        write_json_atomic(output_dir / "metrics.json", metrics)
        originals, reconstructions = reconstruct_examples(model, validation.to(accelerator.device), n=8)
        save_reconstruction_grid(originals, reconstructions, output_dir / "reconstructions.png",
                                 title=f"{args.method}: held-out images (top) and reconstructions (bottom)")
        save_training_curves(history + [{"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}],
                             output_dir / "training_curves.png")
        try:
            from hub_cards import write_model_card
            write_model_card(output_dir, train_command=metrics["train_command"])
        except ImportError:  # pragma: no cover - hub_cards ships with the package
            pass
        logger.info("Held-out: PSNR %.2f dB, SSIM %.3f, code usage %.2f; written to %s",
                    metrics["psnr"], metrics["ssim"], metrics["code_usage"], output_dir)
    if args.log_with:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return metrics


def _round(value):
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value


def _command_line() -> str:
    argv = sys.argv[1:] if Path(sys.argv[0]).name in ("daps", "__main__.py", "cli.py") else []
    return "daps " + " ".join(shlex.quote(a) for a in argv) if argv else "daps train"
