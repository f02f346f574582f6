"""The k-means warm start of DAPS: cells, k-means, the warm-start step, and its place in training and resume."""

import math

import pytest
import torch
from safetensors.torch import load_file

from tokenizer import DapsModel
from training import objective
from training.methods import DapsMethod
from training.trainer import build_config, train
from training.warm_start import fit_kmeans, nearest_codes, token_cells

from test_training import read_log, tiny_args


def test_token_cells_are_the_pixel_blocks_under_the_tokens_in_raster_order():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    cells = token_cells(images, num_tokens=8)            # a 2 × 4 grid: blocks of 4 × 2 pixels
    assert cells.shape == (2, 8, 3 * 4 * 2)
    # Token 6 is row 1, column 2 of the grid: rows 4..7, columns 4..5, every channel.
    torch.testing.assert_close(cells[1, 6], images[1, :, 4:8, 4:6].reshape(-1))
    with pytest.raises(ValueError, match="multiple"):
        token_cells(torch.zeros(1, 1, 9, 9), num_tokens=4)


def test_nearest_codes_is_the_argmin_of_the_distance():
    generator = torch.Generator().manual_seed(0)
    points, centroids = torch.randn(50, 2, 5, generator=generator), torch.randn(7, 5, generator=generator)
    expected = torch.cdist(points.reshape(-1, 5), centroids).argmin(-1).reshape(50, 2)
    torch.testing.assert_close(nearest_codes(points, centroids, chunk=13), expected)


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    generator = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = (centres[:, None] + 0.1 * torch.randn(3, 40, 2, generator=generator)).reshape(-1, 2)
    found = fit_kmeans(points, 3, iterations=10, seed=3)
    # Every true centre has a centroid next to it: k-means++ seeding spreads the first centroids over the clusters.
    assert torch.cdist(centres, found).min(-1).values.max() < 0.1
    torch.testing.assert_close(fit_kmeans(points, 3, iterations=10, seed=3), found)
    # More codes than distinct points: still V centroids, all finite.
    assert torch.isfinite(fit_kmeans(points[:2], 5, iterations=3)).all()
    with pytest.raises(ValueError):
        fit_kmeans(torch.zeros(0, 2), 3)


def _method(tmp_path, warm_start_steps):
    config, _ = build_config(tiny_args(tmp_path, preset="tiny", num_tokens=16, patch_size=2), image_size=8,
                             num_channels=1)
    model = DapsModel(config)
    control = objective.make_eta_control("bisection", rho=0.5, num_samples=4)
    return DapsMethod(model, 4, control, lambda progress: 0.5, decoder_weighting="posterior", update_samples=2,
                      warm_start_steps=warm_start_steps)


def test_warm_start_steps_fit_both_halves_to_the_kmeans_codes_then_daps_takes_over(tmp_path):
    torch.manual_seed(0)
    method = _method(tmp_path, warm_start_steps=2)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    with pytest.raises(RuntimeError, match="fit_warm_start"):
        method(images, images, 0.0)
    method.fit_warm_start(images, seed=0)
    assert method.warm_start_centroids.shape == (16, 4)      # V = 16 centroids of 2 × 2 blocks
    out = method(images, images, 0.0)
    assert out["warm_start"] == 1.0 and "ess" not in out
    # The loss is −log q(z | x) − log p(x | z) of each image's k-means code, computed here independently.
    model = method.model
    codes = torch.cdist(token_cells(images, 16).reshape(-1, 4), method.warm_start_centroids).argmin(-1).view(6, 1, 16)
    log_q = torch.log_softmax(model.code_logits(model.encode_patches(images), codes), -1)
    log_q = log_q.gather(-1, codes[..., None]).sum((-1, -2)).squeeze(-1)
    log_p = model.reconstruction_log_likelihood(images, codes[:, 0])
    torch.testing.assert_close(out["loss"], -log_q.mean() - log_p.mean())
    out["loss"].backward()
    assert model.code_transformer.head.weight.grad is not None
    method.after_step()
    assert method(images, images, 0.0)["warm_start"] == 1.0
    method.after_step()
    assert not method.warm_start_pending
    out = method(images, images, 0.5)                          # step 3 is a DAPS step
    assert "warm_start" not in out and math.isfinite(out["ess"])
    method.after_step()
    state = method.state_dict_extra()
    assert state["steps_done"] == 3
    fresh = _method(tmp_path, warm_start_steps=2)
    fresh.load_state_dict_extra(state)
    assert fresh.steps_done == 3 and not fresh.warm_start_pending


