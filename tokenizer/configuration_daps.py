"""Configuration of the DAPS image tokenizer.

A flat, typed configuration that round-trips through ``config.json``. Every field is a plain value; the
derived quantities (``bits_per_image``, ``num_patches``) are properties, so they never drift from the fields.
"""

from __future__ import annotations

import math
from typing import ClassVar

from transformers import PretrainedConfig

ENCODER_TYPES = ("autoregressive", "parallel")
QUANTIZERS = ("categorical", "vq", "fsq")
CODE_EMBEDDING_TYPES = ("learned", "lattice")
CODE_HEADS = ("full", "factorized", "ordinal")
DECODER_TYPES = ("conv", "mlp")
LIKELIHOODS = ("bernoulli", "gaussian")

# Settings of the paper's reference implementation (DAPS.md, "Reference architecture"), one entry per preset.
# `tiny` is for tests: every code path, a few thousand parameters.
PRESETS: dict[str, dict] = {
    "mnist": dict(
        image_size=28, num_channels=1, patch_size=7, num_tokens=8, codebook_size=256,
        hidden_size=64, num_heads=4, patch_layers=1, code_layers=2,
        decoder_type="mlp", decoder_hidden_size=512, likelihood="bernoulli", initializer_range=0.125,
    ),
    "cifar": dict(
        image_size=32, num_channels=3, patch_size=4, num_tokens=64, codebook_size=512,
        hidden_size=128, num_heads=4, patch_layers=2, code_layers=2,
        decoder_type="conv", decoder_hidden_size=128, likelihood="gaussian", initializer_range=0.088,
    ),
    "imagenet": dict(
        image_size=256, num_channels=3, patch_size=8, num_tokens=1024, codebook_size=1024,
        hidden_size=128, num_heads=4, patch_layers=2, code_layers=2,
        decoder_type="conv", decoder_hidden_size=128, likelihood="gaussian", initializer_range=0.088,
    ),
    "tiny": dict(
        image_size=16, num_channels=3, patch_size=4, num_tokens=4, codebook_size=16,
        hidden_size=32, num_heads=2, patch_layers=1, code_layers=1,
        decoder_type="conv", decoder_hidden_size=16, decoder_res_blocks=1, likelihood="gaussian",
        initializer_range=0.18,
    ),
}


def code_grid_shape(num_tokens: int) -> tuple[int, int]:
    """The most nearly square (rows, columns) grid holding exactly num_tokens cells: how the codes lie over the image."""
    rows = max(r for r in range(1, math.isqrt(num_tokens) + 1) if num_tokens % r == 0)
    return rows, num_tokens // rows


