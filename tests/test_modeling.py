"""The tokenizer model: shapes, the KV cache, sampling, save/load, and bad inputs."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import tokenizer  # noqa: F401  (registers the Auto classes)
from tokenizer import DapsConfig, DapsModel
from transformers import AutoConfig, AutoModel

PRESETS = ["tiny", "mnist", "cifar", "imagenet"]


def make_model(preset="tiny", **overrides):
    torch.manual_seed(0)
    return DapsModel(DapsConfig.from_preset(preset, **overrides)).eval()


def random_images(config, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, config.num_channels, config.image_size, config.image_size, generator=g)
    return x if config.likelihood == "bernoulli" else x * 2 - 1


ENCODERS = {
    "autoregressive": {},
    "parallel": {"encoder_type": "parallel"},
    "autoregressive, aligned": {"aligned_patches": True},
    "parallel, aligned": {"encoder_type": "parallel", "aligned_patches": True},
}


# ----------------------------------------------------------------------------------------------- config
def test_default_config_is_the_cifar_preset():
    default, cifar = DapsConfig(), DapsConfig.from_preset("cifar")
    for key in ("image_size", "num_channels", "patch_size", "num_tokens", "codebook_size", "likelihood"):
        assert getattr(default, key) == getattr(cifar, key)
    assert default.bits_per_image == 576


@pytest.mark.parametrize("preset,bits", [("mnist", 64), ("cifar", 576), ("imagenet", 10240)])
def test_preset_bits_match_the_paper(preset, bits):
    assert DapsConfig.from_preset(preset).bits_per_image == bits


def test_overriding_image_size_and_channels_alone_gives_a_working_model():
    model = DapsModel(DapsConfig(image_size=28, num_channels=1)).eval()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    codes = model.encode(x).codes
    assert codes.shape == (2, 64)
    assert model.decode(codes).pixel_values.shape == (2, 1, 28, 28)


def test_config_round_trips_through_json(tmp_path):
    config = DapsConfig.from_preset("mnist", codebook_size=128)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DapsConfig)
    strip = lambda d: {k: v for k, v in d.items() if k not in ("_name_or_path", "transformers_version")}
    assert strip(loaded.to_dict()) == strip(config.to_dict())
    assert loaded.codebook_size == 128 and loaded.bits_per_image == 8 * 7


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("preset", PRESETS)
def test_encode_decode_shapes_and_dtypes(preset):
    model = make_model(preset)
    config = model.config
    batch = 1 if preset == "imagenet" else 2
    x = random_images(config, batch)
    with torch.no_grad():
        enc = model.encode(x)
        assert enc.codes.shape == (batch, config.num_tokens) and enc.codes.dtype == torch.long
        assert enc.log_prob.shape == (batch,) and enc.log_prob.dtype == torch.float32
        assert 0 <= enc.codes.min() and enc.codes.max() < config.codebook_size
        dec = model.decode(enc.codes)
        assert dec.pixel_values.shape == x.shape and dec.pixel_values.dtype == torch.float32
        if preset != "imagenet":
            sampled = model.encode(x, num_samples=3)
            assert sampled.codes.shape == (batch, 3, config.num_tokens)
            assert sampled.log_prob.shape == (batch, 3)
            assert model.decode(sampled.codes).pixel_values.shape == (batch, 3, *x.shape[1:])
            assert model.reconstruction_log_likelihood(x, sampled.codes).shape == (batch, 3)
            assert model.log_prob(x, sampled.codes).shape == (batch, 3)


def test_greedy_encoding_is_deterministic():
    model = make_model("mnist")
    x = random_images(model.config, 4)
    first, second = model.encode(x), model.encode(x)
    assert torch.equal(first.codes, second.codes)
    assert torch.equal(first.log_prob, second.log_prob)


def test_greedy_codes_are_the_argmax_at_each_step():
    model = make_model("tiny")
    x = random_images(model.config, 3)
    codes = model.encode(x).codes
    with torch.no_grad():
        logits = model.code_logits(model.encode_patches(x), codes[:, None])[:, 0]
    assert torch.equal(logits.argmax(-1), codes)


# ----------------------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("preset", ["tiny", "mnist", "cifar"])
def test_cached_log_prob_matches_teacher_forcing(encoder, preset):
    model = make_model(preset, **ENCODERS[encoder])
    x = random_images(model.config, 3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        greedy = model.encode(x)
        sampled = model.encode(x, num_samples=4, generator=g)
        torch.testing.assert_close(model.log_prob(x, greedy.codes), greedy.log_prob, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(model.log_prob(x, sampled.codes), sampled.log_prob, atol=1e-4, rtol=1e-6)


def test_cached_log_prob_matches_teacher_forcing_in_float64():
    # In float64 the cached and teacher-forced paths must agree to rounding: a cache bug cannot hide in tolerance.
    model = make_model("cifar").double()
    x = random_images(model.config, 2).double()
    sampled = model.encode(x, num_samples=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.log_prob(x, sampled.codes), sampled.log_prob.double(), atol=1e-9, rtol=0)


def test_teacher_forcing_is_causal():
    # Changing a later code must not change the log-probabilities of earlier codes.
    model = make_model("tiny")
    x = random_images(model.config, 1)
    codes = model.encode(x).codes
    changed = codes.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.config.codebook_size
    with torch.no_grad():
        memory = model.encode_patches(x)
        a = torch.log_softmax(model.code_logits(memory, codes[:, None]), -1)
        b = torch.log_softmax(model.code_logits(memory, changed[:, None]), -1)
    torch.testing.assert_close(a, b)  # logits at every position depend only on earlier codes


def test_aligned_patches_give_each_token_the_mean_features_of_its_cell():
    # mnist preset: a 4 × 4 grid of 7 × 7 patches under a 2 × 4 grid of 8 tokens, so token t owns 2 × 1 patches.
    model = make_model("mnist", aligned_patches=True)
    x = random_images(model.config, 2)
    memory = model.encode_patches(x)                                         # (2, 16, d)
    aligned = model.code_transformer.memory_keys_values(memory).aligned    # (2, 8, d)
    grid = memory.view(2, 4, 4, -1)
    torch.testing.assert_close(aligned[:, 6], grid[:, 2:4, 2].mean(1))     # token 6: grid row 1, column 2
    # The aligned input reaches the head: the same weights without it give other logits.
    plain = make_model("mnist")
    plain.load_state_dict(model.state_dict())
    codes = model.encode(x).codes[:, None]
    with torch.no_grad():
        assert not torch.allclose(model.code_logits(memory, codes), plain.code_logits(memory, codes))
    # Teacher forcing stays causal with the aligned input.
    changed = codes.clone()
    changed[..., -1] = (changed[..., -1] + 1) % model.config.codebook_size
    with torch.no_grad():
        torch.testing.assert_close(model.code_logits(memory, codes), model.code_logits(memory, changed))
    with pytest.raises(ValueError, match="aligned_patches"):
        DapsConfig.from_preset("mnist", aligned_patches=True, patch_size=4)    # a 7 × 7 patch grid over 2 × 4 tokens
    with pytest.raises(ValueError, match="aligned_patches"):
        DapsConfig.from_preset("tiny", aligned_patches="yes")


# ----------------------------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_generator():
    model = make_model("mnist")
    x = random_images(model.config, 3)
    a = model.encode(x, num_samples=5, generator=torch.Generator().manual_seed(7))
    b = model.encode(x, num_samples=5, generator=torch.Generator().manual_seed(7))
    c = model.encode(x, num_samples=5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, c.codes)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_temperature_to_zero_gives_the_greedy_codes(encoder):
    model = make_model("mnist", **ENCODERS[encoder])
    x = random_images(model.config, 3)
    greedy = model.encode(x)
    cold = model.encode(x, num_samples=4, temperature=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold.codes, greedy.codes[:, None].expand_as(cold.codes))
    # log_prob is always the rate at temperature 1, whatever temperature the codes came from.
    torch.testing.assert_close(cold.log_prob, greedy.log_prob[:, None].expand_as(cold.log_prob))


def test_sample_frequencies_follow_the_model_distribution():
    # One code, parallel encoder: the sampled frequencies must match softmax(logits).
    model = make_model("tiny", encoder_type="parallel", num_tokens=4)
    x = random_images(model.config, 1)
    with torch.no_grad():
        logits = model.code_transformer.parallel(1, model.code_transformer.memory_keys_values(model.encode_patches(x)))
    probs = torch.softmax(logits[0, 0].float() * 1.0, -1)
    codes = model.encode(x, num_samples=20000, generator=torch.Generator().manual_seed(0)).codes[0, :, 0]
    freq = torch.bincount(codes, minlength=model.config.codebook_size).float() / codes.numel()
    assert (freq - probs).abs().max() < 0.015


# ----------------------------------------------------------------------------------------------- quantisers
@pytest.mark.parametrize("overrides", [
    {"quantizer": "fsq", "fsq_levels": [4, 4]},
    {"quantizer": "vq"},
])
def test_deterministic_quantizers_give_integer_codes_and_zero_rate(overrides):
    model = make_model("tiny", encoder_type="parallel", **overrides)
    x = random_images(model.config, 3)
    enc = model.encode(x)
    assert enc.codes.dtype == torch.long and enc.codes.shape == (3, 4)
    assert torch.equal(enc.log_prob, torch.zeros(3))
    assert torch.equal(model.encode(x, num_samples=2).codes, enc.codes[:, None].expand(3, 2, 4))
    assert model.decode(enc.codes).pixel_values.shape == x.shape


def test_fsq_codes_round_trip_through_their_values():
    # decode(codes) rebuilds the decoder's input from integer codes: it must equal the quantised values the decoder
    # saw for those codes when they were produced from latents, and every code must be reachable.
    model = make_model("tiny", encoder_type="parallel", quantizer="fsq", fsq_levels=[4, 4])
    latents = torch.randn(5000, 2, generator=torch.Generator().manual_seed(0)) * 3
    values, codes = model.quantizer.quantize(latents)
    torch.testing.assert_close(model.quantizer.codes_to_values(codes), values, atol=0, rtol=0)
    assert set(codes.tolist()) == set(range(16))


@pytest.mark.parametrize("encoder", ["autoregressive", "parallel"])
def test_lattice_code_embedding_is_the_fsq_decoder_input_and_is_never_trained(encoder, tmp_path):
    # code_embedding_type="lattice": a categorical code c enters the decoder as the FSQ lattice point with index c,
    # so the decoder sees exactly what an FSQ decoder with the same levels sees for that code; no gradient reaches it.
    model = make_model("tiny", encoder_type=encoder, code_embedding_type="lattice", fsq_levels=[4, 4]).train()
    fsq = make_model("tiny", encoder_type="parallel", quantizer="fsq", fsq_levels=[4, 4])
    codes = torch.arange(16).view(4, 4)
    torch.testing.assert_close(model.embed_codes(codes), fsq.quantizer.codes_to_values(codes), atol=0, rtol=0)
    assert model.decoder.conv_in.in_channels == 2
    fsq.decoder.load_state_dict(model.decoder.state_dict())
    torch.testing.assert_close(model.decode(codes).pixel_values, fsq.decode(codes).pixel_values)
    x = random_images(model.config, 4)
    before = model.code_embedding.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    out = model(x, num_samples=2)
    (-(out.log_prob + out.reconstruction_log_likelihood).mean()).backward()
    assert model.code_embedding.weight.grad is None and model.decoder.conv_in.weight.grad is not None
    optimizer.step()
    assert torch.equal(model.code_embedding.weight, before)
    model.save_pretrained(tmp_path)
    loaded = DapsModel.from_pretrained(tmp_path).eval()
    assert loaded.config.code_embedding_type == "lattice"
    assert torch.equal(loaded.embed_codes(codes), model.embed_codes(codes))


@pytest.mark.parametrize("encoder,levels", [("autoregressive", [2, 8]), ("parallel", [2, 8]),
                                            ("autoregressive", [4, 2, 2])])
def test_factorized_code_head_is_an_exact_product_of_coordinate_softmaxes(encoder, levels, tmp_path):
    model = make_model("tiny", encoder_type=encoder, code_head="factorized", fsq_levels=levels,
                       head_initializer_range=0.5)
    head = model.code_transformer.head
    assert head.out_features == sum(levels)
    x = random_images(model.config, 3)
    out = model.encode(x, num_samples=6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.log_prob, model.log_prob(x, out.codes), atol=1e-5, rtol=1e-5)
    memory = model.encode_patches(x)
    logits = model.code_logits(memory, out.codes)                                    # (B, K, L, V)
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(logits.shape[:-1]), atol=1e-5, rtol=0)
    # log q(code) = Σ_d log q_d(coordinate d), coordinate d = (code // Π_{e<d} levels_e) mod levels_d (the first
    # varies fastest; for [2, 8]: log q_1(code mod 2) + log q_2(code div 2)), from the head's raw outputs.
    codes = torch.arange(16)
    hidden = torch.randn(5, 3, model.config.hidden_size)
    parts = head(model.code_transformer.norm(hidden)).split(levels, dim=-1)
    expected, stride = torch.zeros(5, 3, 16), 1
    for part, level in zip(parts, levels):
        expected += part.log_softmax(-1)[..., (codes // stride) % level]
        stride *= level
    torch.testing.assert_close(model.code_transformer.project(hidden), expected)
    greedy = model.encode(x).codes
    model.save_pretrained(tmp_path)
    loaded = DapsModel.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.encode(x).codes, greedy)


@pytest.mark.parametrize("encoder", ["autoregressive", "parallel"])
def test_ordinal_code_head_is_a_discretised_gaussian_per_coordinate(encoder, tmp_path):
    """code_head="ordinal": two head outputs (a, b) per lattice coordinate; level i of n gets the logit
    a·u − softplus(b)·u², u = i − (n − 1)/2, normalised over the coordinate's levels; the code's q is their product,
    the greedy coordinate the level nearest the Gaussian's mean a / (2 softplus(b)) (clipped to the levels)."""
    levels = [4, 2, 3]
    model = make_model("tiny", encoder_type=encoder, codebook_size=24, code_head="ordinal", fsq_levels=levels,
                       head_initializer_range=0.5)
    transformer = model.code_transformer
    assert transformer.factorized and transformer.head.out_features == 2 * len(levels)
    hidden = torch.randn(5, 3, model.config.hidden_size)
    raw = transformer.head(transformer.norm(hidden))
    codes, expected, stride = torch.arange(24), torch.zeros(5, 3, 24), 1
    for d, level in enumerate(levels):
        a, b = raw[..., d], F.softplus(raw[..., len(levels) + d])
        u = torch.arange(level) - (level - 1) / 2
        part = (a[..., None] * u - b[..., None] * u**2).log_softmax(-1)
        expected += part[..., (codes // stride) % level]
        stride *= level
        mean = (a / (2 * b)).clamp(u[0], u[-1])
        nearest = (mean[..., None] - u).abs().argmin(-1)
        assert torch.equal(transformer.coordinate_log_probs(hidden)[d].argmax(-1), nearest)
    torch.testing.assert_close(transformer.project(hidden), expected)
    x = random_images(model.config, 3)
    out = model.encode(x, num_samples=6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.log_prob, model.log_prob(x, out.codes), atol=1e-5, rtol=1e-5)
    greedy = model.encode(x).codes
    model.save_pretrained(tmp_path)
    loaded = DapsModel.from_pretrained(tmp_path).eval()
    assert loaded.config.code_head == "ordinal" and torch.equal(loaded.encode(x).codes, greedy)


@pytest.mark.parametrize("head", ["factorized", "ordinal"])
@pytest.mark.parametrize("encoder,levels", [("autoregressive", [4, 2, 2]), ("parallel", [2, 8])])
def test_factorized_head_samples_each_coordinate_and_follows_q(encoder, levels, head):
    """The factorized head draws a code one lattice coordinate at a time: the sampled codes' frequencies must match
    q's V probabilities (a wrong coordinate order would not), and their log q must be the teacher-forced one."""
    model = make_model("tiny", encoder_type=encoder, num_tokens=4, code_head=head, fsq_levels=levels,
                       head_initializer_range=0.5)
    x = random_images(model.config, 1)
    out = model.encode(x, num_samples=20000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_probs = model.code_logits(model.encode_patches(x), out.codes[:, :2])        # (1, 2, L, V)
    probs = log_probs[0, 0, 0].exp()                     # the first position's q does not depend on the codes
    freq = torch.bincount(out.codes[0, :, 0], minlength=model.config.codebook_size).float() / 20000
    assert probs.max() < 0.9 and (freq - probs).abs().max() < 0.015
    torch.testing.assert_close(out.log_prob[0, :2], log_probs[0].gather(-1, out.codes[0, :2, :, None])[..., 0].sum(-1),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["factorized", "ordinal"])
@pytest.mark.parametrize("encoder", ["autoregressive", "parallel"])
def test_factorized_log_q_from_coordinates_has_the_full_heads_value_and_gradient(encoder, head):
    """An update's log q on the factorized head sums coordinate log-probabilities; it must equal the V-wide path's
    (return_log_probs=True) in value and in every parameter's gradient."""
    model = make_model("tiny", encoder_type=encoder, code_head=head, fsq_levels=[4, 2, 2],
                       head_initializer_range=0.5).train()
    x = random_images(model.config, 5)
    codes = model.encode(x, num_samples=3, generator=torch.Generator().manual_seed(1)).codes
    weights = torch.rand(5, 3, generator=torch.Generator().manual_seed(2))
    results = []
    for full in (True, False):
        model.zero_grad()
        log_q = model._log_prob_from_memory(model.encode_patches(x), codes, return_log_probs=full)
        log_q = log_q[0] if full else log_q
        (weights * log_q).sum().backward()
        results.append((log_q.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full_value, full_grads), (value, grads) = results
    torch.testing.assert_close(value, full_value, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(full_grads) > 0
    for grad, full_grad in zip(grads, full_grads):
        torch.testing.assert_close(grad, full_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head", ["factorized", "ordinal"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_factorized_sampling_is_gumbel_max_per_coordinate(temperature, head):
    """The factorized head's cached loop, written out plainly: at each position one uniform draw (N, Σ levels) from
    the generator, each coordinate the argmax of its log-softmax / τ − log(−log u) over its own columns, the code
    Σ_d coordinate_d · Π_{e<d} levels_e; log q and the proposal's log-probability (q at τ) summed over tokens."""
    levels = [4, 2, 2]
    flat, logits = check_cached_draw(temperature, code_head=head, fsq_levels=levels)
    generator = torch.Generator().manual_seed(5)
    for position in range(8):
        uniform = torch.rand(flat.shape[0], sum(levels), generator=generator).clamp(1e-20, 1 - 1e-7)
        expected, stride, column = torch.zeros(flat.shape[0], dtype=torch.long), 1, 0
        for level in levels:
            # Coordinate d's log-softmax: q is a product over coordinates, so the log q of the codes whose other
            # coordinates are 0, renormalised over this coordinate's values.
            part = logits[:, position, torch.arange(level) * stride].log_softmax(-1)
            noise = -torch.log(-torch.log(uniform[:, column:column + level]))
            expected += (part / temperature + noise).argmax(-1) * stride
            stride, column = stride * level, column + level
        assert torch.equal(flat[:, position], expected)


# ----------------------------------------------------------------------------------------------- save / load
def test_save_and_load_reproduce_outputs_exactly(tmp_path):
    model = make_model("tiny")
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    assert {"modeling_daps.py", "configuration_daps.py"} <= files
    x = random_images(model.config, 3)
    for loaded in (DapsModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, DapsModel)
        loaded.eval()
        a, b = model.encode(x), loaded.encode(x)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.log_prob, b.log_prob)
        assert torch.equal(model.decode(a.codes).pixel_values, loaded.decode(a.codes).pixel_values)


def test_fsq_model_save_and_load(tmp_path):
    model = make_model("tiny", encoder_type="parallel", quantizer="fsq", fsq_levels=[4, 4])
    model.save_pretrained(tmp_path)
    loaded = DapsModel.from_pretrained(tmp_path).eval()
    x = random_images(model.config, 3)
    assert torch.equal(model.encode(x).codes, loaded.encode(x).codes)


def test_trust_remote_code_loads_without_the_package(tmp_path):
    model = make_model("tiny")
    model.save_pretrained(tmp_path / "tok")
    x = random_images(model.config, 2)
    torch.save({"x": x, "codes": model.encode(x).codes, "pixels": model.decode(model.encode(x).codes).pixel_values},
               tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "tokenizer" or name.startswith("tokenizer.") or name == "training":
                    raise ImportError("package hidden for this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModel
        try:
            import tokenizer
            raise SystemExit("the package should not be importable here")
        except ImportError:
            pass
        model = AutoModel.from_pretrained({str(tmp_path / 'tok')!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        assert torch.equal(model.encode(expected["x"]).codes, expected["codes"])
        assert torch.equal(model.decode(expected["codes"]).pixel_values, expected["pixels"])
        print("remote code OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code OK" in result.stdout


def test_corrupt_checkpoint_raises_a_clear_error(tmp_path):
    model = make_model("tiny")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception) as info:
        DapsModel.from_pretrained(tmp_path)
    assert "safetensors" in str(info.value).lower() or "header" in str(info.value).lower() or "deserializ" in str(info.value).lower()


def test_mismatched_checkpoint_is_rejected(tmp_path):
    make_model("tiny").save_pretrained(tmp_path)
    with pytest.raises((ValueError, RuntimeError)) as info:
        DapsModel.from_pretrained(tmp_path, codebook_size=32)
    assert "size" in str(info.value).lower() or "shape" in str(info.value).lower()


# ----------------------------------------------------------------------------------------------- bad inputs
def _bad_inputs():
    model = make_model("tiny")
    good = random_images(model.config, 2)
    codes = model.encode(good).codes
    cases = [
        ("unbatched image", lambda: model.encode(good[0]), ValueError, "batch"),
        ("wrong channels", lambda: model.encode(good[:, :1]), ValueError, "channels"),
        ("wrong spatial size", lambda: model.encode(torch.zeros(2, 3, 8, 8)), ValueError, "spatial size"),
        ("integer pixels", lambda: model.encode(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)), ValueError, "float"),
        ("numpy pixels", lambda: model.encode(good.numpy()), TypeError, "torch.Tensor"),
        ("NaN pixels", lambda: model.encode(torch.full_like(good, float("nan"))), ValueError, "NaN"),
        ("inf pixels", lambda: model.encode(torch.full_like(good, float("inf"))), ValueError, "infinite"),
        ("empty batch", lambda: model.encode(good[:0]), ValueError, "empty"),
        ("num_samples 0", lambda: model.encode(good, num_samples=0), ValueError, "num_samples"),
        ("num_samples float", lambda: model.encode(good, num_samples=2.0), ValueError, "num_samples"),
        ("temperature 0", lambda: model.encode(good, num_samples=2, temperature=0.0), ValueError, "temperature"),
        ("temperature nan", lambda: model.encode(good, num_samples=2, temperature=float("nan")), ValueError, "temperature"),
        ("codes out of range", lambda: model.decode(codes + model.config.codebook_size), ValueError, "lie in"),
        ("negative codes", lambda: model.decode(codes - 100), ValueError, "lie in"),
        ("wrong code length", lambda: model.decode(codes[:, :2]), ValueError, "tokens"),
        ("float codes", lambda: model.decode(codes.float()), TypeError, "integer"),
        ("1-d codes", lambda: model.decode(codes[0]), ValueError, "shape"),
        ("list codes", lambda: model.decode(codes.tolist()), TypeError, "LongTensor"),
        ("batch mismatch", lambda: model.log_prob(good, codes[:1]), ValueError, "batch size"),
        ("bernoulli range", lambda: make_model("tiny", likelihood="bernoulli").encode(good), ValueError, r"\[0, 1\]"),
        ("image size not divisible", lambda: DapsConfig(image_size=30), ValueError, "divisible"),
        ("heads do not divide width", lambda: DapsConfig(hidden_size=30, num_heads=4), ValueError, "num_heads"),
        ("fsq levels mismatch", lambda: DapsConfig(encoder_type="parallel", quantizer="fsq", fsq_levels=[4, 4]), ValueError, "product"),
        ("vq needs parallel", lambda: DapsConfig(quantizer="vq"), ValueError, "parallel"),
        ("lattice needs levels", lambda: DapsConfig(code_embedding_type="lattice"), ValueError, "fsq_levels"),
        ("lattice levels mismatch", lambda: DapsConfig(code_embedding_type="lattice", fsq_levels=[8, 8]), ValueError, "product"),
        ("lattice is categorical", lambda: DapsConfig(encoder_type="parallel", quantizer="vq", code_embedding_type="lattice"), ValueError, "categorical"),
        ("factorized head is categorical", lambda: DapsConfig(encoder_type="parallel", quantizer="vq", code_head="factorized", fsq_levels=[8, 8, 8]), ValueError, "categorical"),
        ("factorized head needs levels", lambda: DapsConfig(code_head="factorized"), ValueError, "fsq_levels"),
        ("ordinal head is categorical", lambda: DapsConfig(encoder_type="parallel", quantizer="fsq", code_head="ordinal", fsq_levels=[8, 8, 8]), ValueError, "categorical"),
        ("ordinal head needs levels", lambda: DapsConfig(code_head="ordinal"), ValueError, "fsq_levels"),
        ("unknown code embedding", lambda: DapsConfig(code_embedding_type="random"), ValueError, "code_embedding_type"),
        ("unknown preset", lambda: DapsConfig.from_preset("svhn"), ValueError, "presets"),
        ("unknown likelihood", lambda: DapsConfig(likelihood="laplace"), ValueError, "likelihood"),
        ("three channels only", lambda: DapsConfig(num_channels=4), ValueError, "num_channels"),
    ]
    return cases


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_inputs_raise_clear_errors(case):
    name, call, error, pattern = case
    with pytest.raises(error, match=pattern):
        call()


def test_every_bad_input_message_names_expected_and_received():
    model = make_model("tiny")
    with pytest.raises(ValueError) as info:
        model.encode(torch.zeros(2, 1, 16, 16))
    message = str(info.value)
    assert "1 channels" in message and "expects 3" in message


# ----------------------------------------------------------------------------------------------- search encoding
def test_best_of_n_shapes_and_determinism():
    model = make_model("mnist")
    x = random_images(model.config, 3)
    a = model.encode(x, search="best-of-n", num_candidates=6, generator=torch.Generator().manual_seed(3))
    b = model.encode(x, search="best-of-n", num_candidates=6, generator=torch.Generator().manual_seed(3))
    assert a.codes.shape == (3, 8) and a.codes.dtype == torch.long and a.log_prob.shape == (3,)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(model.log_prob(x, a.codes), a.log_prob, atol=1e-4, rtol=1e-6)


def _perturbed_model(preset="mnist", scale=0.05, **overrides):
    torch.manual_seed(0)
    model = make_model(preset, **overrides)
    with torch.no_grad():  # a decoder that depends on its codes, so candidates differ
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    return model


def _perturbed_mnist_model():
    return _perturbed_model("mnist")


def test_best_of_n_is_never_worse_than_greedy_and_picks_the_best_candidate():
    model = _perturbed_mnist_model()
    x = random_images(model.config, 6)
    greedy = model.encode(x)
    best = model.encode(x, search="best-of-n", num_candidates=12, generator=torch.Generator().manual_seed(0))
    greedy_score = model.reconstruction_log_likelihood(x, greedy.codes)
    best_score = model.reconstruction_log_likelihood(x, best.codes)
    assert (best_score >= greedy_score - 1e-4).all()
    assert (best_score > greedy_score + 1e-3).any()  # with 12 candidates, some image finds a better code
    candidates = model.encode(x, num_samples=12, generator=torch.Generator().manual_seed(0)).codes
    assert (best_score >= model.reconstruction_log_likelihood(x, candidates).max(1).values - 1e-4).all()


def _searched_twice(model, x, **search):
    """The search's output, checked for shapes, determinism (a second call gives the same codes) and its log q."""
    a = model.encode(x, **search)
    b = model.encode(x, **search)
    assert a.codes.shape == (len(x), model.config.num_tokens) and a.codes.dtype == torch.long
    assert a.log_prob.shape == (len(x),)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(model.log_prob(x, a.codes), a.log_prob, atol=1e-4, rtol=1e-6)
    return a


def test_local_search_shapes_determinism_and_log_prob():
    model = _perturbed_mnist_model()
    _searched_twice(model, random_images(model.config, 3), search="local", num_candidates=3, num_sweeps=1)


def test_local_search_is_never_worse_than_greedy_and_ends_at_a_local_optimum():
    model = _perturbed_mnist_model()
    x = random_images(model.config, 6)
    greedy = model.encode(x).codes
    found = model.encode(x, search="local", num_candidates=4, num_sweeps=50).codes
    greedy_score = model.reconstruction_log_likelihood(x, greedy)
    score = model.reconstruction_log_likelihood(x, found)
    assert (score >= greedy_score - 1e-3).all()
    assert (score > greedy_score + 1e-2).any()  # some image finds a better code
    # At the end no single position can be raised by any of the codes tried there (the encoder's top 4 given the
    # greedy prefix): the search stopped at a local optimum, not after a fixed amount of work.
    with torch.no_grad():
        tried = model.code_logits(model.encode_patches(x), greedy[:, None])[:, 0].topk(4, dim=-1).indices
        for position in range(greedy.shape[1]):
            candidates = found[:, None].repeat(1, 4, 1)
            candidates[:, :, position] = tried[:, position]
            assert (model.reconstruction_log_likelihood(x, candidates) <= score[:, None] + 1e-3).all(), position
    # One sweep is the first pass of the same deterministic path: between greedy and the converged search.
    one = model.reconstruction_log_likelihood(x, model.encode(x, search="local", num_candidates=4, num_sweeps=1).codes)
    assert (one >= greedy_score - 1e-3).all() and (one <= score + 1e-3).all()


def _perturbed_grid_model():
    """A small conv-decoder model whose codes lie on a 4 × 4 grid (so the 3 × 3 colouring has several colours with
    more than one position), with weights enlarged so that its codes and reconstructions depend on the image."""
    return _perturbed_model("tiny", num_tokens=16, codebook_size=16)


def test_parallel_search_shapes_determinism_log_prob_and_never_worse_than_greedy():
    model = _perturbed_grid_model()
    x = random_images(model.config, 6)
    a = _searched_twice(model, x, search="parallel", num_candidates=4, num_sweeps=3)
    greedy_score = model.reconstruction_log_likelihood(x, model.encode(x).codes)
    score = model.reconstruction_log_likelihood(x, a.codes)
    assert (score >= greedy_score - 1e-3).all()
    assert (score > greedy_score + 1e-2).any()  # some image finds a better code
    # The moves are several positions at a time: some image changed more than one token.
    assert ((a.codes != model.encode(x).codes).sum(1) > 1).any()
    # Every position in one colour, each judged on its own cell only: most combined moves lower log p(x | z), and
    # only the check of the whole image's log-likelihood keeps the search from taking them.
    with torch.no_grad():
        memory = model.encode_patches(x)
        greedy, _ = model._sample_from_memory(memory, None, 1.0, None)
        coarse = model._parallel_local_search(x, memory, greedy[:, 0], 4, 3, stride=1, window=1)
    assert (model.reconstruction_log_likelihood(x, coarse.codes) >= greedy_score - 1e-3).all()


def test_parallel_search_with_one_position_per_colour_and_a_whole_grid_window_is_local_search():
    """With a colouring stride as large as the grid, every colour is one position, met in raster order, and a window
    covering the grid credits a position with the whole image's log p(x | z): the parallel search is then exactly the
    sequential one (same candidates, same acceptance), so the two must return the same codes."""
    model = _perturbed_grid_model()
    x = random_images(model.config, 5, seed=3)
    with torch.no_grad():
        memory = model.encode_patches(x)
        greedy, _ = model._sample_from_memory(memory, None, 1.0, None)
        sequential = model._local_search(x, memory, greedy[:, 0], 3, 2).codes
        parallel = model._parallel_local_search(x, memory, greedy[:, 0], 3, 2, stride=4,
                                                window=9).codes
    assert not torch.equal(sequential, greedy[:, 0])  # the comparison is not between two unchanged greedy codes
    assert torch.equal(parallel, sequential)


@pytest.mark.parametrize("quantizer", [dict(quantizer="fsq", fsq_levels=[4, 4]), dict(quantizer="vq")])
@pytest.mark.parametrize("search", ["local", "parallel"])
def test_quantizer_codes_can_be_searched_from_their_nearest_lattice_points(quantizer, search):
    """FSQ and VQ have one code per image, but the codes near the latent can be tried too: the first code tried at a
    position is the quantiser's own, and the search is never worse than it."""
    model = _perturbed_model("tiny", scale=0.3, encoder_type="parallel", num_tokens=16, codebook_size=16, **quantizer)
    x = random_images(model.config, 6)
    greedy = model.encode(x).codes
    with torch.no_grad():
        tried = model._search_candidates(model.encode_patches(x), greedy, 4)
    assert tried.shape == (6, 16, 4)
    assert torch.equal(tried[..., 0], greedy)
    found = model.encode(x, search=search, num_candidates=4, num_sweeps=2)
    assert torch.equal(found.log_prob, torch.zeros(6))  # a quantiser has no distribution over codes
    assert torch.equal(found.codes, model.encode(x, search=search, num_candidates=4, num_sweeps=2).codes)
    score = model.reconstruction_log_likelihood(x, found.codes)
    greedy_score = model.reconstruction_log_likelihood(x, greedy)
    assert (score >= greedy_score - 1e-3).all()
    assert (score > greedy_score + 1e-2).any()


def test_parallel_search_needs_the_conv_decoder_and_checks_its_arguments():
    model = make_model("mnist")  # MLP decoder: no grid of token cells
    x = random_images(model.config, 1)
    with pytest.raises(ValueError, match="conv decoder"):
        model.encode(x, search="parallel")
    tiny = make_model("tiny")
    y = random_images(tiny.config, 1)
    with pytest.raises(ValueError, match="num_sweeps"):
        tiny.encode(y, search="parallel", num_sweeps=0)
    with pytest.raises(ValueError, match="num_samples"):
        tiny.encode(y, search="parallel", num_samples=2)


def test_best_of_n_rejects_bad_arguments():
    model = make_model("tiny")
    x = random_images(model.config, 1)
    with pytest.raises(ValueError, match="search"):
        model.encode(x, search="beam")
    with pytest.raises(ValueError, match="num_candidates"):
        model.encode(x, search="best-of-n", num_candidates=0)
    with pytest.raises(ValueError, match="num_samples"):
        model.encode(x, search="best-of-n", num_samples=2)
    with pytest.raises(ValueError, match="num_sweeps"):
        model.encode(x, search="local", num_sweeps=0)
    with pytest.raises(ValueError, match="num_samples"):
        model.encode(x, search="local", num_samples=2)


@pytest.mark.parametrize("encoder_type", ["autoregressive", "parallel"])
def test_exploration_proposal_log_prob_matches_teacher_forcing(encoder_type):
    """Codes drawn from (1 − ε)·q + ε·uniform carry log μ = Σ_t log((1 − ε)·q_t + ε/V), with q_t teacher-forced."""
    torch.manual_seed(0)
    model = DapsModel(DapsConfig.from_preset("tiny", encoder_type=encoder_type)).eval()
    x = torch.rand(3, model.config.num_channels, model.config.image_size, model.config.image_size)
    memory = model.encode_patches(x)
    epsilon, k = 0.3, 5
    codes, log_q, log_mu = model._sample_from_memory(memory, k, 1.0, torch.Generator().manual_seed(1),
                                                     exploration=epsilon, return_proposal=True)
    token_log_q = torch.log_softmax(model.code_logits(memory, codes), dim=-1).gather(-1, codes[..., None])[..., 0]
    expected = torch.log((1 - epsilon) * token_log_q.exp() + epsilon / model.config.codebook_size).sum(-1)
    torch.testing.assert_close(log_mu, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(log_q, token_log_q.sum(-1), atol=1e-4, rtol=1e-4)
    # ε = 0 is plain sampling: same codes from the same seed, and log μ = log q.
    plain, plain_log_q = model._sample_from_memory(memory, k, 1.0, torch.Generator().manual_seed(1))
    again, again_log_q, again_mu = model._sample_from_memory(memory, k, 1.0, torch.Generator().manual_seed(1),
                                                             return_proposal=True)
    assert torch.equal(plain, again)
    torch.testing.assert_close(again_mu, again_log_q)
    with pytest.raises(ValueError, match="exploration"):
        model._sample_from_memory(memory, k, 1.0, None, exploration=1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_is_gumbel_max_on_the_teacher_forced_logits(temperature):
    """The cached loop's samples, written out plainly: at each position one uniform draw (N, V) from the generator,
    z_t = argmax(logits_t / τ − log(−log u)), with logits_t teacher-forced on the sampled prefix; log q and the
    proposal's log-probability (q at temperature τ) summed over tokens. Pins the in-place noise and the τ = 1
    shortcut (proposal = q) of the fast loop."""
    flat, logits = check_cached_draw(temperature)
    generator = torch.Generator().manual_seed(5)
    for position in range(8):
        uniform = torch.rand(logits[:, position].shape, generator=generator).clamp(1e-20, 1 - 1e-7)
        expected = (logits[:, position] / temperature - torch.log(-torch.log(uniform))).argmax(-1)
        assert torch.equal(flat[:, position], expected)


def check_cached_draw(temperature: float, **overrides):
    """Draws K = 4 codes for 3 images from a tiny 8-token model (generator seed 5) with the cached loop, checks that
    the returned log q and proposal log-probability (q at τ) are the teacher-forced ones summed over tokens, and
    returns the codes (N, L) and their teacher-forced logits (N, L, V), N = 3·4, for a test to rebuild the draw."""
    torch.manual_seed(0)
    model = DapsModel(DapsConfig.from_preset("tiny", num_tokens=8, **overrides)).eval()
    x = torch.rand(3, model.config.num_channels, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        memory = model.encode_patches(x)
        codes, log_q, log_proposal = model._sample_from_memory(memory, 4, temperature,
                                                               torch.Generator().manual_seed(5), return_proposal=True)
        logits = model.code_logits(memory, codes).reshape(12, 8, -1)
    flat = codes.reshape(12, 8)
    chosen = flat[..., None]
    torch.testing.assert_close(log_q.reshape(-1), torch.log_softmax(logits, -1).gather(-1, chosen)[..., 0].sum(-1),
                               atol=1e-4, rtol=1e-4)
    tempered = torch.log_softmax(logits / temperature, -1).gather(-1, chosen)[..., 0].sum(-1)
    torch.testing.assert_close(log_proposal.reshape(-1), tempered, atol=1e-4, rtol=1e-4)
    return flat, logits


def test_exploration_reaches_codes_the_encoder_would_not_sample():
    torch.manual_seed(0)
    model = DapsModel(DapsConfig.from_preset("tiny", head_initializer_range=3.0)).eval()  # a near-deterministic q
    x = torch.rand(2, model.config.num_channels, model.config.image_size, model.config.image_size)
    memory = model.encode_patches(x)
    plain, _ = model._sample_from_memory(memory, 64, 1.0, torch.Generator().manual_seed(0))
    explored, _ = model._sample_from_memory(memory, 64, 1.0, torch.Generator().manual_seed(0), exploration=0.5)
    distinct = lambda codes: len({tuple(row.tolist()) for row in codes[0]})  # noqa: E731
    assert distinct(explored) > distinct(plain)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("queries", [1, 40])
def test_attention_fast_paths_match_scaled_dot_product_attention(causal, queries):
    """The plain matmul–softmax–matmul paths (short fp32 queries, small bf16 CPU scores) against PyTorch's kernel."""
    import torch.nn.functional as F

    from tokenizer.modeling_daps import attend

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=generator) for n in (queries, queries, queries))
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal).float()
    torch.testing.assert_close(attend(q, k, v, causal=causal), reference, atol=1e-5, rtol=1e-5)
    fast = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), reference, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_attention_reads_a_strided_cache_like_a_contiguous_one(dtype):
    """A cached step attends to the filled part of a preallocated cache (a strided view): `cached=True` (which
    sends bf16 on CPU to PyTorch's kernel) gives what the plain path gives on a contiguous copy."""
    from tokenizer.modeling_daps import attend

    generator = torch.Generator().manual_seed(0)
    cache_k, cache_v = (torch.randn(6, 4, 64, 16, generator=generator).to(dtype) for _ in range(2))
    q = torch.randn(6, 4, 1, 16, generator=generator).to(dtype)
    k, v = cache_k[:, :, :37], cache_v[:, :, :37]
    assert not k.is_contiguous()
    reference = attend(q.double(), k.double().contiguous(), v.double().contiguous())
    got = attend(q, k, v, cached=True)
    assert got.dtype == dtype and got.shape == (6, 4, 1, 16)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), reference, atol=tolerance, rtol=tolerance)


def test_bf16_cached_sampling_matches_the_plain_attention_path(monkeypatch):
    """The bf16 sampling loop with the cached fast path (PyTorch's kernel on the strided cache) gives the same codes
    and log q as with the plain matmul path for every step, greedy and sampled from one seed."""
    import tokenizer.modeling_daps as modeling

    torch.manual_seed(0)
    # A large head init makes q depend strongly on the hidden states, so a wrong read of the cache shows.
    config = DapsConfig.from_preset("tiny", num_tokens=16, pixel_paths=True, aligned_patches=True,
                                    head_initializer_range=3.0)
    model = DapsModel(config).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            memory = model.encode_patches(x)
            greedy = model._sample_from_memory(memory, None, 1.0, None)
            sampled = model._sample_from_memory(memory, 5, 1.0, torch.Generator().manual_seed(0))
        return greedy, sampled

    fast = run()
    plain_attend = modeling.attend
    monkeypatch.setattr(modeling, "attend", lambda q, k, v, causal=False, cached=False: plain_attend(q, k, v, causal))
    plain = run()
    for (fast_codes, fast_log_q), (plain_codes, plain_log_q) in zip(fast, plain):
        assert torch.equal(fast_codes, plain_codes)
        torch.testing.assert_close(fast_log_q, plain_log_q, atol=0.25, rtol=0.05)  # bf16 rounding


@pytest.mark.parametrize("per_token", [False, True])
def test_repeated_codes_are_decoded_once_with_the_same_values_and_gradients(per_token):
    torch.manual_seed(0)
    model = DapsModel(DapsConfig.from_preset("tiny", num_tokens=16, pixel_paths=True))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    distinct = torch.randint(0, 16, (3, 3, 16))
    # Image 0: samples 0, 2 and 4 repeat one code; image 1: all five distinct; image 2: two pairs.
    codes = torch.stack([distinct[0, [0, 1, 0, 2, 0]],
                         torch.randint(0, 16, (5, 16)),
                         distinct[2, [0, 1, 1, 0, 2]]])                               # (3, 5, 16)
    calls = []
    hook = model.decoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    reward, means = model._reconstruction_log_likelihood(x, codes, per_token=per_token)
    hook.remove()
    assert calls == [3 + 5 + 3]                                      # one decode per distinct (image, code)
    (reward.sum() + means.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # Reference: every copy decoded on its own, one image and sample at a time.
    expected_reward, expected_means = [], []
    for i in range(3):
        for j in range(5):
            parameters = model.likelihood_parameters(model.embed_codes(codes[i, j][None]))
            score = (model.token_log_likelihood if per_token else model.log_likelihood)(x[i][None], parameters)
            expected_reward.append(score[0])
            expected_means.append(parameters.pixel_values[0])
    expected_reward = torch.stack(expected_reward).view(reward.shape)
    expected_means = torch.stack(expected_means).view(means.shape)
    torch.testing.assert_close(reward, expected_reward, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(means, expected_means, atol=1e-5, rtol=1e-5)
    (expected_reward.sum() + expected_means.sum()).backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-3, rtol=1e-4, msg=name)


@pytest.mark.parametrize("search", ["best-of-n", "local", "parallel"])
def test_squared_error_search_is_never_worse_than_greedy_in_squared_error(search):
    """search_objective="squared_error" moves the codes to lower the squared error of the decoder's mean (PSNR up),
    not to raise log p(x | z): never worse than greedy by that measure, and a different path from the default."""
    model = _perturbed_grid_model()
    x = random_images(model.config, 6)

    def squared_error(codes):
        with torch.no_grad():
            return (model.decode(codes).pixel_values - x).pow(2).flatten(1).sum(1)

    settings = dict(search=search, num_candidates=16 if search == "best-of-n" else 4, num_sweeps=2,
                    generator=torch.Generator().manual_seed(0))
    found = model.encode(x, search_objective="squared_error", **settings).codes
    greedy = squared_error(model.encode(x).codes)
    assert (squared_error(found) <= greedy + 1e-4).all()
    assert (squared_error(found) < greedy - 1e-3).any()
    settings["generator"] = torch.Generator().manual_seed(0)
    assert not torch.equal(found, model.encode(x, **settings).codes)
    with pytest.raises(ValueError, match="search_objective"):
        model.encode(x, search=search, search_objective="psnr")
