"""`--load_best_model_at_end`: a run returns to the weights of its best periodic evaluation (before the decoder polish
when there is one), across a resume too, and refuses to run without periodic evaluations.

The validation PSNR of the periodic evaluations is scripted so that the best one is known in advance and is not the
last: a short run on real data improves almost every time, which would leave nothing to return to."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.evaluation
from tokenizer import DapsModel
from training.arguments import TrainArguments
from training.methods import decoder_parameters
from training.trainer import resolve_defaults, train

try:
    from .run_folders import checkpoint_weights, copy_as_killed_after
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from run_folders import checkpoint_weights, copy_as_killed_after

EVAL_IMAGES = 16


def best_args(tmp_path, name="run", **overrides) -> TrainArguments:
    values = dict(dataset="digits", method="fsq", output_dir=str(tmp_path / name), max_steps=12, batch_size=32,
                  eval_every=2, eval_images=EVAL_IMAGES, save_every=2, keep_checkpoints=10, progress=False,
                  num_threads=1, log_every=1, polish_fraction=0.5, seed=5, load_best_model_at_end=True)
    values.update(overrides)
    return TrainArguments(**values)


@pytest.fixture
def scripted_psnr(monkeypatch):
    """Replace the PSNR of periodic evaluations (EVAL_IMAGES images) with the given values, in call order; the final
    evaluation (every validation image) keeps its real figures."""
    real = training.evaluation.evaluate

    def script(values):
        remaining = list(values)

        def evaluate(model, images, **kwargs):
            metrics = real(model, images, **kwargs)
            if len(images) == EVAL_IMAGES:
                metrics["psnr"] = remaining.pop(0)
            return metrics

        monkeypatch.setattr(training.evaluation, "evaluate", evaluate)
        return remaining

    return script


def eval_rows(folder) -> list[dict]:
    rows = [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]
    return [row for row in rows if "eval/psnr" in row]


def decoder_names(folder) -> set[str]:
    model = DapsModel.from_pretrained(folder)
    return {name for name, p in model.named_parameters() if any(p is q for q in decoder_parameters(model))}


def test_the_polish_starts_from_the_best_evaluation(tmp_path, scripted_psnr):
    # Evaluations at steps 2, 4 (the best) and 6, where the polish starts (50 % of 12 steps), then at 8 and 10 inside
    # the polish, which are not candidates however high they read.
    remaining = scripted_psnr([10.0, 30.0, 20.0, 40.0, 50.0])
    args = best_args(tmp_path)
    metrics = train(args)
    assert not remaining
    folder = Path(args.output_dir)
    assert metrics["polish_from_step"] == 6
    assert metrics["best_model_step"] == 4 and metrics["best_model_eval_psnr"] == 30.0
    assert [row["step"] for row in eval_rows(folder) if row.get("best_so_far")] == [2, 4]

    chosen, final = checkpoint_weights(folder, 4), load_file(str(folder / "model.safetensors"))
    decoder = decoder_names(folder)
    assert decoder
    for name, value in final.items():
        if name in decoder:
            continue
        # The encoder is the one of step 4, exactly: returned to, then frozen by the polish.
        torch.testing.assert_close(value, chosen[name], atol=0, rtol=0, msg=name)
    assert any(not torch.equal(final[n], chosen[n]) for n in decoder), "the polish did not train the chosen decoder"
    assert any(not torch.equal(checkpoint_weights(folder, 6)[n], chosen[n]) for n in final if n not in decoder), \
        "training did not move the encoder after step 4: the test would pass without the return"


def test_without_a_polish_the_run_ends_on_the_best_weights(tmp_path, scripted_psnr):
    # Steps 2, 4, 6, 8, 10, and 12 (the run's end, evaluated as a candidate): step 6 is the best.
    remaining = scripted_psnr([10.0, 11.0, 25.0, 20.0, 15.0, 24.0])
    args = best_args(tmp_path, polish_fraction=0.0)
    metrics = train(args)
    assert not remaining
    assert metrics["best_model_step"] == 6
    folder = Path(args.output_dir)
    chosen, final = checkpoint_weights(folder, 6), load_file(str(folder / "model.safetensors"))
    for name, value in final.items():
        torch.testing.assert_close(value, chosen[name], atol=0, rtol=0, msg=name)


def test_a_resumed_run_remembers_the_best_evaluation(tmp_path, scripted_psnr):
    # Steps 2, 4 (the best), 6, 8, 10 and the end, 12.
    scripted_psnr([10.0, 30.0, 20.0, 20.0, 11.0, 12.0])
    train(best_args(tmp_path, polish_fraction=0.0))
    straight = tmp_path / "run"
    # As if killed after step 4's checkpoint, which holds the best evaluation (step 4) as well.
    resumed = copy_as_killed_after(straight, tmp_path / "resumed", 4)
    # The resumed run evaluates steps 6, 8, 10 and 12 again; none beats step 4's 30 dB, which it must remember.
    scripted_psnr([20.0, 20.0, 11.0, 12.0])
    metrics = train(best_args(tmp_path, name="resumed", polish_fraction=0.0, resume=True))
    assert metrics["best_model_step"] == 4 and metrics["best_model_eval_psnr"] == 30.0
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    chosen = checkpoint_weights(resumed, 4)
    for name in a:
        torch.testing.assert_close(b[name], chosen[name], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)


def test_choosing_needs_periodic_evaluations():
    with pytest.raises(ValueError, match="--eval_every"):
        resolve_defaults(TrainArguments(load_best_model_at_end=True, eval_every=0))
    assert resolve_defaults(TrainArguments()).load_best_model_at_end is False
