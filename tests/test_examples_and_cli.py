"""Every example script and `daps` subcommand runs at a tiny size, so none can rot."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer import DapsImageProcessor, DapsModel
from training.arguments import TrainArguments
from training.trainer import train

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_example(name: str, *args: str):
    """Run examples/<name>.py's main() in-process with these arguments; returns its result."""
    module = runpy.run_path(str(REPO / "examples" / f"{name}.py"), run_name="example")
    return module["main"](list(args))


@pytest.fixture(scope="module")
def digits_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "daps-digits"
    train(TrainArguments(dataset="digits", output_dir=str(folder), max_steps=25, batch_size=64, eval_every=0,
                         save_every=0, progress=False, num_threads=1))
    return folder


def write_image_folder(root: Path, n=40, size=12):
    rng = np.random.default_rng(0)
    for label in ("circles", "squares"):
        (root / label).mkdir(parents=True)
        for i in range(n // 2):
            array = np.zeros((size, size), dtype=np.uint8)
            c = rng.integers(3, size - 3)
            if label == "circles":
                yy, xx = np.mgrid[:size, :size]
                array[(yy - c) ** 2 + (xx - c) ** 2 < 9] = 255
            else:
                array[c - 2:c + 2, c - 2:c + 2] = 255
            mode = "RGB" if i % 3 == 0 else "L"
            Image.fromarray(array).convert(mode).save(root / label / f"{i}.png")
    return root


def test_prior_trains_generates_and_decodes(digits_tokenizer, tmp_path):
    prior_dir = tmp_path / "prior"
    summary = run_example("train_prior", "--tokenizer", str(digits_tokenizer), "--dataset", "digits",
                          "--output-dir", str(prior_dir), "--max-steps", "30", "--layers", "1", "--width", "32")
    assert summary["num_classes"] == 10 and summary["final_loss"] < summary["first_loss"]
    output = tmp_path / "generated.png"
    result = run_example("generate", "--tokenizer", str(digits_tokenizer), "--prior", str(prior_dir),
                         "--labels", "0", "1", "2", "3", "--output", str(output))
    codes = torch.tensor(result["codes"])
    model = DapsModel.from_pretrained(digits_tokenizer)
    assert codes.shape == (4, model.config.num_tokens)
    assert codes.min() >= 0 and codes.max() < model.config.codebook_size
    images = model.decode(codes).pixel_values
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert Image.open(output).size[0] > 0


def test_finetune_example_on_an_image_folder(digits_tokenizer, tmp_path):
    images = write_image_folder(tmp_path / "shapes")
    metrics = run_example("finetune_custom", "--tokenizer", str(digits_tokenizer), "--images", str(images),
                          "--output-dir", str(tmp_path / "tuned"), "--max-steps", "6", "--batch-size", "16")
    tuned = DapsModel.from_pretrained(tmp_path / "tuned")
    start = DapsModel.from_pretrained(digits_tokenizer)
    assert tuned.config.image_size == start.config.image_size == 8  # the folder's 12×12 images were resized
    assert metrics["steps"] == 6
    changed = [not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), start.state_dict().values())]
    assert any(changed)


def test_tokenize_example_and_cli(digits_tokenizer, tmp_path):
    tokenized = run_example("tokenize_dataset", "--tokenizer", str(digits_tokenizer), "--builtin", "digits",
                            "--output", str(tmp_path / "tokens"))
    assert "codes" in tokenized.column_names and "label" in tokenized.column_names
    images = write_image_folder(tmp_path / "shapes", n=6)
    result = subprocess.run([sys.executable, "-m", "training", "tokenize", str(digits_tokenizer), "--dataset",
                             str(images), "--output", str(tmp_path / "cli_tokens")], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = datasets.load_from_disk(str(tmp_path / "cli_tokens"))
    assert len(saved) == 6 and len(saved[0]["codes"]) == 8


def test_eval_and_reconstruct_commands(digits_tokenizer, tmp_path):
    result = subprocess.run([sys.executable, "-m", "training", "eval", str(digits_tokenizer), "--split", "test"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout[result.stdout.index("{"):])
    assert metrics["split"] == "test" and metrics["num_images"] == 179 and metrics["psnr"] > 5
    image = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(image)
    result = subprocess.run([sys.executable, "-m", "training", "reconstruct", str(digits_tokenizer), str(image),
                             "--output", str(tmp_path / "grid.png")], env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "grid.png").exists()
    result = subprocess.run([sys.executable, "-m", "training", "reconstruct", str(digits_tokenizer), str(image),
                             "--output", str(tmp_path / "searched.png"), "--search", "local", "--num-candidates", "3",
                             "--search-objective", "squared_error"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    model = DapsModel.from_pretrained(digits_tokenizer)
    processor = DapsImageProcessor.from_pretrained(digits_tokenizer)
    pixel_values = processor([Image.open(image)], return_tensors="pt").pixel_values
    expected = model.encode(pixel_values, search="local", num_candidates=3, num_sweeps=1,
                            search_objective="squared_error").codes.tolist()
    assert json.loads(result.stdout[result.stdout.index("{"):])["codes"] == expected


def test_cli_reports_clear_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training", "eval", str(tmp_path)], env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "not a saved tokenizer folder" in result.stderr
    result = subprocess.run([sys.executable, "-m", "training", "frobnicate"], env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "unknown command" in result.stderr
    result = subprocess.run([sys.executable, "-m", "training", "train", "--method", "nope", "--output_dir",
                             str(tmp_path / "x")], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--method must be one of" in result.stderr
    assert "Traceback" not in result.stderr, "a bad setting should be a one-line error, not a traceback"
    result = subprocess.run([sys.executable, "-m", "training", "train", "--load_best_model_at_end", "--eval_every",
                             "0", "--output_dir", str(tmp_path / "y")], env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "--eval_every > 0" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "y").exists()