class DapsConfig(PretrainedConfig):
    r"""Configuration of a [`DapsModel`]: an image is mapped to `num_tokens` codes, each in `[0, codebook_size)`.

    `DapsConfig()` is the `cifar` preset; `DapsConfig.from_preset(name)` gives the others.

    Args:
        image_size: height and width of the (square) input images.
        num_channels: 1 (grey) or 3 (RGB).
        patch_size: side of the non-overlapping patches the encoder embeds; must divide `image_size`.
        num_tokens: L, the number of codes per image.
        codebook_size: V, the number of values each code takes.
        hidden_size: width d of the encoder transformers.
        num_heads: attention heads; must divide `hidden_size`.
        patch_layers: depth of the bidirectional transformer over the patches.
        code_layers: depth of the transformer over the code tokens (causal for the autoregressive encoder).
        mlp_ratio: width of the transformer MLPs relative to `hidden_size`.
        encoder_type: "autoregressive" (DAPS, q(z|x) = Π_t q(z_t | z_<t, x)) or "parallel" (DAPS-NA and the
            quantiser baselines: every code predicted at once from learned per-position queries).
        quantizer: "categorical" (a distribution over codes: DAPS, Gumbel-Softmax), "vq" (nearest codebook
            vector) or "fsq" (finite scalar quantisation); "vq" and "fsq" need `encoder_type="parallel"`.
        fsq_levels: levels per FSQ dimension; their product must equal `codebook_size`. Also the lattice of
            `code_embedding_type="lattice"`.
        code_embedding_type: how a categorical code enters the decoder. "learned": a free embedding vector per code
            (trained only when the code is used). "lattice": code c is the point of the FSQ lattice `fsq_levels`
            whose mixed-radix index is c (values in [-1, 1], dimension len(fsq_levels)), fixed, not trained: the
            decoder then sees exactly what an FSQ decoder sees, every code decodes to something sensible from the
            first step, and neighbouring codes decode alike.
        code_head: the categorical encoder's distribution over the V values of one code. "full": V free logits.
            "factorized": the code is read as its FSQ-lattice coordinates (`fsq_levels`, mixed radix) and each
            coordinate gets its own softmax (sum(fsq_levels) logits), q(z_t | ·) = Π_d q_d(coordinate d | ·): codes that
            share a coordinate share what the encoder learns about it. Still an exact categorical over V values.
            "ordinal": as "factorized", but each coordinate's softmax reads its levels as ordered points: two head
            outputs (a, b) per coordinate give level i the logit a·u_i − softplus(b)·u_i², u_i = i − (levels − 1)/2
            (a discretised Gaussian over the levels, mean a / (2 softplus(b))), so mass moves between neighbouring
            levels as an FSQ encoder's value moves along its axis (2·len(fsq_levels) logits per code).
        aligned_patches: also give code token t, as an input added to its embedding, the patch features under its
            cell of the code grid (the patches' near-square grid average-pooled to the tokens' grid). Without it a
            code token sees the image only through cross-attention, and must first learn which patches it owns.
            Needs the patch grid to be a multiple of the token grid.
        pixel_paths: two linear paths between a code and the pixels of its own patch, beside the transformer and the
            conv decoder: a pixel head adding `W x_t + b` to token t's logits (x_t the raw patch under the token), and
            a pixel block per code added to the decoder's output at the code's cell. Both start at zero (no effect)
            unless set, e.g. from patch k-means (`training.warm_start`), where the model starts as a k-means
            tokenizer. Categorical quantizer with the full head, learned embeddings, and one patch per token.
            The decoder network reads the whole code embedding, pixel block included, and its output is scaled per
            channel by a learned gate.
        decoder_gate_init: the starting value of that gate (pixel_paths only). 0 makes a k-means-initialised model
            decode exactly its centroids at step one, but the gate then opens slowly and the network adds little;
            0.3 costs 0.05 dB at step one and learned fastest (benchmarks/RESULTS.md).
        vq_dim: dimension of the VQ codebook vectors.
        decoder_type: "conv" (codes on a grid, residual blocks, transposed convolutions) or "mlp".
        decoder_hidden_size: channels of the conv decoder, or width of the MLP decoder.
        decoder_res_blocks: residual blocks of the conv decoder.
        likelihood: "bernoulli" (pixels in [0, 1], binarised digits) or "gaussian" (pixels normalised to [-1, 1],
            a per-pixel learned variance).
        min_variance, max_variance: range of the Gaussian decoder's variance.
        initializer_range: standard deviation of the weight initialisation; the presets use about
            1/sqrt(hidden_size). With transformers' usual 0.02 at these small widths the sinusoidal positions swamp
            the patch and cross-attention signal, so the initial encoder is the same for every image and DAPS has
            nothing to reinforce (measured: benchmarks/RESULTS.md, ablation "init 0.02").
        head_initializer_range: standard deviation of the code head's weights (None: `initializer_range`). Small,
            so the encoder starts near the uniform distribution (maximal entropy, every code explored) while the
            layers below it already depend on the image; a large head start collapses q to one code per position.
    """

    model_type = "daps"
    presets: ClassVar[tuple[str, ...]] = tuple(PRESETS)

    image_size: int = 32
    num_channels: int = 3
    patch_size: int = 4
    num_tokens: int = 64
    codebook_size: int = 512
    hidden_size: int = 128
    num_heads: int = 4
    patch_layers: int = 2
    code_layers: int = 2
    mlp_ratio: float = 4.0
    encoder_type: str = "autoregressive"
    quantizer: str = "categorical"
    fsq_levels: list[int] | None = None
    code_embedding_type: str = "learned"
    code_head: str = "full"
    aligned_patches: bool = False
    pixel_paths: bool = False
    decoder_gate_init: float = 0.3
    vq_dim: int = 32
    decoder_type: str = "conv"
    decoder_hidden_size: int = 128
    decoder_res_blocks: int = 2
    likelihood: str = "gaussian"
    min_variance: float = 0.01
    max_variance: float = 1.0
    initializer_range: float = 0.088
    head_initializer_range: float | None = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_daps()

    # ------------------------------------------------------------------ derived quantities
    @property
    def bits_per_image(self) -> float:
        """Size of the bottleneck: L · log2(V) bits."""
        return self.num_tokens * math.log2(self.codebook_size)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Pixel values in one patch, num_channels · patch_size²."""
        return self.num_channels * self.patch_size**2

    @property
    def bos_token_id(self) -> int:  # noqa: D401 - a dedicated id, never a code
        """The id that starts the autoregressive code sequence: V, outside the code range [0, V)."""
        return self.codebook_size

    # ------------------------------------------------------------------ validation
    def validate_daps(self) -> None:
        """Raise a ValueError naming the problem when this configuration cannot build a working model."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DapsConfig.{name} must be a positive integer, got {value!r}.")

        for name in ("image_size", "num_channels", "patch_size", "num_tokens", "codebook_size", "hidden_size",
                     "num_heads", "code_layers", "vq_dim", "decoder_hidden_size"):
            positive_int(name)
        for name in ("patch_layers", "decoder_res_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DapsConfig.{name} must be a non-negative integer, got {value!r}.")
        if self.num_channels not in (1, 3):
            raise ValueError(f"DapsConfig.num_channels must be 1 or 3, got {self.num_channels}.")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"DapsConfig.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size}): "
                f"the encoder cuts the image into non-overlapping patches. Divisors of {self.image_size}: "
                f"{[d for d in range(1, self.image_size + 1) if self.image_size % d == 0]}."
            )
        if self.codebook_size < 2:
            raise ValueError(f"DapsConfig.codebook_size must be at least 2, got {self.codebook_size}.")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"DapsConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})."
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"DapsConfig.mlp_ratio must be positive, got {self.mlp_ratio}.")
        for name, allowed in (("encoder_type", ENCODER_TYPES), ("quantizer", QUANTIZERS),
                              ("decoder_type", DECODER_TYPES), ("likelihood", LIKELIHOODS),
                              ("code_embedding_type", CODE_EMBEDDING_TYPES), ("code_head", CODE_HEADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DapsConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.quantizer in ("vq", "fsq") and self.encoder_type != "parallel":
            raise ValueError(
                f"quantizer={self.quantizer!r} is deterministic and needs encoder_type='parallel', "
                f"got encoder_type={self.encoder_type!r}."
            )
        if self.code_embedding_type == "lattice" and self.quantizer != "categorical":
            raise ValueError(
                f"code_embedding_type='lattice' embeds categorical codes; quantizer={self.quantizer!r} has its own."
            )
        if self.code_head != "full" and self.quantizer != "categorical":
            raise ValueError(f"code_head={self.code_head!r} is a categorical head; quantizer={self.quantizer!r} has "
                             f"none.")
        if self.quantizer == "fsq" or self.code_embedding_type == "lattice" or self.code_head != "full":
            if not self.fsq_levels or any(not isinstance(l, int) or l < 2 for l in self.fsq_levels):
                raise ValueError(f"DapsConfig.fsq_levels must be a list of integers >= 2, got {self.fsq_levels!r}.")
            if math.prod(self.fsq_levels) != self.codebook_size:
                raise ValueError(
                    f"The product of fsq_levels {self.fsq_levels} is {math.prod(self.fsq_levels)}, "
                    f"but codebook_size is {self.codebook_size}: they must be equal."
                )
        if not isinstance(self.aligned_patches, bool):
            raise ValueError(f"DapsConfig.aligned_patches must be True or False, got {self.aligned_patches!r}.")
        if self.aligned_patches:
            side = self.image_size // self.patch_size
            rows, columns = code_grid_shape(self.num_tokens)
            if side % rows or side % columns:
                raise ValueError(
                    f"aligned_patches pools the {side} × {side} patch grid onto the {rows} × {columns} grid of the "
                    f"{self.num_tokens} code tokens; the patch grid must be a multiple of it (choose patch_size or "
                    f"num_tokens accordingly, or aligned_patches=False)."
                )
        if not isinstance(self.pixel_paths, bool):
            raise ValueError(f"DapsConfig.pixel_paths must be True or False, got {self.pixel_paths!r}.")
        if self.pixel_paths:
            side = self.image_size // self.patch_size
            if (self.quantizer != "categorical" or self.code_head != "full" or self.code_embedding_type != "learned"
                    or side * side != self.num_tokens):
                raise ValueError(
                    f"pixel_paths needs the categorical quantizer with code_head 'full', learned code embeddings and "
                    f"one patch per token (num_tokens = (image_size / patch_size)², here {side}² = {side * side} "
                    f"patches for {self.num_tokens} tokens); got quantizer={self.quantizer!r}, "
                    f"code_head={self.code_head!r}, code_embedding_type={self.code_embedding_type!r}."
                )
        if not isinstance(self.decoder_gate_init, (int, float)) or not math.isfinite(self.decoder_gate_init):
            raise ValueError(f"DapsConfig.decoder_gate_init must be a finite number, got {self.decoder_gate_init!r}.")
        if not 0 < self.min_variance < self.max_variance:
            raise ValueError(
                f"Need 0 < min_variance < max_variance, got {self.min_variance} and {self.max_variance}."
            )

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DapsConfig":
        """The paper's settings for `name` in ("mnist", "cifar", "imagenet", "tiny"), with `overrides` applied.

        Example: `DapsConfig.from_preset("mnist", codebook_size=512)`.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available presets: {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


__all__ = ["DapsConfig", "PRESETS"]
