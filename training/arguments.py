"""Arguments of `daps train`, one dataclass parsed by `transformers.HfArgumentParser`.

Defaults marked "auto" are filled from the preset and the dataset by `resolve_defaults` (training/trainer.py), so
`daps train` with no argument is a sensible run and every choice it made is written to the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("daps", "daps-na", "vq", "fsq", "gumbel", "gumbel-na")

# β schedules of the paper (DAPS.md, "β schedule"): start, end.
BETA_SCHEDULES = {"mnist": (0.5, 0.01), "cifar": (6.0, 0.01), "imagenet": (50.0, 1.0), "tiny": (0.5, 0.01)}

# Where DAPS ends its β schedule higher than the paper's (benchmarks/RESULTS.md, "Seventeenth session", "Eighteenth
# session"): on mnist, ending at 0.3 instead of 0.01 gained 0.56 dB test PSNR and 22 bits of −ELBO at 10 CPU-minutes,
# and holding β at its start, 0.5, ended another 0.21 dB higher and 9 bits lower on each of three seeds (at equal steps
# +0.06 dB validation: those runs also made 11 % more steps), by keeping the encoder from settling on few codes. The
# baselines keep the paper's schedule.
DAPS_BETA_ENDS = {"mnist": 0.5}

# λ of the DAPS usage term per preset (benchmarks/RESULTS.md, "Codebook collapse and the usage term"): it gained
# 1.65 dB at 10 CPU-minutes on the CIFAR-like crops (three seeds) and lost 0.8 dB on MNIST, where codes collapse much less.
# imagenet follows cifar (natural images; not measured at that size).
# Presets whose DAPS default is the k-means start (aligned patches + pixel paths + k-means initialisation), where the
# configuration allows it: natural images, where patch k-means is a strong tokenizer (benchmarks/RESULTS.md).
KMEANS_START_PRESETS = ("cifar", "imagenet")
USAGE_WEIGHTS = {"mnist": 0.0, "cifar": 0.3, "imagenet": 0.3, "tiny": 0.0}

# AdamW weight decay per preset, 1e-4 where none is named (benchmarks/RESULTS.md, "Twenty-fourth session",
# "Twenty-fifth session"): on mnist, whose 4,000 training digits every method overfits within minutes, 0.1 instead of
# 1e-4 gained test PSNR at 10 CPU-minutes for each method measured: DAPS +0.36 dB (three seeds), DAPS-NA +0.33, FSQ
# +0.45, VQ +0.79 (two seeds each), Gumbel-softmax +0.25 (one seed). Every method gets it, the baselines included.
WEIGHT_DECAYS = {"mnist": 0.1}
# Random shifts by default, per dataset (not per preset: the mnist preset also serves 8 × 8 digits, where 2 pixels
# is a quarter of the image). On mnist-5k at 30 CPU-minutes they lifted FSQ by 1.2 dB and DAPS by 0.55 (benchmarks/
# RESULTS.md, "Thirty-second session").
AUGMENT_SHIFTS = {"mnist-5k": 2}
DEFAULT_WEIGHT_DECAY = 1e-4

# Presets where the codes of daps and daps-na enter the decoder as FSQ lattice points and the code head is factorised
# per lattice coordinate (--code_embedding lattice --code_head factorized; benchmarks/RESULTS.md, "Twenty-second and
# twenty-third sessions"): on mnist it gained DAPS 0.61 dB test PSNR at 10 CPU-minutes, ahead on each of three seeds,
# and DAPS-NA read 18.54 against 17.80 with the learned input. On the natural-image presets it was level before the
# k-means start, which needs learned code embeddings.
DAPS_LATTICE_PRESETS = ("mnist",)

# Methods whose factorised head on those presets is the ordinal one (--code_head ordinal: each lattice coordinate a
# discretised Gaussian over its levels; benchmarks/RESULTS.md, "Thirtieth session"): at 10 CPU-minutes on mnist it
# gained DAPS +0.46, +0.22 and +0.05 dB test PSNR on seeds 0–2 (validation +0.32, +0.22, +0.10), its greedy codes
# using 99.6–100 % of the codebook (56–99 % before) at 2–6 bits less −ELBO. DAPS-NA read 0.27 dB lower with it
# (seed 0), so it keeps one softmax per coordinate.
DAPS_ORDINAL_METHODS = ("daps",)

# The preset a dataset gets when none is named; the configuration is then adapted to the images' size and channels.
DATASET_PRESETS = {"mnist-5k": "mnist", "digits": "mnist", "faces": "mnist", "photo-crops": "cifar",
                   "photo-crops-fold1": "cifar", "photo-crops-fold2": "cifar", "photo-crops-fold3": "cifar"}


@dataclass
class TrainArguments:
    dataset: str = field(default="mnist-5k", metadata={"help": "Built-in name (mnist-5k, digits, photo-crops, faces; "
                         "photo-crops-fold1..3 hold out other photographs), "
                         "a local image folder, or a Hub dataset name."})
    preset: str | None = field(default=None, metadata={"help": "Model preset (mnist, cifar, imagenet, tiny); "
                               "default: chosen from the dataset, then adapted to its image size and channels."})
    method: str = field(default="daps", metadata={"help": f"Training method: {', '.join(METHODS)}."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the tokenizer folder is written "
                                   "(default: outputs/<method>-<dataset>)."})
    max_steps: int = field(default=2000, metadata={"help": "Optimiser steps."})
    max_time: float | None = field(default=None, metadata={"help": "Wall-clock budget in seconds; stops at whichever of "
                                   "max_steps and max_time comes first (β then anneals on the clock)."})
    time_clock: str = field(default="wall", metadata={"help": "What max_time and the logged 'time' count: 'wall' "
                            "(elapsed seconds) or 'process' (CPU seconds of this process, every thread summed: fair "
                            "budgets on a shared machine when each run uses one thread)."})
    batch_size: int = field(default=128, metadata={"help": "Images per optimiser step, over all processes."})
    bernoulli_targets: str | None = field(default=None, metadata={"help": "Bernoulli likelihood only (grey images "
                                   "in [0, 1]: the mnist preset): what the training loss scores. 'sampled': a fresh "
                                   "binarisation of each batch (dynamic binarisation); 'expected': the grey levels "
                                   "themselves, the log-likelihood's expectation over binarisations (the same "
                                   "expected loss, without the binarisation's noise in DAPS's rewards and weights). "
                                   "Default: 'expected' for --method daps (+0.10 and +0.15 dB test on MNIST at 10 "
                                   "CPU-minutes, two seeds), 'sampled' for every other method (FSQ −0.16, one seed): "
                                   "benchmarks/RESULTS.md, 'Twenty-eighth session'. The held-out −ELBO scores a fixed "
                                   "binarisation either way."})
    num_samples: int = field(default=6, metadata={"help": "K: codes sampled per image in a DAPS step (paper: 8; 6 with "
                             "the 2 heaviest kept for the update learned fastest per CPU-second here, "
                             "benchmarks/RESULTS.md)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay (auto: 0.1 on the mnist "
                                       "preset, where 4,000 training digits overfit, 1e-4 on the others)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Global gradient-norm clipping (0 disables)."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear learning-rate warm-up steps."})
    lr_schedule: str = field(default="constant", metadata={"help": "Learning rate after the warm-up: 'constant', or "
                             "'cosine' (from --learning_rate down to --lr_end_fraction of it at the end of the run, on "
                             "the same clock as β: the larger of steps/max_steps and time/max_time)."})
    lr_end_fraction: float = field(default=0.1, metadata={"help": "With --lr_schedule cosine: the learning rate at "
                                   "the end of the run, as a fraction of --learning_rate."})
    polish_fraction: float = field(default=0.02, metadata={"help": "Decoder polish: the last fraction of the run (on "
                                   "the clock of β and the lr schedule) freezes the encoder and trains only the "
                                   "decoder and its code table on the encoder's greedy codes of the training images, "
                                   "the codes evaluation and `encode` use. Its cost, encoding the training images "
                                   "included, is inside the budget. Every method; at 10 CPU-minutes on MNIST 2 %% "
                                   "raised DAPS's held-out PSNR by 0.35-0.41 dB and FSQ's and VQ's by 0.09-0.16 "
                                   "(benchmarks/RESULTS.md, 'Twentieth session'). 0 disables it."})
    polish_max_steps: int = field(default=1000, metadata={"help": "The most decoder-polish steps a run takes: once "
                                  "the polish has made this many the run ends, before its budget is spent. At the "
                                  "polish learning rate the decoder overfits the frozen codes after about a thousand "
                                  "steps (at 120 CPU-minutes on MNIST validation was highest within the first two "
                                  "thousand and fell at every later evaluation; RESULTS.md, 'Twenty-seventh "
                                  "session'). 0: no cap."})
    polish_learning_rate: float | None = field(default=None, metadata={"help": "The decoder's learning rate during the "
                                               "polish (default: a tenth of --learning_rate)."})
    beta_start: float | None = field(default=None, metadata={"help": "β at the start (default: the preset's)."})
    beta_end: float | None = field(default=None, metadata={"help": "β at the end (default: the preset's)."})
    eta_control: str = field(default="bisection", metadata={"help": "'bisection': solve mean ESS(η) = ρK exactly per "
                             "batch; 'adam': the reference scheme (log η moved by its own Adam)."})
    ess_target: float = field(default=0.33, metadata={"help": "ρ: target ESS as a fraction of K."})
    initial_eta: float = field(default=100.0, metadata={"help": "Initial η (adam control)."})
    eta_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of log η (adam control)."})
    decoder_weighting: str = field(default="posterior", metadata={"help": "DAPS decoder loss: 'posterior' (weighted by "
                                   "the DAPS weights w, fitting the decoder to q*) or 'uniform' (Monte Carlo over all "
                                   "K samples, the paper's)."})
    greedy_candidate: bool = field(default=False, metadata={"help": "DAPS: add the encoder's greedy code to the K "
                                   "samples as one more candidate (decoder and weights), aligning training with greedy "
                                   "evaluation."})
    exploration: float = field(default=0.0, metadata={"help": "DAPS: ε, draw each sampled token from "
                              "(1 − ε)·q + ε·uniform and importance-weight by q/μ (same target q*, more exploration)."})
    proposal_temperature: float = field(default=1.0, metadata={"help": "DAPS: τ, draw the K samples from q at "
                                        "temperature τ and importance-weight by q/μ (same target q*): τ < 1 proposes "
                                        "codes nearer the encoder's greedy code, the one evaluation reads (0.5 "
                                        "collapsed the encoder to one code on MNIST: benchmarks/RESULTS.md, "
                                        "'Twenty-first session')."})
    update_samples: int | None = field(default=None, metadata={"help": "DAPS: M, how many of the K samples per image "
                                 "(largest weight first) the losses and their backward passes use; all K are still "
                                 "sampled, decoded and weighted without gradient. Default: ceil(ρK), as many as the "
                                 "ESS target (all K with decoder_weighting 'uniform' or greedy_candidate)."})
    sample_reuse: int = field(default=1, metadata={"help": "DAPS with --update_samples M < K: optimiser updates per "
                              "draw of samples. After a step's update, R − 1 more fit the encoder and decoder to the "
                              "same images' M kept codes and weights (log q and rewards recomputed), so the K-sample "
                              "draw and its no-grad decode are paid once per R updates. Needs "
                              "--gradient_accumulation_steps 1."})
    decoder_greedy_weight: float = field(default=0.0, metadata={"help": "DAPS with --update_samples M < K: α, the "
                                       "share of the decoder's loss taken by the encoder's greedy code (the code "
                                       "evaluation and `encode` use) of each training image; the rest is the kept "
                                       "samples' weighted loss. The decoder polish's fit, spread over training. Costs "
                                       "a greedy draw and one more decode with gradient per image."})
    usage_weight: float | None = field(default=None, metadata={"help": "DAPS: λ of the usage term added to the "
                                       "encoder loss, λ·L·(log V − I(token; image)), or λ·L·(log V − H(q̄)) without "
                                       "--usage_mutual_information (q̄: the batch's average code distribution). "
                                       "Counters codebook collapse; 0 disables. Default: the preset's (cifar and "
                                       "imagenet 0.3, mnist and tiny 0; benchmarks/RESULTS.md, 'Codebook collapse')."})
    usage_weight_end: float | None = field(default=None, metadata={"help": "DAPS: λ of the usage term at the end of "
                                           "the run; λ moves linearly from --usage_weight to it (default: constant)."})
    usage_margin: float = field(default=0.0, metadata={"help": "DAPS: nats of the usage term left unpenalised: "
                                "only its excess over the margin counts, so the term acts only when the batch's codes "
                                "concentrate (a collapse guard; e.g. 2.77 = log 256 / 2 acts below a perplexity of 16)."})
    usage_mutual_information: bool = field(default=True, metadata={"help": "DAPS: the usage term also includes each "
                                           "token's mean entropy (log V − I instead of log V − H(q̄)), so each token "
                                           "stays confident while the codebook is used evenly."})
    credit: str = field(default="sequence", metadata={"help": "DAPS: 'sequence' (one weight per sample, from its whole "
                        "log p(x | z), the paper's) or 'token' (the encoder's weights per sample and token, from the "
                        "log-likelihood of the pixels under each token's cell of the conv decoder's grid)."})
    credit_window: int = field(default=1, metadata={"help": "DAPS with --credit token: odd side of the square of grid "
                               "cells credited to a token (1: its own cell; 3: with its 8 neighbours)."})
    fixed_code_blocks: bool = field(default=False, metadata={"help": "DAPS with the k-means start: the decoder reads "
                                    "each code as its k-means pixel block only (the code table's learned part zeroed "
                                    "and the table not trained)."})
    proposal: str = field(default="sampled", metadata={"help": "DAPS: where a step's candidates come from: 'sampled' "
                          "(K whole sequences drawn from q, the paper's) or 'local' (single-token changes of the "
                          "greedy code, each token weighed by its own trust-region update; conv decoder)."})
    local_candidates: int = field(default=3, metadata={"help": "DAPS with --proposal local: N, the most probable "
                                  "codes other than the greedy one tried at a position."})
    local_colours: int = field(default=3, metadata={"help": "DAPS with --proposal local: how many of the 9 colours of "
                               "the (row mod 3, column mod 3) code-grid colouring get candidates in a step."})
    local_kl: float = field(default=1.0, metadata={"help": "DAPS with --proposal local: the trust region, mean "
                            "KL(q* || q) in nats per credited token."})
    warm_start_steps: int = field(default=0, metadata={"help": "DAPS: the first N steps fit the encoder (maximum "
                                  "likelihood) and the decoder to patch k-means codes (V centroids of the pixel "
                                  "blocks under the tokens, fitted on the training images at the start and charged to "
                                  "the run's time) instead of DAPS steps; 0: none."})
    gumbel_temperature_start: float = field(default=1.0, metadata={"help": "Gumbel-Softmax temperature at the start."})
    gumbel_temperature_end: float | None = field(default=None, metadata={"help": "At the end (default 0.75 AR, 0.1 NA)."})
    vq_commitment: float = field(default=0.25, metadata={"help": "VQ-VAE commitment weight."})
    vq_restart_dead_codes: bool = field(default=True, metadata={"help": "VQ: re-seed unused codes from encoder outputs."})
    fsq_levels: str | None = field(default=None, metadata={"help": "FSQ levels, e.g. '8,8,8' (default: about V codes)."})
    code_embedding: str | None = field(default=None, metadata={"help": "Categorical methods: how a code enters the "
                                "decoder: 'learned' (a free vector per code) or 'lattice' (the fixed point of the FSQ "
                                "lattice --fsq_levels whose index is the code: the FSQ baseline's decoder input). "
                                "Default: lattice for daps and daps-na with the mnist preset, else learned."})
    code_head: str | None = field(default=None, metadata={"help": "Categorical methods: 'full' (V logits per code), "
                           "'factorized' (one softmax per coordinate of the code's FSQ-lattice point, --fsq_levels) or "
                           "'ordinal' (the same, each coordinate's logits a quadratic in its level: two per coordinate). "
                           "Default: ordinal for daps and factorized for daps-na with the mnist preset, else full."})
    pixel_paths: bool | None = field(default=None, metadata={"help": "Categorical methods: linear paths between a "
                                     "code and the pixels of its own patch (a pixel head on the encoder's logits, a "
                                     "pixel block per code added to the decoder's output); zero unless "
                                     "--kmeans_init. Default: on for daps and daps-na with the cifar and imagenet presets "
                                     "when each token has its own patch (benchmarks/RESULTS.md, 'k-means start'), "
                                     "else off."})
    kmeans_init: bool | None = field(default=None, metadata={"help": "DAPS with --pixel_paths: start the model as a "
                                     "patch k-means tokenizer (pixel head = the mixture posterior over centroids, pixel "
                                     "blocks = the centroids), the k-means fitted at the start and charged to the run's "
                                     "time. Default: on whenever the model has pixel paths and is not --init_from."})
    kmeans_temperature: float = field(default=1.0, metadata={"help": "DAPS k-means start: temperature τ of the pixel "
                                      "head's mixture posterior (σ² → τσ²); above 1 starts q broader."})
    decoder_gate_init: float | None = field(default=None, metadata={"help": "With --pixel_paths: the starting value "
                                            "of the decoder network's output gate (default: the config's, 0.3; 0 "
                                            "starts as exactly the k-means tokenizer but the network adds little)."})
    aligned_patches: bool | None = field(default=None, metadata={"help": "Add to each code token's input the patch "
                                         "features under its cell of the code grid (every method's encoder), besides "
                                         "cross-attention. Default: as --pixel_paths for daps and daps-na; off for the "
                                         "baselines."})
    num_tokens: int | None = field(default=None, metadata={"help": "Override L, codes per image."})
    codebook_size: int | None = field(default=None, metadata={"help": "Override V, values per code."})
    patch_size: int | None = field(default=None, metadata={"help": "Override the encoder's patch size."})
    initializer_range: float | None = field(default=None, metadata={"help": "Override the weight initialisation std."})
    head_initializer_range: float | None = field(default=None, metadata={"help": "Override the code head's init std "
                                                 "(default: 0.3 for daps and daps-na, the preset's for the baselines)."})
    config_overrides: str | None = field(default=None, metadata={"help": "Architecture settings of the preset to "
                                         "change, as comma-separated key=value pairs of DapsConfig fields, e.g. "
                                         "'code_layers=1,decoder_hidden_size=1024' (encoder depth, decoder capacity); "
                                         "applied to every method alike. Fields the method sets (quantizer, "
                                         "encoder_type, fsq_levels, ...) and the data's image_size/num_channels are "
                                         "refused; not with --init_from."})
    image_size: int | None = field(default=None, metadata={"help": "Resize the dataset's images to this size."})
    init_from: str | None = field(default=None, metadata={"help": "Start from a saved tokenizer folder (fine-tuning)."})
    eval_every: int = field(default=250, metadata={"help": "Held-out evaluation every N steps (0: only at the end)."})
    eval_images: int = field(default=500, metadata={"help": "Held-out images per periodic evaluation (all at the end)."})
    load_best_model_at_end: bool = field(default=False, metadata={"help": "Keep the weights of the periodic "
                                          "evaluation with the highest held-out PSNR (every --eval_every steps, and "
                                          "where the decoder polish starts) and return to them when training ends, "
                                          "before the polish when there is one, so that the polish trains the decoder "
                                          "on the chosen encoder's codes. Selection reads the validation images only "
                                          "(benchmarks/quality.py reports the test split). Needs --eval_every > 0."})
    save_every: int = field(default=500, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many checkpoints to keep."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest complete checkpoint in output_dir."})
    augment_flip: bool = field(default=False, metadata={"help": "Flip each training image left-right with "
                               "probability 1/2 (a new draw each step, reproducible from the seed and the step); "
                               "for every method alike. Off by default."})
    augment_rotate: bool = field(default=False, metadata={"help": "Rotate each training image by a random multiple "
                                 "of 90 degrees (square images; drawn like the flips). Off by default."})
    augment_channels: bool = field(default=False, metadata={"help": "Put each training image's colour channels in a "
                                   "random order (colour images; drawn like the flips). Off by default."})
    augment_shift: int | None = field(default=None, metadata={"help": "Move each training image by up to N pixels "
                                      "along each axis (uniform in -N..N, edge pixels fill the border; drawn like the "
                                      "flips), for every method alike, against overfitting a small dataset. 0: off. "
                                      "Auto: 2 on mnist-5k, else 0."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, batches and sampling."})
    mixed_precision: str = field(default="no", metadata={"help": "'no' (fp32) or 'bf16' (autocast; sampling stays fp32)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    log_with: str | None = field(default=None, metadata={"help": "An Accelerate tracker, e.g. 'tensorboard'."})
    log_every: int = field(default=10, metadata={"help": "Write a JSONL log row every N steps."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty output_dir."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    keep_freed_memory: bool = field(default=False, metadata={"help": "On Linux with glibc: keep freed memory in the "
                                    "process for reuse (mallopt) instead of returning each large activation buffer "
                                    "to the system and faulting its pages in again on the next step. Measured on "
                                    "cifar: DAPS steps 6-8 %% faster, FSQ steps 3-5 %% slower, peak RSS unchanged "
                                    "(benchmarks/freed_memory.py); off by default so that every method runs alike."})
