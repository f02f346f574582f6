"""The DAPS image tokenizer: an image becomes L discrete codes and the codes become an image again.

Reads top to bottom in the order the data flows (DAPS.md, "Reference architecture"):

    pixels (B, C, H, W)
      → patch embedding + sinusoidal positions          DapsPatchEncoder
      → bidirectional transformer over the P patches     (memory, (B, P, d))
      → code transformer, cross-attending to the memory  DapsCodeTransformer
          autoregressive: causal over [BOS, z_1 … z_{L-1}] → logits of z_1 … z_L
          parallel:       L learned queries              → logits (or latents) of every code at once
      → codes (B, L)  (sampled or greedy; VQ/FSQ: quantised latents)
      → decoder                                          DapsDecoder
      → likelihood parameters: Bernoulli logits, or Gaussian mean and log-variance, (B, C, H, W)

This file stands alone (torch, transformers and the configuration only) so that `save_pretrained` can ship it for
`trust_remote_code` loading. Training lives in the `training` package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_daps import DapsConfig, code_grid_shape


# ----------------------------------------------------------------------------------------------- outputs
@dataclass
class DapsEncoderOutput(ModelOutput):
    """Result of [`DapsModel.encode`].

    Args:
        codes (`torch.LongTensor` of shape `(B, L)`, or `(B, K, L)` when `num_samples=K` is given):
            the codes, integers in `[0, codebook_size)`.
        log_prob (`torch.FloatTensor` of shape `(B,)` or `(B, K)`):
            log q(codes | x) in nats under the model at temperature 1, whatever temperature the codes were sampled
            at: the rate. Deterministic quantisers (VQ, FSQ) put all mass on one code, so it is 0 for them.
    """

    codes: torch.LongTensor | None = None
    log_prob: torch.FloatTensor | None = None


@dataclass
class DapsDecoderOutput(ModelOutput):
    """Result of [`DapsModel.decode`].

    Args:
        pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)` or `(B, K, C, H, W)`):
            the decoder's mean, in the same normalisation as the encoder's input (Bernoulli: [0, 1]; Gaussian:
            the processor's normalisation, [-1, 1] by default).
        logits (`torch.FloatTensor`, same shape, Bernoulli likelihood only): the Bernoulli logits.
        log_variance (`torch.FloatTensor`, same shape, Gaussian likelihood only): per-pixel log-variance.
    """

    pixel_values: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    log_variance: torch.FloatTensor | None = None


@dataclass
class DapsModelOutput(ModelOutput):
    """Result of [`DapsModel.forward`]: everything one DAPS training step needs from the model.

    Args:
        codes (`torch.LongTensor` of shape `(B, K, L)`): the given codes, or K codes sampled without gradient.
        log_prob (`torch.FloatTensor` of shape `(B, K)`): teacher-forced log q(codes | x), with gradient.
        reconstruction_log_likelihood (`torch.FloatTensor` of shape `(B, K)`): log p(x | codes), summed over
            pixels and channels, with gradient.
        reconstruction (`torch.FloatTensor` of shape `(B, K, C, H, W)`): the decoder's mean.
    """

    codes: torch.LongTensor | None = None
    log_prob: torch.FloatTensor | None = None
    reconstruction_log_likelihood: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None


# The encoder's search modes (`DapsModel.encode(search=...)`).
SEARCH_METHODS = ("best-of-n", "local", "parallel")
# What a search maximises (`DapsModel.encode(search_objective=...)`).
SEARCH_OBJECTIVES = ("likelihood", "squared_error")


def token_window_sums(token_values: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """(..., L) values laid on the (rows, columns) code grid in raster order → each one's sum over the `window` ×
    `window` square of grid cells centred on it (cells outside the grid count 0); `window` odd, 1 returns the input."""
    if window == 1:
        return token_values
    rows, columns = grid
    cells = token_values.reshape(-1, 1, rows, columns)
    summed = F.avg_pool2d(cells, window, stride=1, padding=window // 2, count_include_pad=True) * window**2
    return summed.reshape(token_values.shape)


def grid_colours(grid: tuple[int, int], stride: int, device=None) -> torch.Tensor:
    """(L,) each token's colour in the (row mod `stride`, column mod `stride`) colouring of the (rows, columns) code
    grid, raster order: `stride`² colours, and two tokens of one colour are at least `stride` cells apart."""
    rows, columns = grid
    position = torch.arange(rows * columns, device=device)
    return (position // columns % stride) * stride + position % columns % stride


# ----------------------------------------------------------------------------------------------- building blocks
def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Probabilities and likelihoods are computed in fp32 (or fp64 for an fp64 model), never in bf16/fp16."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Fixed sinusoidal position table (length, dim), as in "Attention is all you need"."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, causal: bool = False,
           cached: bool = False) -> torch.Tensor:
    """Scaled dot-product attention, (N, heads, T, hd) × (N, heads, S, hd) → (N, heads, T, hd).

    Short unmasked queries (a cached decoding step: one query per sequence, or the K samples of an image in
    cross-attention) use a plain matmul–softmax–matmul: on CPU it ran about twice as fast as
    `scaled_dot_product_attention` there (benchmarks/speed.py), with the same result up to rounding.

    bf16 on CPU uses the same plain path (with the causal mask) whenever the score tensor is small (at most 2**25
    elements): the CPU flash-attention kernel's bf16 backward ran 3-6x slower than this path's, and its bf16
    forward no faster (benchmarks/speed.py, cifar training step). fp32 is unchanged.

    `cached`: keys and values are the filled part of a preallocated cache (a strided view). bf16 matrix products on
    CPU copy such views to contiguous memory first, so there `scaled_dot_product_attention`, which reads them in
    place, is used: the K-sample bf16 sampling loop of a cifar DAPS step ran about 1.3x faster, the bf16 training
    step 1.1x (benchmarks/sampling_loop.py). fp32, whose plain path reads strided views without copying and was not
    faster this way, stays on the plain path.
    """
    if cached and query.dtype == torch.bfloat16 and query.device.type == "cpu":
        return F.scaled_dot_product_attention(query, keys, values, is_causal=causal)
    short = query.shape[-2] <= 32 and not causal
    small_bf16_cpu = (query.dtype == torch.bfloat16 and query.device.type == "cpu"
                      and query.shape[:-2].numel() * query.shape[-2] * keys.shape[-2] <= 2**25)
    if short or small_bf16_cpu:
        scores = _at_least_float32((query @ keys.transpose(-1, -2)) * (query.shape[-1] ** -0.5))
        if causal:
            # Top-left aligned, as scaled_dot_product_attention's is_causal: query i sees keys 0..i.
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return torch.softmax(scores, dim=-1).to(values.dtype) @ values
    return F.scaled_dot_product_attention(query, keys, values, is_causal=causal)


class DapsMLP(nn.Module):
    def __init__(self, config: DapsConfig):
        super().__init__()
        inner = int(config.hidden_size * config.mlp_ratio)
        self.fc_in = nn.Linear(config.hidden_size, inner)
        self.fc_out = nn.Linear(inner, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(hidden)))


class DapsSelfAttention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection and an optional key/value cache."""

    def __init__(self, config: DapsConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, causal: bool = False, cache: "DapsLayerCache | None" = None,
                position: int | None = None) -> torch.Tensor:
        # hidden: (N, T, d). With a cache, T is the number of new positions, written at `position`.
        n, t, d = hidden.shape
        q, k, v = self.qkv(hidden).view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            cache.keys[:, :, position : position + t] = k
            cache.values[:, :, position : position + t] = v
            k = cache.keys[:, :, : position + t]
            v = cache.values[:, :, : position + t]
            # Only t == 1 steps are cached: the new query may see every cached position, so no mask is needed.
            causal = causal and t > 1
        attended = attend(q, k, v, causal=causal, cached=cache is not None)
        return self.out(attended.transpose(1, 2).reshape(n, t, d))


class DapsCrossAttention(nn.Module):
    """Attention from the code tokens to the patch features (the memory).

    The K code sequences of one image share that image's memory. Rather than copying the memory K times, the
    queries of the K sequences are laid side by side, (B·K, T, d) → (B, K·T, d): one attention call per image,
    exact, since cross-attention has no mask.
    """

    def __init__(self, config: DapsConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key_value = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def memory_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # memory: (B, P, d) → keys, values: (B, heads, P, head_dim); computed once per image.
        b, p, _ = memory.shape
        k, v = self.key_value(memory).view(b, p, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # Contiguous once per image: every later step attends to these (non-contiguous keys were ~2x slower).
        return k.contiguous(), v.contiguous()

    def forward(self, hidden: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        keys, values = memory_kv
        b = keys.shape[0]
        n, t, d = hidden.shape
        q = self.query(hidden).reshape(b, (n // b) * t, self.num_heads, self.head_dim).transpose(1, 2)
        attended = attend(q, keys, values)
        return self.out(attended.transpose(1, 2).reshape(n, t, d))


class DapsPatchLayer(nn.Module):
    """Pre-LN bidirectional transformer layer over the patches."""

    def __init__(self, config: DapsConfig):
        super().__init__()
        self.norm_attention = nn.LayerNorm(config.hidden_size)
        self.attention = DapsSelfAttention(config)
        self.norm_mlp = nn.LayerNorm(config.hidden_size)
        self.mlp = DapsMLP(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attention(self.norm_attention(hidden))
        return hidden + self.mlp(self.norm_mlp(hidden))


class DapsCodeLayer(nn.Module):
    """Pre-LN layer over the code tokens: self-attention (causal when autoregressive), cross-attention, MLP."""

    def __init__(self, config: DapsConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(config.hidden_size)
        self.self_attention = DapsSelfAttention(config)
        self.norm_cross = nn.LayerNorm(config.hidden_size)
        self.cross_attention = DapsCrossAttention(config)
        self.norm_mlp = nn.LayerNorm(config.hidden_size)
        self.mlp = DapsMLP(config)

    def forward(self, hidden, memory_kv, causal: bool, cache=None, position=None):
        hidden = hidden + self.self_attention(self.norm_self(hidden), causal=causal, cache=cache, position=position)
        hidden = hidden + self.cross_attention(self.norm_cross(hidden), memory_kv)
        return hidden + self.mlp(self.norm_mlp(hidden))


@dataclass
class DapsLayerCache:
    """Preallocated self-attention keys and values of one code layer: (N, heads, L, head_dim) each."""

    keys: torch.Tensor
    values: torch.Tensor


# ----------------------------------------------------------------------------------------------- encoder
class DapsPatchEncoder(nn.Module):
    """pixels (B, C, H, W) → patch features, the memory the code tokens attend to, (B, P, d)."""

    def __init__(self, config: DapsConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.register_buffer(
            "positions", sinusoidal_positions(config.num_patches, config.hidden_size), persistent=False
        )
        self.layers = nn.ModuleList([DapsPatchLayer(config) for _ in range(config.patch_layers)])
        self.norm = nn.LayerNorm(config.hidden_size)
        self.patch_size = config.patch_size
        # pixel_paths: logits of every code from the raw patch, linear (DapsConfig.pixel_paths).
        self.pixel_head = nn.Linear(config.patch_dim, config.codebook_size) if config.pixel_paths else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2) + self.positions
        for layer in self.layers:
            hidden = layer(hidden)
        hidden = self.norm(hidden)
        if self.pixel_head is None:
            return hidden
        # The pixel head's V logits per patch travel with the features: (B, P, d + V).
        patches = patch_pixels(pixel_values, self.patch_size)
        return torch.cat([hidden, self.pixel_head(patches.to(hidden.dtype)).to(hidden.dtype)], dim=-1)


def patch_pixels(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → the raw patches in raster order, (B, P, C · patch_size²), channel-major within a patch."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    blocks = pixel_values.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return blocks.reshape(b, (h // p) * (w // p), c * p * p)


def unpatch_pixels(patches: torch.Tensor, rows: int, columns: int, channels: int) -> torch.Tensor:
    """Inverse of `patch_pixels` on a rows × columns grid: (N, rows·columns, C·p²) → (N, C, rows·p, columns·p)."""
    n = patches.shape[0]
    side = math.isqrt(patches.shape[-1] // channels)
    blocks = patches.reshape(n, rows, columns, channels, side, side).permute(0, 3, 1, 4, 2, 5)
    return blocks.reshape(n, channels, rows * side, columns * side)


class DapsCodeMemory(list):
    """What the code tokens read from one batch of images: the cross-attention keys and values of each code layer
    (a list, one (keys, values) pair per layer) and, with `aligned_patches`, the patch features pooled onto the token
    grid, `aligned` (B, L, d), added to token t's input (else None)."""

    def __init__(self, layers_kv, aligned: torch.Tensor | None = None, pixel_logits: torch.Tensor | None = None):
        super().__init__(layers_kv)
        self.aligned = aligned
        self.pixel_logits = pixel_logits   # pixel_paths: (B, L, V) added to the head's logits, else None

    @staticmethod
    def _per_sequence(values: torch.Tensor | None, num_sequences: int, position: int | None):
        """Per-image values (B, L, ·) repeated for K = num_sequences / B sequences per image (sample-major within each
        image, as the codes are laid out): (B·K, L, ·), or (B·K, 1, ·) at one position; None stays None."""
        if values is None:
            return None
        values = values if position is None else values[:, position:position + 1]
        return values.repeat_interleave(num_sequences // values.shape[0], dim=0)

    def pixel_logits_for(self, num_sequences: int, position: int | None = None) -> torch.Tensor | int:
        """The pixel head's logits per sequence, like `aligned_for`; 0 without pixel_paths."""
        logits = self._per_sequence(self.pixel_logits, num_sequences, position)
        return 0 if logits is None else logits

    def aligned_for(self, num_sequences: int, position: int | None = None) -> torch.Tensor | None:
        """The aligned inputs per sequence: (B·K, L, d), or (B·K, 1, d) at one position; None without them."""
        return self._per_sequence(self.aligned, num_sequences, position)


class DapsCodeTransformer(nn.Module):
    """The code tokens' transformer and its head.

    Autoregressive: input t is the embedding of z_{t-1} (a dedicated BOS id V at t = 0), causal self-attention;
    the head at t gives the logits of z_t. Parallel: input t is a learned query; the head gives every position
    at once. The head's width is V for a categorical encoder, or the quantiser's latent size for VQ/FSQ.
    """

    def __init__(self, config: DapsConfig, head_size: int):
        super().__init__()
        self.autoregressive = config.encoder_type == "autoregressive"
        if self.autoregressive:
            # V codes plus the BOS id: BOS is never a code, so code 0 means the same in sampling and teacher forcing.
            self.token_embedding = nn.Embedding(config.codebook_size + 1, config.hidden_size)
        else:
            self.queries = nn.Parameter(torch.zeros(config.num_tokens, config.hidden_size))
        self.register_buffer(
            "positions", sinusoidal_positions(config.num_tokens, config.hidden_size), persistent=False
        )
        self.layers = nn.ModuleList([DapsCodeLayer(config) for _ in range(config.code_layers)])
        self.norm = nn.LayerNorm(config.hidden_size)
        # The ordinal head is a factorized head whose coordinate logits are a quadratic in the level (two outputs
        # per coordinate instead of one per level); everything after `coordinate_log_probs` is shared.
        self.factorized = config.quantizer == "categorical" and config.code_head != "full"
        self.ordinal = config.quantizer == "categorical" and config.code_head == "ordinal"
        if self.factorized:
            self.levels = list(config.fsq_levels)
            head_size = 2 * len(self.levels) if self.ordinal else sum(self.levels)
        self.head = nn.Linear(config.hidden_size, head_size)
        if self.factorized:
            # Code c has coordinates (c // basis_d) % levels_d, the first coordinate varying fastest (mixed radix).
            self.bases = [math.prod(self.levels[:d]) for d in range(len(self.levels))]
        self.bos_token_id = config.codebook_size
        self.pixel_paths, self.codebook_size = config.pixel_paths, config.codebook_size
        self.aligned_grid = None
        if config.aligned_patches:
            side = config.image_size // config.patch_size
            self.patch_grid = (side, side)
            self.aligned_grid = _grid_shape(config.num_tokens)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last hidden states (..., d) → head outputs (..., head_size); for the factorized head, the normalised
        log-probabilities of all V codes (..., V): the sum of each coordinate's log-softmax."""
        if not self.factorized:
            return self.head(self.norm(hidden))
        parts = self.coordinate_log_probs(hidden)
        # An outer sum of the coordinates' log-softmaxes from the last coordinate inwards lays the V sums out in code
        # order (`bases`) with broadcast adds only. Gathering (..., V, D) columns and summing gives the same values
        # but made the mnist DAPS step 1.18× slower (benchmarks/code_head_cost.py; benchmarks/RESULTS.md,
        # "Twenty-fourth session"). Sampling and an update's log q need only the coordinates (`_sample_from_memory`).
        log_probs = parts[-1]
        for part in reversed(parts[:-1]):
            log_probs = (log_probs[..., :, None] + part[..., None, :]).flatten(-2)
        return log_probs

    def coordinate_log_probs(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Factorized head only: last hidden states (..., d) → each lattice coordinate's log-softmax, a list of
        (..., levels_d) fp32 tensors. log q of code c is the sum over d of entry (c // bases[d]) % levels[d] of the
        d-th tensor (before any pixel-path logits are added)."""
        output = self.head(self.norm(hidden)).float()
        if self.ordinal:
            # Level i of a coordinate with n levels sits at u_i = i − (n − 1)/2; its logit a·u_i − softplus(b)·u_i²
            # (a, b: the coordinate's two outputs) is a Gaussian's log-density up to a constant, on the levels only.
            slopes, curvatures = output.split(len(self.levels), dim=-1)
            curvatures = F.softplus(curvatures)
            parts = []
            for d, level in enumerate(self.levels):
                u = torch.arange(level, device=output.device, dtype=output.dtype) - (level - 1) / 2
                parts.append(torch.log_softmax(slopes[..., d, None] * u - curvatures[..., d, None] * u * u, dim=-1))
            return parts
        return [torch.log_softmax(part, dim=-1) for part in output.split(self.levels, dim=-1)]

    def codes_from_coordinates(self, coordinates: list[torch.Tensor]) -> torch.Tensor:
        """Lattice coordinates, a list of same-shape integer tensors (one per coordinate) → code ids, that shape."""
        codes = coordinates[0]
        for coordinate, basis in zip(coordinates[1:], self.bases[1:]):
            codes = codes + coordinate * basis
        return codes

    def memory_keys_values(self, memory: torch.Tensor) -> DapsCodeMemory:
        """Patch features (B, P, d) → what every code step reads (`DapsCodeMemory`), computed once per image."""
        aligned, pixel_logits = None, None
        if self.pixel_paths:
            memory, pixel_logits = memory.split([memory.shape[-1] - self.codebook_size, self.codebook_size], dim=-1)
        if self.aligned_grid is not None:
            b, _, d = memory.shape
            grid = memory.transpose(1, 2).reshape(b, d, *self.patch_grid)
            aligned = F.adaptive_avg_pool2d(grid, self.aligned_grid).flatten(2).transpose(1, 2)   # (B, L, d)
        return DapsCodeMemory([layer.cross_attention.memory_keys_values(memory) for layer in self.layers], aligned,
                              pixel_logits)

    def coordinates_of(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Factorized head: code ids (any shape) → their lattice coordinates, one tensor of that shape per coordinate."""
        return [torch.div(codes, basis, rounding_mode="floor") % level for basis, level in zip(self.bases, self.levels)]

    def teacher_forced(self, codes: torch.Tensor, memory_kv, coordinates: bool = False):
        """codes (N, L) with N = B·K, sample-major within each image → head outputs (N, L, head_size); with
        `coordinates` (factorized head, no pixel paths), `coordinate_log_probs`, (N, L, levels_d) each, instead."""
        bos = torch.full_like(codes[:, :1], self.bos_token_id)
        hidden = self.token_embedding(torch.cat([bos, codes[:, :-1]], dim=1)) + self.positions
        aligned = memory_kv.aligned_for(codes.shape[0])
        if aligned is not None:
            hidden = hidden + aligned
        for layer, layer_kv in zip(self.layers, memory_kv):
            hidden = layer(hidden, layer_kv, causal=True)
        if coordinates:
            return self.coordinate_log_probs(hidden)
        return self.project(hidden) + memory_kv.pixel_logits_for(codes.shape[0])

    def parallel(self, batch_size: int, memory_kv, coordinates: bool = False):
        """Parallel encoder: head outputs of every position, (B, L, head_size); with `coordinates` (factorized head,
        no pixel paths), `coordinate_log_probs` of every position instead."""
        hidden = (self.queries + self.positions).expand(batch_size, -1, -1)
        aligned = memory_kv.aligned_for(batch_size)
        if aligned is not None:
            hidden = hidden + aligned
        for layer, layer_kv in zip(self.layers, memory_kv):
            hidden = layer(hidden, layer_kv, causal=False)
        if coordinates:
            return self.coordinate_log_probs(hidden)
        return self.project(hidden) + memory_kv.pixel_logits_for(batch_size)

    def new_cache(self, num_sequences: int, reference: torch.Tensor) -> list[DapsLayerCache]:
        attention = self.layers[0].self_attention
        shape = (num_sequences, attention.num_heads, self.positions.shape[0], attention.head_dim)
        device = reference.device.type
        # Under autocast the projections produce the autocast dtype: store that, so no step re-casts the cache.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else reference.dtype
        return [
            DapsLayerCache(reference.new_empty(shape, dtype=dtype), reference.new_empty(shape, dtype=dtype))
            for _ in self.layers
        ]

    def step(self, previous_codes: torch.Tensor, position: int, memory_kv, cache, coordinates: bool = False):
        """One cached autoregressive step: previous codes (N,) (or BOS) → logits of position `position`, (N, V); with
        `coordinates` (factorized head, no pixel paths), its `coordinate_log_probs`, (N, levels_d) each, instead."""
        hidden = self.token_embedding(previous_codes)[:, None] + self.positions[position]
        aligned = memory_kv.aligned_for(previous_codes.shape[0], position)
        if aligned is not None:
            hidden = hidden + aligned
        for layer, layer_kv, layer_cache in zip(self.layers, memory_kv, cache):
            hidden = layer(hidden, layer_kv, causal=True, cache=layer_cache, position=position)
        if coordinates:
            return [part[:, 0] for part in self.coordinate_log_probs(hidden)]
        return (self.project(hidden) + memory_kv.pixel_logits_for(previous_codes.shape[0], position))[:, 0]


# ----------------------------------------------------------------------------------------------- quantisers
class DapsFiniteScalarQuantizer(nn.Module):
    """FSQ: each latent dimension bounded and rounded to one of `levels[i]` values; the code is the mixed-radix index.

    Runs in fp32 whatever the autocast context: rounding in bf16 would move codes.
    """

    def __init__(self, levels: list[int]):
        super().__init__()
        levels_tensor, basis = self.level_tensors(levels)
        self.register_buffer("levels", levels_tensor, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    @staticmethod
    def level_tensors(levels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The levels and the mixed-radix basis that turns per-dimension indices into one code."""
        basis = torch.cumprod(torch.tensor([1] + list(levels[:-1]), dtype=torch.long), dim=0)
        return torch.tensor(levels, dtype=torch.long), basis

    @property
    def dim(self) -> int:
        return self.levels.numel()

    def bound(self, latents: torch.Tensor) -> torch.Tensor:
        # Map R → the open interval covering the levels, with an offset for even level counts (FSQ paper, §3).
        half = (self.levels.float() - 1) * (1 - 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(latents.float() + shift) * half - offset

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (..., D) → (values scaled to [-1, 1] with straight-through gradient, codes (...))."""
        with torch.autocast(device_type=latents.device.type, enabled=False):
            bounded = self.bound(latents)
            rounded = bounded + (torch.round(bounded) - bounded).detach()
            half_width = (self.levels // 2).float()
            indices = (torch.round(bounded) + half_width).long().clamp(min=0)
            indices = torch.minimum(indices, self.levels - 1)
            codes = (indices * self.basis).sum(-1)
            return rounded / half_width, codes

    def codes_to_values(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (...) → quantised values in [-1, 1], (..., D)."""
        indices = (codes[..., None] // self.basis) % self.levels
        half_width = (self.levels // 2).float()
        return (indices.float() - half_width) / half_width


class DapsVectorQuantizer(nn.Module):
    """VQ: the code is the index of the nearest codebook vector (fp32 distances)."""

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, dim)

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents (..., D) → (nearest codebook vectors (..., D), codes (...)); no gradient trick here (training's job)."""
        with torch.autocast(device_type=latents.device.type, enabled=False):
            flat = latents.float().reshape(-1, latents.shape[-1])
            weight = self.codebook.weight.float()
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ weight.t() + weight.pow(2).sum(1)[None]
            codes = distances.argmin(dim=1).view(latents.shape[:-1])
            return self.codebook(codes), codes

    def codes_to_values(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook(codes)


# ----------------------------------------------------------------------------------------------- decoder
class DapsResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.conv2(F.silu(self.conv1(F.silu(hidden))))


_grid_shape = code_grid_shape


class DapsDecoder(nn.Module):
    """Code embeddings (N, L, e) → likelihood parameters (N, out_channels, H, W).

    conv: the L embeddings laid on a near-square grid, a 3×3 convolution, residual blocks, stride-2 transposed
    convolutions until the grid reaches the image size (resampled exactly to it if the sizes are not powers of two
    apart). mlp: the L embeddings concatenated, two hidden layers, one linear map to every pixel.
    """

    def __init__(self, config: DapsConfig, embedding_dim: int, out_channels: int):
        super().__init__()
        # pixel_paths: the last patch_dim entries of each code's embedding are a block of pixels added to the output
        # (the mean, or the Bernoulli logits) at the code's cell. The network reads the whole embedding, block
        # included: from a k-means start its input already says what each code looks like, and it learns a
        # correction (deblocking) instead of first learning the codes from random embeddings (+0.5 dB in 600 decoder
        # steps where the blind network gained nothing; benchmarks/RESULTS.md, "The decoder that refines the k-means
        # blocks").
        self.pixel_dim = config.patch_dim if config.pixel_paths else 0
        # ... and the network's output is scaled per channel by a gate that starts small (config.decoder_gate_init,
        # as in ReZero): a model whose blocks are set (k-means) decodes nearly them at first, and Adam's first steps
        # cannot swamp them (a zero-initialised last layer moved by Adam did: the decoder's loss blew up within 30
        # steps). A gate of exactly 0 opened too slowly (the mean channels' stayed near 0.01 over 600 steps).
        self.network_gate = nn.Parameter(torch.zeros(out_channels)) if config.pixel_paths else None
        # A per-channel offset outside the gate (zero at first): k-means sets the variance channels' from the
        # within-cluster variance, so the likelihood is calibrated at step one.
        self.output_bias = nn.Parameter(torch.zeros(out_channels)) if config.pixel_paths else None
        self.pixel_grid = _grid_shape(config.num_tokens)
        self.num_channels = config.num_channels
        self.decoder_type = config.decoder_type
        self.image_size = config.image_size
        self.out_channels = out_channels
        width = config.decoder_hidden_size
        if config.decoder_type == "mlp":
            self.mlp = nn.Sequential(
                nn.Linear(config.num_tokens * embedding_dim, width), nn.GELU(),
                nn.Linear(width, width), nn.GELU(),
                nn.Linear(width, out_channels * config.image_size**2),
            )
        else:
            self.grid = _grid_shape(config.num_tokens)
            self.conv_in = nn.Conv2d(embedding_dim, width, 3, padding=1)
            self.res_blocks = nn.Sequential(*[DapsResidualBlock(width) for _ in range(config.decoder_res_blocks)])
            upsamplings = max(0, math.ceil(math.log2(config.image_size / min(self.grid))))
            self.upsample = nn.ModuleList(
                [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1) for _ in range(upsamplings)]
            )
            self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if not self.pixel_dim:
            return self._network(embeddings)
        pixels = embeddings[..., embeddings.shape[-1] - self.pixel_dim:]
        output = self._network(embeddings) * self.network_gate[:, None, None].to(embeddings.dtype) \
            + self.output_bias[:, None, None].to(embeddings.dtype)
        blocks = unpatch_pixels(pixels, *self.pixel_grid, self.num_channels).to(output.dtype)
        return torch.cat([output[:, :self.num_channels] + blocks, output[:, self.num_channels:]], dim=1)

    def _network(self, embeddings: torch.Tensor) -> torch.Tensor:
        n = embeddings.shape[0]
        if self.decoder_type == "mlp":
            return self.mlp(embeddings.reshape(n, -1)).view(n, self.out_channels, self.image_size, self.image_size)
        rows, columns = self.grid
        hidden = embeddings.transpose(1, 2).reshape(n, -1, rows, columns)
        hidden = self.res_blocks(self.conv_in(hidden))
        for upsample in self.upsample:
            hidden = upsample(F.silu(hidden))
        if hidden.shape[-2:] != (self.image_size, self.image_size):
            hidden = F.interpolate(hidden, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.conv_out(F.silu(hidden))


# ----------------------------------------------------------------------------------------------- the model
class DapsPreTrainedModel(PreTrainedModel):
    config_class = DapsConfig
    base_model_prefix = "daps"
    main_input_name = "pixel_values"
    _no_split_modules = ["DapsPatchLayer", "DapsCodeLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if self.config.pixel_paths and module is getattr(getattr(self, "patch_encoder", None), "pixel_head", None):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, DapsDecoder) and module.network_gate is not None:
            init.constant_(module.network_gate, self.config.decoder_gate_init)
            init.zeros_(module.output_bias)
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            # Convolutions keep their activations' scale (LeCun normal, std 1/sqrt(fan-in)) whatever
            # initializer_range says: a fixed std would blow the conv decoder's output up or shrink it to nothing.
            kernel = module.kernel_size[0] * module.kernel_size[1]
            fan_in = module.in_channels * kernel // (module.stride[0] * module.stride[1] if isinstance(
                module, nn.ConvTranspose2d) else 1)
            init.normal_(module.weight, mean=0.0, std=fan_in**-0.5)
        # Non-persistent buffers are not in the checkpoint: from_pretrained builds the model on the meta device, so
        # they must be (re)computed here or they would hold garbage after loading.
        if isinstance(module, (DapsPatchEncoder, DapsCodeTransformer)):
            init.copy_(module.positions, sinusoidal_positions(*module.positions.shape))
        if isinstance(module, DapsCodeTransformer) and not module.autoregressive:
            init.normal_(module.queries, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, DapsCodeTransformer) and self.config.head_initializer_range is not None:
            init.normal_(module.head.weight, mean=0.0, std=self.config.head_initializer_range)
        if (module is getattr(self, "code_embedding", None) and self.config.quantizer == "categorical"
                and self.config.code_embedding_type == "lattice"):
            lattice = DapsFiniteScalarQuantizer(self.config.fsq_levels)
            init.copy_(module.weight, lattice.codes_to_values(torch.arange(self.config.codebook_size)))
        if module is getattr(self, "code_embedding", None) and self.config.pixel_paths:
            init.zeros_(module.weight[:, module.weight.shape[1] - self.config.patch_dim:])
        if isinstance(module, DapsFiniteScalarQuantizer):
            levels, basis = DapsFiniteScalarQuantizer.level_tensors(self.config.fsq_levels)
            init.copy_(module.levels, levels)
            init.copy_(module.basis, basis)


class DapsModel(DapsPreTrainedModel):
    """The DAPS tokenizer: `encode` images to codes, `decode` codes to images, and the two log-likelihoods training needs.

    Example:
        >>> model = DapsModel(DapsConfig.from_preset("tiny"))
        >>> codes = model.encode(torch.rand(2, 3, 16, 16) * 2 - 1).codes      # (2, 4) LongTensor
        >>> images = model.decode(codes).pixel_values                          # (2, 3, 16, 16)
    """

    def __init__(self, config: DapsConfig):
        super().__init__(config)
        config.validate_daps()
        self.patch_encoder = DapsPatchEncoder(config)
        if config.quantizer == "categorical":
            head_size = config.codebook_size
            # The conv decoder reads embeddings as channels; the MLP decoder concatenates L of them.
            embedding_dim = config.decoder_hidden_size if config.decoder_type == "conv" else config.hidden_size
            if config.code_embedding_type == "lattice":
                # Fixed lattice points (see DapsConfig.code_embedding_type), set in _init_weights, never trained.
                embedding_dim = len(config.fsq_levels)
            if config.pixel_paths:
                embedding_dim += config.patch_dim   # the code's pixel block (DapsDecoder)
            self.code_embedding = nn.Embedding(config.codebook_size, embedding_dim)
            if config.code_embedding_type == "lattice":
                # Outside every optimizer, and no unused trainable parameter for DistributedDataParallel to wait on.
                self.code_embedding.weight.requires_grad_(False)
        elif config.quantizer == "vq":
            self.quantizer = DapsVectorQuantizer(config.codebook_size, config.vq_dim)
            head_size = embedding_dim = config.vq_dim
        else:
            self.quantizer = DapsFiniteScalarQuantizer(config.fsq_levels)
            head_size = embedding_dim = len(config.fsq_levels)
        self.code_transformer = DapsCodeTransformer(config, head_size)
        out_channels = config.num_channels * (2 if config.likelihood == "gaussian" else 1)
        self.decoder = DapsDecoder(config, embedding_dim, out_channels)
        self.post_init()

    # ------------------------------------------------------------------ input checks
    def _check_pixel_values(self, pixel_values) -> None:
        config = self.config
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor of shape (B, C, H, W), got {type(pixel_values).__name__}.")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a float tensor (use DapsImageProcessor to convert images), got dtype {pixel_values.dtype}."
            )
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be batched, of shape (B, {', '.join(map(str, expected))}), got shape "
                f"{tuple(pixel_values.shape)}" + (" (add a batch axis with pixel_values[None])" if pixel_values.ndim == 3 else "") + "."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values has an empty batch (B = 0).")
        if pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels, but this model expects {config.num_channels} "
                f"(shape (B, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)})."
            )
        if tuple(pixel_values.shape[2:]) != expected[1:]:
            raise ValueError(
                f"pixel_values has spatial size {tuple(pixel_values.shape[2:])}, but this model expects "
                f"{expected[1:]}: resize with DapsImageProcessor (image_size={config.image_size})."
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or infinite values.")
        if config.likelihood == "bernoulli":
            low, high = pixel_values.min().item(), pixel_values.max().item()
            if low < 0 or high > 1:
                raise ValueError(
                    f"This model has a Bernoulli likelihood and expects pixel values in [0, 1], got values in "
                    f"[{low:.3g}, {high:.3g}] (was the image normalised? use this model's DapsImageProcessor)."
                )

    def _check_codes(self, codes, batch_size: int | None = None) -> None:
        config = self.config
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes must be a torch.LongTensor of shape (B, L) or (B, K, L), got {type(codes).__name__}.")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}.")
        if codes.ndim not in (2, 3):
            raise ValueError(
                f"codes must have shape (B, L) or (B, K, L) with L = {config.num_tokens}, got shape {tuple(codes.shape)}."
            )
        if codes.shape[-1] != config.num_tokens:
            raise ValueError(
                f"codes must have {config.num_tokens} tokens in their last axis, got shape {tuple(codes.shape)}."
            )
        if codes.numel() == 0:
            raise ValueError(f"codes is empty (shape {tuple(codes.shape)}).")
        low, high = codes.min().item(), codes.max().item()
        if low < 0 or high >= config.codebook_size:
            raise ValueError(
                f"codes must lie in [0, {config.codebook_size - 1}] (codebook_size {config.codebook_size}), "
                f"got values in [{low}, {high}]."
            )
        if batch_size is not None and codes.shape[0] != batch_size:
            raise ValueError(
                f"codes have batch size {codes.shape[0]} but pixel_values has {batch_size}: they must match."
            )

    # ------------------------------------------------------------------ encoder side
    def encode_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, H, W) → patch features (B, P, d), the memory every code token attends to."""
        return self.patch_encoder(pixel_values)

    def code_logits(self, memory: torch.Tensor, codes: torch.Tensor, coordinates: bool = False):
        """Teacher-forced logits for a categorical encoder: memory (B, P, d), codes (B, K, L) → (B, K, L, V) fp32;
        with `coordinates` (factorized head, no pixel paths), each lattice coordinate's log-softmax instead, a list of
        (B, K, L, levels_d) fp32 tensors."""
        b, k, length = codes.shape
        memory_kv = self.code_transformer.memory_keys_values(memory)
        autoregressive = self.code_transformer.autoregressive
        if autoregressive:
            outputs = self.code_transformer.teacher_forced(codes.reshape(b * k, length), memory_kv, coordinates)
        else:
            # Parallel: the logits do not depend on the codes, so they are computed once per image.
            outputs = self.code_transformer.parallel(b, memory_kv, coordinates)

        def per_sample(output: torch.Tensor) -> torch.Tensor:
            output = _at_least_float32(output)
            return output.view(b, k, length, -1) if autoregressive else output[:, None].expand(b, k, length, -1)

        return [per_sample(output) for output in outputs] if coordinates else per_sample(outputs)

    def _log_prob_from_memory(self, memory: torch.Tensor, codes: torch.Tensor, return_log_probs: bool = False):
        """log q(codes | x), (B, K); with `return_log_probs`, also every token's log q(· | z_<t, x), (B, K, L, V)."""
        if self.config.quantizer != "categorical":
            zeros = torch.zeros(codes.shape[:2], device=codes.device)
            return (zeros, None) if return_log_probs else zeros
        transformer = self.code_transformer
        if transformer.factorized and not self.config.pixel_paths and not return_log_probs:
            # The factorized head's log q is a sum of each coordinate's log-softmax at the code's coordinate: the V
            # log-probabilities of every position are not needed.
            parts = self.code_logits(memory, codes, coordinates=True)
            return sum(part.gather(-1, coordinate[..., None]).squeeze(-1)
                       for part, coordinate in zip(parts, transformer.coordinates_of(codes))).sum(-1)
        log_probs = torch.log_softmax(self.code_logits(memory, codes), dim=-1)
        log_q = log_probs.gather(-1, codes[..., None]).squeeze(-1).sum(-1)
        return (log_q, log_probs) if return_log_probs else log_q

    @torch.no_grad()
    def _sample_from_memory(self, memory: torch.Tensor, num_samples: int | None, temperature: float,
                            generator: torch.Generator | None, exploration: float = 0.0,
                            return_proposal: bool = False):
        """Codes (B, K, L) and their log q at temperature 1 (B, K); greedy when num_samples is None.

        With `exploration` ε > 0 each token is drawn from the mixture (1 − ε)·q_τ(·|z_<t, x) + ε·uniform, ancestrally
        (a uniformly drawn token is what later positions condition on). With `return_proposal`, a third tensor
        (B, K) gives log μ(z|x) of that proposal, summed over tokens, for importance weighting.
        """
        b = memory.shape[0]
        k = 1 if num_samples is None else num_samples
        greedy = num_samples is None
        exploration = 0.0 if greedy else float(exploration)
        if not 0.0 <= exploration < 1.0:
            raise ValueError(f"exploration must be in [0, 1), got {exploration}.")
        if self.config.quantizer != "categorical":
            latents = self.code_transformer.parallel(b, self.code_transformer.memory_keys_values(memory))
            _, codes = self.quantizer.quantize(latents)
            codes = codes[:, None].expand(b, k, -1).contiguous()
            zeros = torch.zeros(b, k, device=memory.device)
            return (codes, zeros, zeros) if return_proposal else (codes, zeros)

        def choose(logits: torch.Tensor) -> torch.Tensor:
            # logits (..., V) in fp32. Gumbel-max at temperature τ samples softmax(logits / τ) exactly.
            if greedy:
                return logits.argmax(-1)
            # In place, one buffer: log(−log u) = −Gumbel noise (the same values as forming the noise and adding it).
            noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
            noise.clamp_(min=1e-20, max=1 - 1e-7).log_().neg_().log_()
            chosen = ((logits if temperature == 1.0 else logits / temperature) - noise).argmax(-1)
            if exploration > 0.0:
                explore = torch.rand(chosen.shape, generator=generator, device=logits.device) < exploration
                random_codes = torch.randint(0, logits.shape[-1], chosen.shape, generator=generator,
                                             device=logits.device)
                chosen = torch.where(explore, random_codes, chosen)
            return chosen

        # At τ = 1 without exploration the proposal is q itself: its log-probability is log q's, not recomputed.
        proposal_is_q = temperature == 1.0 and exploration == 0.0

        def proposal_log_prob(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
            tempered = torch.log_softmax(logits / temperature, dim=-1).gather(-1, chosen[..., None]).squeeze(-1)
            if exploration == 0.0:
                return tempered
            return torch.logaddexp(tempered + math.log1p(-exploration),
                                   torch.full_like(tempered, math.log(exploration / logits.shape[-1])))

        def choose_coordinates(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # parts: each lattice coordinate's log-softmax, (..., levels_d) fp32. q is a product over coordinates, and
            # so is q_τ (its logits are a sum over them): drawing each coordinate on its own by Gumbel-max samples the
            # code from q_τ exactly, with Σ levels_d noise values instead of V, and the argmax of each coordinate is
            # the greedy code. → codes (...), their log q and log q_τ.
            if greedy:
                chosen = [part.argmax(-1) for part in parts]
            else:
                noise = torch.rand((*parts[0].shape[:-1], sum(part.shape[-1] for part in parts)), generator=generator,
                                   device=parts[0].device, dtype=torch.float32)
                noise.clamp_(min=1e-20, max=1 - 1e-7).log_().neg_().log_()
                chosen = [((part if temperature == 1.0 else part / temperature) - part_noise).argmax(-1)
                          for part, part_noise in zip(parts, noise.split([part.shape[-1] for part in parts], dim=-1))]
            log_q = sum(part.gather(-1, c[..., None]).squeeze(-1) for part, c in zip(parts, chosen))
            log_q_tempered = log_q if temperature == 1.0 or not return_proposal else sum(
                torch.log_softmax(part / temperature, dim=-1).gather(-1, c[..., None]).squeeze(-1)
                for part, c in zip(parts, chosen))
            return self.code_transformer.codes_from_coordinates(chosen), log_q, log_q_tempered

        memory_kv = self.code_transformer.memory_keys_values(memory)
        # The factorized head without pixel paths (whose logits do not factorise) and without exploration (a mixture
        # with the uniform does not either) draws per coordinate; the codes have the same distribution either way.
        by_coordinates = (self.code_transformer.factorized and memory_kv.pixel_logits is None and exploration == 0.0)
        if not self.code_transformer.autoregressive and by_coordinates:
            parts = self.code_transformer.parallel(b, memory_kv, coordinates=True)               # (B, L, levels_d)
            codes, log_q, log_q_tempered = choose_coordinates(
                [part[:, None].expand(b, k, -1, -1) for part in parts])
            if return_proposal:
                return codes, log_q.sum(-1), log_q_tempered.sum(-1)
            return codes, log_q.sum(-1)
        if not self.code_transformer.autoregressive:
            logits = _at_least_float32(self.code_transformer.parallel(b, memory_kv))  # (B, L, V)
            log_probs = torch.log_softmax(logits, dim=-1)
            expanded = logits[:, None].expand(b, k, -1, -1)
            codes = choose(expanded)
            log_prob = log_probs[:, None].expand(b, k, -1, -1).gather(-1, codes[..., None]).squeeze(-1).sum(-1)
            if return_proposal:
                return codes, log_prob, proposal_log_prob(expanded, codes).sum(-1)
            return codes, log_prob

        length = self.config.num_tokens
        cache = self.code_transformer.new_cache(b * k, memory)
        codes = torch.empty(b * k, length, dtype=torch.long, device=memory.device)
        log_prob = torch.zeros(b * k, device=memory.device, dtype=torch.promote_types(memory.dtype, torch.float32))
        log_proposal = torch.zeros_like(log_prob)
        previous = torch.full((b * k,), self.config.bos_token_id, dtype=torch.long, device=memory.device)

        def step(previous: torch.Tensor, position: int):
            if position > 0 or k == 1:
                return self.code_transformer.step(previous, position, memory_kv, cache, coordinates=by_coordinates)
            # Position 0 reads only BOS and the image, so an image's K sequences agree there: run it once per image
            # and repeat its cached keys/values and its outputs K times (sample-major, as the codes are laid out).
            first = self.code_transformer.new_cache(b, memory)
            out = self.code_transformer.step(previous[:b], 0, memory_kv, first, coordinates=by_coordinates)
            for once, repeated in zip(first, cache):
                repeated.keys[:, :, 0] = once.keys[:, :, 0].repeat_interleave(k, dim=0)
                repeated.values[:, :, 0] = once.values[:, :, 0].repeat_interleave(k, dim=0)
            if by_coordinates:
                return [part.repeat_interleave(k, dim=0) for part in out]
            return out.repeat_interleave(k, dim=0)

        for position in range(length):
            if by_coordinates:
                parts = step(previous, position)
                previous, token_log_prob, token_log_proposal = choose_coordinates(parts)
            else:
                logits = _at_least_float32(step(previous, position))
                previous = choose(logits)
                token_log_prob = torch.log_softmax(logits, dim=-1).gather(-1, previous[:, None]).squeeze(-1)
                token_log_proposal = (token_log_prob if proposal_is_q or not return_proposal
                                      else proposal_log_prob(logits, previous))
            codes[:, position] = previous
            log_prob += token_log_prob
            if return_proposal:
                log_proposal += token_log_proposal
        if return_proposal:
            return codes.view(b, k, length), log_prob.view(b, k), log_proposal.view(b, k)
        return codes.view(b, k, length), log_prob.view(b, k)

    def encode(self, pixel_values: torch.Tensor, num_samples: int | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None, search: str | None = None,
               num_candidates: int = 16, num_sweeps: int = 2,
               search_objective: str = "likelihood") -> DapsEncoderOutput:
        """Images → codes.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)`): images as the processor returns them.
            num_samples (`int`, *optional*): None (default) gives the greedy code, argmax at each step:
                deterministic, codes `(B, L)`. An integer K draws K codes per image: codes `(B, K, L)`.
            temperature (`float`): sampling temperature (> 0); ignored for greedy encoding.
            generator (`torch.Generator`, *optional*): makes sampling reproducible.
            search (`str`, *optional*): "best-of-n" draws `num_candidates` codes per image (at `temperature`), adds
                the greedy code, decodes them all and keeps the one whose reconstruction log-likelihood
                log p(x | z) is highest: codes `(B, L)`, never worse than greedy by that measure. A categorical
                encoder allows this; a deterministic quantiser has one candidate. Costs `num_candidates + 1` decodes.
                "local" starts from the greedy code and improves it one token at a time (coordinate ascent on
                log p(x | z)): for each position in turn, the `num_candidates` codes the encoder ranks highest there
                are tried with every other token held, and the best is kept if it raises log p(x | z); repeated for
                up to `num_sweeps` passes over the L positions (stopping early when a pass changes nothing).
                Deterministic, never worse than greedy by that measure; costs up to
                `num_sweeps · L · num_candidates` decodes per image.
                "parallel" is the same coordinate ascent with many positions moved per decode (conv decoder only):
                the code grid is coloured by (row mod 3, column mod 3), and for each of the 9 colours in turn the
                `num_candidates` top codes are tried at every position of that colour at once (one decode per
                candidate rank); each position keeps the code that most raises the log-likelihood of the 3 × 3 grid
                cells around it, and the combined move is decoded again and kept only if the image's log p(x | z)
                rises. Deterministic, never worse than greedy; costs up to `num_sweeps · 9 · (num_candidates + 1)`
                decodes per image (45 per sweep at 4 candidates, against 256 for "local" on 64 tokens), and on
                natural images finds codes as good as "local" at a fraction of its time (benchmarks/RESULTS.md).
                Every search returns codes `(B, L)`. "local" and "parallel" also search FSQ and VQ codes: the codes
                tried at a position are then the lattice points (codebook vectors) nearest the encoder's latent there.
            num_candidates (`int`): sampled candidates for "best-of-n"; codes tried per position for "local" and
                "parallel".
            num_sweeps (`int`): passes over the positions for "local" and "parallel".
            search_objective (`str`): what every search maximises in place of log p(x | z): "likelihood" (the
                default, the model's own reconstruction log-likelihood, weighted by its learned variance) or
                "squared_error" (minus the squared error of the decoder's mean, i.e. the search targets PSNR).

        Returns:
            [`DapsEncoderOutput`] with `codes` (LongTensor) and `log_prob` (log q(codes | x) at temperature 1, nats).
        """
        self._check_pixel_values(pixel_values)
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"num_samples must be None (greedy) or an integer >= 1, got {num_samples!r}.")
        if not isinstance(temperature, (int, float)) or not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
        if search is None and search_objective != "likelihood":
            raise ValueError(f"search_objective={search_objective!r} is what a search maximises: pass search= too.")
        if search is not None:
            if search not in SEARCH_METHODS:
                raise ValueError(f"search must be None or one of {', '.join(map(repr, SEARCH_METHODS))}, got "
                                 f"{search!r}.")
            if num_samples is not None:
                raise ValueError(f"search={search!r} returns one code per image: leave num_samples unset.")
            if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
                raise ValueError(f"num_candidates must be an integer >= 1, got {num_candidates!r}.")
            if search in ("local", "parallel") and (isinstance(num_sweeps, bool) or not isinstance(num_sweeps, int)
                                      or num_sweeps < 1):
                raise ValueError(f"num_sweeps must be an integer >= 1, got {num_sweeps!r}.")
            if search_objective not in SEARCH_OBJECTIVES:
                raise ValueError(f"search_objective must be one of {', '.join(map(repr, SEARCH_OBJECTIVES))}, got "
                                 f"{search_objective!r}.")
        with torch.no_grad():
            memory = self.encode_patches(pixel_values)
            codes, log_prob = self._sample_from_memory(memory, num_samples, float(temperature), generator)
            if search == "best-of-n":
                return self._best_of_n(pixel_values, memory, codes, log_prob, num_candidates, float(temperature),
                                       generator, search_objective)
            if search == "local":
                return self._local_search(pixel_values, memory, codes[:, 0], num_candidates, num_sweeps,
                                          search_objective)
            if search == "parallel":
                return self._parallel_local_search(pixel_values, memory, codes[:, 0], num_candidates, num_sweeps,
                                                   objective=search_objective)
        if num_samples is None:
            codes, log_prob = codes[:, 0], log_prob[:, 0]
        return DapsEncoderOutput(codes=codes, log_prob=log_prob)

    def _best_of_n(self, pixel_values, memory, greedy_codes, greedy_log_prob, num_candidates, temperature, generator,
                   objective="likelihood"):
        """Among the greedy code and `num_candidates` samples, the code of highest log p(x | z) (or `objective`),
        per image."""
        if self.config.quantizer != "categorical":
            return DapsEncoderOutput(codes=greedy_codes[:, 0], log_prob=greedy_log_prob[:, 0])
        sampled, sampled_log_prob = self._sample_from_memory(memory, num_candidates, temperature, generator)
        candidates = torch.cat([greedy_codes, sampled], dim=1)                      # (B, 1 + N, L)
        candidate_log_prob = torch.cat([greedy_log_prob, sampled_log_prob], dim=1)  # (B, 1 + N)
        scores, _ = self._reconstruction_log_likelihood(pixel_values, candidates, objective=objective)  # (B, 1 + N)
        best = scores.argmax(dim=1)  # ties go to the first, the greedy code
        rows = torch.arange(candidates.shape[0], device=best.device)
        return DapsEncoderOutput(codes=candidates[rows, best], log_prob=candidate_log_prob[rows, best])

    def _local_search(self, pixel_values, memory, codes, num_candidates, num_sweeps, objective="likelihood"):
        """Coordinate ascent on log p(x | z) (or `objective`) from `codes` (B, L): see `encode(search="local")`."""
        b, length = codes.shape
        tried = self._search_candidates(memory, codes, num_candidates)                                 # (B, L, N)
        num_candidates = tried.shape[-1]
        codes = codes.clone()
        best, _ = self._reconstruction_log_likelihood(pixel_values, codes[:, None], objective=objective)  # (B, 1)
        best = best[:, 0]
        rows = torch.arange(b, device=codes.device)
        for _ in range(num_sweeps):
            changed = False
            for position in range(length):
                options = tried[:, position]                                                        # (B, N)
                # A candidate equal to the current code is skipped: it cannot raise log p(x | z).
                fresh = options != codes[:, position:position + 1]
                if not bool(fresh.any()):
                    continue
                candidates = codes[:, None].repeat(1, num_candidates, 1)
                candidates[:, :, position] = options
                scores, _ = self._reconstruction_log_likelihood(pixel_values, candidates, objective=objective)
                scores = scores.masked_fill(~fresh, float("-inf"))
                top_score, choice = scores.max(dim=1)
                better = top_score > best
                if bool(better.any()):
                    codes[better, position] = options[rows, choice][better]
                    best = torch.where(better, top_score, best)
                    changed = True
            if not changed:
                break
        return DapsEncoderOutput(codes=codes, log_prob=self._log_prob_from_memory(memory, codes[:, None])[:, 0])

    def _search_candidates(self, memory: torch.Tensor, codes: torch.Tensor, num_candidates: int) -> torch.Tensor:
        """The codes the local searches try at each position, (B, L, N), best first.

        Categorical encoder: its N most probable codes there given the prefix of `codes` (B, L). FSQ and VQ: the N
        lattice points (FSQ, in the bounded latent space the rounding works in) or codebook vectors (VQ) nearest the
        encoder's latent at that position; the first is the quantiser's own code.
        """
        if self.config.quantizer == "categorical":
            num_candidates = min(num_candidates, self.config.codebook_size)
            return self.code_logits(memory, codes[:, None])[:, 0].topk(num_candidates, dim=-1).indices
        latents = self.code_transformer.parallel(codes.shape[0], self.code_transformer.memory_keys_values(memory))
        latents = latents.float()
        if self.config.quantizer == "fsq":
            quantizer = self.quantizer
            size = int(quantizer.levels.prod())
            points = (quantizer.codes_to_values(torch.arange(size, device=codes.device)) *
                      (quantizer.levels // 2).float())                                     # lattice, (V, D)
            latents = quantizer.bound(latents)
        else:
            points = self.quantizer.codebook.weight.float()
        distances = (latents[..., None, :] - points).pow(2).sum(-1)                         # (B, L, V)
        return distances.topk(min(num_candidates, points.shape[0]), dim=-1, largest=False).indices

    def _parallel_local_search(self, pixel_values, memory, codes, num_candidates, num_sweeps, stride: int = 3,
                               window: int = 3, objective: str = "likelihood"):
        """Coordinate ascent on log p(x | z) (or `objective`) from `codes` (B, L), many positions per decode: see
        `encode(search="parallel")`. Positions of one colour of the (row mod `stride`, column mod `stride`) grid
        colouring are tried together; a position's choice is judged on the log-likelihood of the `window` ×
        `window` grid cells centred on it (`token_log_likelihood`), which with `window` ≤ `stride` no other
        position of its colour is judged on."""
        rows, columns = self.check_token_cells()
        b, length = codes.shape
        tried = self._search_candidates(memory, codes, num_candidates).permute(0, 2, 1)               # (B, N, L)
        colour = grid_colours((rows, columns), stride, codes.device)                                   # (L,)

        def credited(token_rewards: torch.Tensor) -> torch.Tensor:    # (B, K, L) → summed over the window
            return token_window_sums(token_rewards.float(), (rows, columns), window)

        def score(candidates):                                        # (B, K, L) → per-token objective (B, K, L)
            return self._reconstruction_log_likelihood(pixel_values, candidates, per_token=True,
                                                       objective=objective)[0]

        codes = codes.clone()
        current = score(codes[:, None])                                                                # (B, 1, L)
        for _ in range(num_sweeps):
            changed = False
            for members in (colour == c for c in range(stride * stride)):
                if not bool(members.any()):
                    continue
                fresh = (tried != codes[:, None]) & members                                            # (B, N, L)
                if not bool(fresh.any()):
                    continue
                candidates = torch.where(members, tried, codes[:, None])                               # (B, N, L)
                scores = credited(score(candidates)).masked_fill(~fresh, float("-inf"))
                top, choice = scores.max(dim=1)                                                         # (B, L)
                move = members & (top > credited(current)[:, 0])
                if not bool(move.any()):
                    continue
                proposal = torch.where(move, tried.gather(1, choice[:, None])[:, 0], codes)
                proposed = score(proposal[:, None])
                better = proposed.sum(-1)[:, 0] > current.sum(-1)[:, 0]                                 # (B,)
                if bool(better.any()):
                    codes = torch.where(better[:, None], proposal, codes)
                    current = torch.where(better[:, None, None], proposed, current)
                    changed = True
            if not changed:
                break
        return DapsEncoderOutput(codes=codes, log_prob=self._log_prob_from_memory(memory, codes[:, None])[:, 0])

    def log_prob(self, pixel_values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log q(codes | x) in nats: codes (B, L) → (B,), or (B, K, L) → (B, K). Differentiable."""
        self._check_pixel_values(pixel_values)
        self._check_codes(codes, pixel_values.shape[0])
        unbatched = codes.ndim == 2
        codes = codes[:, None] if unbatched else codes
        log_prob = self._log_prob_from_memory(self.encode_patches(pixel_values), codes.long())
        return log_prob[:, 0] if unbatched else log_prob

    # ------------------------------------------------------------------ decoder side
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, L) → the decoder's input embeddings (N, L, e)."""
        if self.config.quantizer == "categorical":
            return F.embedding(codes, self.code_embedding_weight)
        return self.quantizer.codes_to_values(codes).to(self.decoder_dtype)

    @property
    def code_embedding_weight(self) -> torch.Tensor:
        """The (V, e) table a categorical code is embedded with; detached (never trained) for the fixed lattice."""
        weight = self.code_embedding.weight
        return weight.detach() if self.config.code_embedding_type == "lattice" else weight

    @property
    def decoder_dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    def likelihood_parameters(self, embeddings: torch.Tensor) -> DapsDecoderOutput:
        """Decoder input embeddings (N, L, e) → likelihood parameters, each (N, C, H, W)."""
        output = _at_least_float32(self.decoder(embeddings))
        if self.config.likelihood == "bernoulli":
            return DapsDecoderOutput(pixel_values=torch.sigmoid(output), logits=output)
        mean, raw = output.chunk(2, dim=1)
        # Variance kept smoothly inside [min_variance, max_variance] (the reference clips it to [0.01, 1]).
        low, high = math.log(self.config.min_variance), math.log(self.config.max_variance)
        return DapsDecoderOutput(pixel_values=mean, log_variance=low + (high - low) * torch.sigmoid(raw))

    def decode(self, codes: torch.Tensor) -> DapsDecoderOutput:
        """Codes → images: codes (B, L) → (B, C, H, W), or (B, K, L) → (B, K, C, H, W).

        Returns [`DapsDecoderOutput`]: `pixel_values` is the decoder's mean, in the input's normalisation.
        """
        self._check_codes(codes)
        leading = codes.shape[:-1]
        output = self.likelihood_parameters(self.embed_codes(codes.reshape(-1, codes.shape[-1]).long()))
        return DapsDecoderOutput(**{
            name: value.view(*leading, *value.shape[1:]) for name, value in output.items()
        })

    def log_likelihood(self, pixel_values: torch.Tensor, parameters: DapsDecoderOutput) -> torch.Tensor:
        """log p(x | z) summed over channels and pixels: pixel_values (N, C, H, W) → (N,)."""
        return self._pixel_log_likelihood(pixel_values, parameters).flatten(1).sum(1)

    def _pixel_log_likelihood(self, pixel_values: torch.Tensor, parameters: DapsDecoderOutput) -> torch.Tensor:
        """log p(x | z) of every value: pixel_values (N, C, H, W) → (N, C, H, W)."""
        x = pixel_values.to(parameters.pixel_values.dtype)
        if self.config.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(parameters.logits, x, reduction="none")
        log_variance = parameters.log_variance
        squared = (x - parameters.pixel_values).pow(2) * torch.exp(-log_variance)
        return -0.5 * (squared + log_variance + math.log(2 * math.pi))

    def check_token_cells(self) -> tuple[int, int]:
        """(rows, columns) of the conv decoder's code grid when every token owns an equal block of pixels, else a
        ValueError: the split of log p(x | z) over tokens (`token_log_likelihood`) needs it."""
        config = self.config
        if config.decoder_type != "conv":
            raise ValueError(f"Splitting log p(x | z) over the code tokens needs the conv decoder (codes laid on a "
                             f"grid over the image), got decoder_type={config.decoder_type!r}.")
        rows, columns = _grid_shape(config.num_tokens)
        if config.image_size % rows or config.image_size % columns:
            raise ValueError(f"Splitting log p(x | z) over the code tokens needs the image size ({config.image_size}) "
                             f"to be a multiple of the code grid ({rows} × {columns}).")
        return rows, columns

    def token_log_likelihood(self, pixel_values: torch.Tensor, parameters: DapsDecoderOutput) -> torch.Tensor:
        """log p(x | z) split over the code tokens: pixel_values (N, C, H, W) → (N, L).

        Entry t sums the log-likelihood of the channels and pixels of the block under token t's cell of the conv
        decoder's grid (raster order, as `DapsDecoder` lays the codes), so the L entries sum to `log_likelihood`.
        The decoder's receptive field is wider than one cell, so this is the reward *located* at each token, not a
        reward that depends on that token alone.
        """
        self.check_token_cells()
        return self._split_over_tokens(self._pixel_log_likelihood(pixel_values, parameters))

    def _split_over_tokens(self, values: torch.Tensor) -> torch.Tensor:
        """Per-value scores (N, C, H, W) → their sums over each token's block of the code grid, (N, L)."""
        rows, columns = self.check_token_cells()
        values = values.sum(1)                                                        # (N, H, W)
        n, height, width = values.shape
        blocks = values.reshape(n, rows, height // rows, columns, width // columns)
        return blocks.sum(dim=(2, 4)).reshape(n, rows * columns)

    def reconstruction_log_likelihood(self, pixel_values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """log p(x | codes) in nats, summed per image: codes (B, L) → (B,), or (B, K, L) → (B, K). Differentiable."""
        self._check_pixel_values(pixel_values)
        self._check_codes(codes, pixel_values.shape[0])
        unbatched = codes.ndim == 2
        codes = codes[:, None] if unbatched else codes
        reward = self._reconstruction_log_likelihood(pixel_values, codes.long())[0]
        return reward[:, 0] if unbatched else reward

    def _reconstruction_log_likelihood(self, pixel_values, codes, per_token: bool = False,
                                       objective: str = "likelihood"):
        """codes (B, K, L) → log p(x | z) (B, K), or (B, K, L) split over tokens with `per_token`; and the means.
        With `objective="squared_error"`, minus the squared error of the means in place of log p(x | z).

        Each distinct code of an image is decoded once: a sharp encoder draws the same code several times (late in
        training, or among search candidates), and its copies share one decode; the copies' gradients sum into it
        through the index, so values and gradients are those of decoding every copy.
        """
        b, k, length = codes.shape
        image_shape = pixel_values.shape[1:]
        flat_codes = codes.reshape(b * k, length)
        index = None
        if k > 1:
            same = (codes[:, :, None, :] == codes[:, None, :, :]).all(-1)              # (B, K, K)
            first = same.to(torch.uint8).argmax(-1)                                     # first copy of each sample
            distinct = (first == torch.arange(k, device=codes.device)).reshape(-1)      # (B·K,)
            if not bool(distinct.all()):
                position = distinct.long().cumsum(0) - 1                                # rank among the distinct
                index = position.view(b, k).gather(1, first)                            # (B, K) → distinct row
                rows = distinct.nonzero().squeeze(1)
                flat_codes, targets = flat_codes[rows], pixel_values[rows // k]
        if index is None:
            targets = pixel_values[:, None].expand(b, k, *image_shape).reshape(b * k, *image_shape)
        parameters = self.likelihood_parameters(self.embed_codes(flat_codes))
        if objective == "likelihood":
            values = self._pixel_log_likelihood(targets, parameters)                   # (N, C, H, W)
        else:
            values = -(targets.to(parameters.pixel_values.dtype) - parameters.pixel_values).pow(2)
        reward = self._split_over_tokens(values) if per_token else values.flatten(1).sum(1)  # (N, L) or (N,)
        means = parameters.pixel_values
        if index is not None:
            return reward[index], means[index]                                          # (B, K, ...) again
        return reward.view(b, k, *reward.shape[1:]), means.view(b, k, *image_shape)

    # ------------------------------------------------------------------ training entry point
    def forward(self, pixel_values: torch.Tensor, codes: torch.Tensor | None = None, num_samples: int = 1,
                temperature: float = 1.0, generator: torch.Generator | None = None,
                targets: torch.Tensor | None = None) -> DapsModelOutput:
        """One pass for a DAPS step: codes given, or K = `num_samples` codes sampled without gradient from the same
        patch features; then teacher-forced log q and decoder log-likelihood, both with gradient.

        Args:
            pixel_values (`(B, C, H, W)`): the encoder's input.
            codes (`(B, L)` or `(B, K, L)`, *optional*): codes to score; sampled when not given.
            targets (`(B, C, H, W)`, *optional*): what the decoder's likelihood scores (e.g. a binarised image);
                defaults to `pixel_values`.

        Returns [`DapsModelOutput`] with every tensor carrying a K axis.
        """
        self._check_pixel_values(pixel_values)
        if targets is not None:
            self._check_pixel_values(targets)
        memory = self.encode_patches(pixel_values)
        if codes is None:
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
                raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
            codes, _ = self._sample_from_memory(memory.detach(), num_samples, float(temperature), generator)
        else:
            self._check_codes(codes, pixel_values.shape[0])
            codes = (codes[:, None] if codes.ndim == 2 else codes).long()
        log_prob = self._log_prob_from_memory(memory, codes)
        reward, reconstruction = self._reconstruction_log_likelihood(
            pixel_values if targets is None else targets, codes
        )
        return DapsModelOutput(
            codes=codes, log_prob=log_prob, reconstruction_log_likelihood=reward, reconstruction=reconstruction
        )


__all__ = [
    "DapsModel",
    "DapsPreTrainedModel",
    "DapsEncoderOutput",
    "DapsDecoderOutput",
    "DapsModelOutput",
]