def test_warm_start_trains_end_to_end_and_resumes_mid_warm_start(tmp_path):
    with pytest.raises(ValueError, match="warm_start_steps"):
        train(tiny_args(tmp_path, method="fsq", warm_start_steps=3))
    with pytest.raises(ValueError, match="warm_start_steps"):
        train(tiny_args(tmp_path, warm_start_steps=-1))
    straight = tiny_args(tmp_path, output_dir=str(tmp_path / "straight"), max_steps=6, warm_start_steps=4,
                         num_samples=4)
    metrics = train(straight)
    assert metrics["steps"] == 6 and metrics["skipped_updates"] == 0
    rows = [row for row in read_log(tmp_path / "straight") if "encoder_loss" in row]
    assert [row.get("warm_start", 0.0) for row in rows] == [1.0] * 4 + [0.0] * 2
    # Stopped after 3 of the 4 warm-start steps and resumed: the codebook is fitted again, identically, and the
    # run ends where the uninterrupted one did.
    halves = dict(output_dir=str(tmp_path / "halves"), warm_start_steps=4, num_samples=4)
    train(tiny_args(tmp_path, max_steps=3, **halves))
    train(tiny_args(tmp_path, max_steps=6, resume=True, **halves))
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "halves" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------- pixel paths
def _pixel_model(**overrides):
    torch.manual_seed(0)
    from tokenizer import DapsConfig
    return DapsModel(DapsConfig.from_preset("tiny", num_tokens=16, pixel_paths=True, **overrides)).eval()


