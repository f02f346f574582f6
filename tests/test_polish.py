"""The decoder polish (`--polish_fraction`): the last part of a run trains only the code-to-image path on the frozen
encoder's greedy codes; it keeps the encoder exactly, resumes exactly, and refuses bad settings by name."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenizer import DapsConfig, DapsModel
from training.arguments import TrainArguments
from training.methods import decoder_parameters, decoder_polish_step
from training.trainer import resolve_defaults, train

try:
    from .run_folders import checkpoint_weights, copy_as_killed_after
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from run_folders import checkpoint_weights, copy_as_killed_after


def polish_args(tmp_path, name="run", **overrides) -> TrainArguments:
    values = dict(dataset="digits", output_dir=str(tmp_path / name), max_steps=20, batch_size=32, num_samples=4,
                  eval_every=0, save_every=5, keep_checkpoints=10, progress=False, num_threads=1, log_every=1,
                  polish_fraction=0.5, seed=3, code_embedding="learned", code_head="full")  # a trained code table
    values.update(overrides)
    return TrainArguments(**values)


def read_log(folder):
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def polished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("polish")
    args = polish_args(tmp_path)
    metrics = train(args)
    return args, metrics


def test_the_polish_moves_only_the_decoder_from_its_start(polished_run):
    args, metrics = polished_run
    folder = Path(args.output_dir)
    assert metrics["polish_from_step"] == 10
    rows = [row for row in read_log(folder) if "loss" in row]
    assert [row["step"] for row in rows if row.get("polish")] == list(range(11, 21))
    assert all("ess" not in row for row in rows if row.get("polish"))
    # Decoder steps run at the polish learning rate, a tenth of the run's by default.
    assert all(row["lr"] == pytest.approx(1e-4) for row in rows if row.get("polish"))

    before = checkpoint_weights(folder, 10)       # written at the end of step 10, before the first polish step
    after = load_file(str(folder / "model.safetensors"))
    model = DapsModel.from_pretrained(folder)
    decoder_names = {name for name, p in model.named_parameters()
                     if any(p is q for q in decoder_parameters(model))}
    assert decoder_names and "code_embedding.weight" in decoder_names
    for name, value in after.items():
        if name in decoder_names:
            assert not torch.equal(value, before[name]), f"{name} was not trained by the polish"
        else:
            torch.testing.assert_close(value, before[name], atol=0, rtol=0, msg=f"{name} moved during the polish")


def test_a_run_resumed_inside_the_polish_matches_the_uninterrupted_one(polished_run, tmp_path):
    args, _ = polished_run
    straight = Path(args.output_dir)
    # As if the run had been killed after step 15's checkpoint: later checkpoints and the finished files are gone.
    resumed = copy_as_killed_after(straight, tmp_path / "resumed", 15)
    lines = (resumed / "log.jsonl").read_text().splitlines()
    (resumed / "log.jsonl").write_text("\n".join(lines[:15]) + "\n")
    metrics = train(polish_args(tmp_path, name="resumed", resume=True))
    assert metrics["polish_from_step"] == 10
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_polish_stops_the_run_after_polish_max_steps(tmp_path):
    # Polish from step 10 of 20, capped at 7 steps: the run ends at step 17, its budget unspent.
    args = polish_args(tmp_path, polish_max_steps=7)
    metrics = train(args)
    assert (metrics["polish_from_step"], metrics["polish_steps"], metrics["steps"]) == (10, 7, 17)
    rows = [row for row in read_log(args.output_dir) if "loss" in row]
    assert [row["step"] for row in rows if row.get("polish")] == list(range(11, 18))
    assert rows[-1]["step"] == 17

    # Killed after step 15's checkpoint, inside the polish: the resumed run makes the same two steps and stops.
    resumed = copy_as_killed_after(Path(args.output_dir), tmp_path / "resumed", 15)
    lines = (resumed / "log.jsonl").read_text().splitlines()
    (resumed / "log.jsonl").write_text("\n".join(lines[:15]) + "\n")
    again = train(polish_args(tmp_path, name="resumed", polish_max_steps=7, resume=True))
    assert (again["polish_from_step"], again["polish_steps"], again["steps"]) == (10, 7, 17)
    a = load_file(str(Path(args.output_dir) / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["fsq", "vq"])
def test_quantiser_runs_polish_too_and_vq_keeps_its_codebook(tmp_path, method):
    args = polish_args(tmp_path, method=method, max_steps=8, save_every=4, polish_fraction=0.5)
    metrics = train(args)
    assert metrics["polish_from_step"] == 4
    before = checkpoint_weights(Path(args.output_dir), 4)
    after = load_file(str(Path(args.output_dir) / "model.safetensors"))
    for name, value in after.items():
        if name.startswith("decoder."):
            continue
        # The encoder and (VQ) the codebook its nearest-neighbour assignment reads stay as they were.
        torch.testing.assert_close(value, before[name], atol=0, rtol=0, msg=name)
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("decoder."))


def test_polish_step_gives_gradient_to_the_decoder_only_unless_asked_to_touch_all():
    torch.manual_seed(0)
    model = DapsModel(DapsConfig.from_preset("tiny"))
    images = torch.rand(3, model.config.num_channels, model.config.image_size, model.config.image_size) * 2 - 1
    codes = model.encode(images).codes
    polished = {id(p) for p in decoder_parameters(model)}
    out = decoder_polish_step(model, codes, images)
    out["loss"].backward()
    assert torch.isclose(out["loss"], out["decoder_loss"])
    for p in model.parameters():
        assert (p.grad is not None) == (id(p) in polished)
    model.zero_grad(set_to_none=True)
    decoder_polish_step(model, codes, images, touch_all=True)["loss"].backward()
    for p in model.parameters():
        assert p.grad is not None
        if id(p) not in polished:
            assert torch.count_nonzero(p.grad) == 0


def test_a_fixed_lattice_code_table_is_left_out_of_the_polish_and_of_training():
    config = DapsConfig.from_preset("tiny", code_embedding_type="lattice", fsq_levels=[4, 4, 4, 4], codebook_size=256)
    model = DapsModel(config)
    assert not model.code_embedding.weight.requires_grad
    assert all(p is not model.code_embedding.weight for p in decoder_parameters(model))
    learned = DapsModel(DapsConfig.from_preset("tiny"))
    assert any(p is learned.code_embedding.weight for p in decoder_parameters(learned))


@pytest.mark.parametrize("fraction", [1.0, -0.1, float("nan")])
def test_polish_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ValueError, match="--polish_fraction"):
        resolve_defaults(TrainArguments(polish_fraction=fraction))


def test_polish_learning_rate_defaults_to_a_tenth_and_must_be_positive():
    # The polish is on by default, for every method: the last 2 % of a run.
    assert TrainArguments().polish_fraction == pytest.approx(0.02)
    assert resolve_defaults(TrainArguments(learning_rate=2e-3)).polish_learning_rate == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="--polish_learning_rate"):
        resolve_defaults(TrainArguments(polish_learning_rate=0.0))


def test_polish_max_steps_defaults_to_a_thousand_and_must_be_a_non_negative_integer():
    assert TrainArguments().polish_max_steps == 1000
    assert resolve_defaults(TrainArguments(polish_max_steps=0)).polish_max_steps == 0   # no cap
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="--polish_max_steps"):
            resolve_defaults(TrainArguments(polish_max_steps=bad))