def test_pixel_paths_add_a_linear_logit_per_patch_and_a_pixel_block_per_code():
    from tokenizer.modeling_daps import patch_pixels, unpatch_pixels

    model = _pixel_model(decoder_gate_init=0.0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = torch.randint(0, 16, (2, 1, 16))
    with torch.no_grad():
        # Zero at initialisation: no pixel logits, and with a closed gate the decoder network's output is zero.
        assert model.encode_patches(x)[..., -16:].abs().max() == 0
        assert model.decode(codes[:, 0]).pixel_values.abs().max() == 0
        before = model.code_logits(model.encode_patches(x), codes)
        head = model.patch_encoder.pixel_head
        head.weight.normal_()
        head.bias.normal_()
        after = model.code_logits(model.encode_patches(x), codes)
        torch.testing.assert_close(after - before, head(patch_pixels(x, 4))[:, None], atol=1e-4, rtol=1e-4)
        blocks = torch.randn(16, 48)
        model.code_embedding.weight[:, -48:] = blocks
        expected = unpatch_pixels(blocks[codes[:, 0]], 4, 4, 3)
        torch.testing.assert_close(model.decode(codes[:, 0]).pixel_values, expected)
        # With the default gate (0.3), the network's gated output is added, and the network reads the whole code
        # embedding, pixel block included: changing only the blocks changes its contribution.
        gated = _pixel_model()
        assert torch.equal(gated.decoder.network_gate, torch.full((6,), 0.3))
        network_part = []
        for scale in (1.0, 2.0):
            gated.code_embedding.weight[:, -48:] = blocks * scale
            embeddings = gated.embed_codes(codes[:, 0])
            mean = gated.decode(codes[:, 0]).pixel_values
            residual = 0.3 * gated.decoder._network(embeddings)[:, :3]
            torch.testing.assert_close(mean, unpatch_pixels(blocks[codes[:, 0]] * scale, 4, 4, 3) + residual,
                                       atol=1e-5, rtol=1e-5)
            network_part.append(residual)
        assert (network_part[0] - network_part[1]).abs().max() > 1e-3
        # Sampling with the KV cache and teacher forcing agree with the pixel logits in.
        sampled = model.encode(x, num_samples=3, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model.log_prob(x, sampled.codes), sampled.log_prob, atol=1e-4, rtol=1e-6)
    assert torch.equal(unpatch_pixels(patch_pixels(x, 4), 4, 4, 3), x)
    from tokenizer import DapsConfig
    with pytest.raises(ValueError, match="pixel_paths"):
        DapsConfig.from_preset("tiny", pixel_paths=True)             # 16 patches for 4 tokens
    with pytest.raises(ValueError, match="pixel_paths"):
        DapsConfig.from_preset("tiny", num_tokens=16, pixel_paths=True, quantizer="fsq", encoder_type="parallel",
                               fsq_levels=[4, 4])


def test_kmeans_init_starts_the_model_as_a_patch_kmeans_tokenizer(tmp_path):
    # With the decoder gate closed at the start, the model is exactly the k-means tokenizer.
    model = _pixel_model(head_initializer_range=0.02, decoder_gate_init=0.0)
    control = objective.make_eta_control("bisection", rho=0.5, num_samples=4)
    with pytest.raises(ValueError, match="pixel_paths"):
        DapsMethod(_method(tmp_path, 0).model, 4, control, lambda progress: 0.5, kmeans_init=True)
    method = DapsMethod(model, 4, control, lambda progress: 0.5, kmeans_init=True)
    assert method.warm_start_pending
    generator = torch.Generator().manual_seed(0)
    # Images made of a few flat colours per patch, so k-means has clear clusters.
    colours = torch.rand(6, 3, generator=generator) * 2 - 1
    picks = torch.randint(0, 6, (64, 4, 4), generator=generator)
    images = colours[picks].permute(0, 3, 1, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)   # (64, 3, 16, 16)
    images = images + 0.01 * torch.randn(images.shape, generator=generator)
    method.fit_warm_start(images, seed=0)
    centroids = method.warm_start_centroids
    nearest = nearest_codes(token_cells(images, 16), centroids)                       # (64, 16)
    with torch.no_grad():
        greedy = model.encode(images).codes
        # The encoder's mode is the nearest centroid, and that code decodes to the centroid itself.
        assert (greedy == nearest).float().mean() > 0.99
        decoded = model.decode(nearest).pixel_values
    torch.testing.assert_close(token_cells(decoded, 16), centroids[nearest])
    method.steps_done = 1
    assert not method.warm_start_pending                                              # a resumed run keeps its weights


def test_kmeans_init_trains_end_to_end(tmp_path):
    with pytest.raises(ValueError, match="kmeans_init"):
        train(tiny_args(tmp_path, method="vq", kmeans_init=True))
    metrics = train(tiny_args(tmp_path, preset="tiny", num_tokens=16, patch_size=2, max_steps=4, num_samples=4,
                              pixel_paths=True, aligned_patches=True, kmeans_init=True))
    assert metrics["steps"] == 4 and metrics["skipped_updates"] == 0
    loaded = DapsModel.from_pretrained(tmp_path / "run")
    assert loaded.config.pixel_paths and loaded.config.aligned_patches
    assert loaded.patch_encoder.pixel_head.weight.abs().sum() > 0


def test_kmeans_start_is_the_daps_default_where_each_token_has_its_own_patch(tmp_path):
    from training.arguments import TrainArguments
    from training.trainer import build_method, resolve_defaults

    def resolved(**kwargs):
        args = resolve_defaults(TrainArguments(output_dir=str(tmp_path / "run"), **kwargs))
        config, notes = build_config(args, args.image_size or 32, 3)
        method = build_method(args, DapsModel(config), None) if args.method.startswith("daps") else None
        return config, notes, method

    config, _, method = resolved(dataset="photo-crops")
    assert config.pixel_paths and config.aligned_patches and method.kmeans_init
    config, _, _ = resolved(dataset="photo-crops", method="fsq")                 # the baselines keep their encoder
    assert not config.pixel_paths and not config.aligned_patches
    config, notes, method = resolved(dataset="photo-crops", image_size=64)       # 16² patches for 64 tokens
    assert not config.pixel_paths and not method.kmeans_init and any("k-means" in note for note in notes)
    config, _, method = resolved(dataset="photo-crops", pixel_paths=False)
    assert not config.pixel_paths and not method.kmeans_init
    config, _, method = resolved(dataset="digits")                                # the mnist preset: unchanged
    assert not config.pixel_paths and not method.kmeans_init
    with pytest.raises(ValueError, match="init_from"):
        resolve_defaults(TrainArguments(dataset="photo-crops", init_from="somewhere", kmeans_init=True))


def test_kmeans_temperature_divides_the_pixel_head():
    control = objective.make_eta_control("bisection", rho=0.5, num_samples=4)
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    heads = []
    for temperature in (1.0, 4.0):
        method = DapsMethod(_pixel_model(), 4, control, lambda progress: 0.5, kmeans_init=True,
                            kmeans_temperature=temperature)
        method.fit_warm_start(images, seed=0)
        heads.append(method.model.patch_encoder.pixel_head)
    torch.testing.assert_close(heads[1].weight * 4, heads[0].weight)
    torch.testing.assert_close(heads[1].bias * 4, heads[0].bias)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="kmeans_temperature"):
            DapsMethod(_pixel_model(), 4, control, lambda progress: 0.5, kmeans_init=True, kmeans_temperature=bad)


def test_fixed_code_blocks_keep_the_decoder_table_at_the_kmeans_blocks_through_training(tmp_path):
    control = objective.make_eta_control("bisection", rho=0.5, num_samples=4)
    with pytest.raises(ValueError, match="kmeans_init"):
        DapsMethod(_pixel_model(), 4, control, lambda progress: 0.5, fixed_code_blocks=True)
    metrics = train(tiny_args(tmp_path, preset="tiny", num_tokens=16, patch_size=2, max_steps=6, num_samples=4,
                              pixel_paths=True, aligned_patches=True, kmeans_init=True, fixed_code_blocks=True,
                              save_every=3))
    assert metrics["steps"] == 6 and metrics["skipped_updates"] == 0
    table = DapsModel.from_pretrained(tmp_path / "run").code_embedding.weight
    blocks = table.shape[1] - 4                                     # the tiny preset's 2 × 2 grey blocks
    assert table[:, :blocks].abs().max() == 0                       # the learned part stays zero
    # The blocks are the k-means centroids the run started from: the table after 3 steps equals the one after 6.
    first = load_file(sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[0] / "model.safetensors")
    assert torch.equal(first["model.code_embedding.weight"], table.detach())
    assert table[:, blocks:].abs().sum() > 0
