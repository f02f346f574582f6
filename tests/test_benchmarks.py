"""Smoke tests of the benchmark scripts: they run end to end and write the tables their reports are read from.

Figures are never checked (timings on a shared machine are noise); the structure of the report is: the machine's
limit, the inference and training tables, the step-time ratios and the FLOP counts that issue #6 asks for.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_speed_benchmark_writes_every_table(tmp_path):
    output = tmp_path / "speed.md"
    command = [sys.executable, "benchmarks/speed.py", "--quick", "--presets", "tiny", "--methods", "daps", "vq",
               "--num-samples", "4", "--dtype", "fp32", "bf16", "--default-train-steps", "0", "--gemm-size", "128",
               "--section-budget-s", "1", "--runs-dir", str(tmp_path / "runs"), "--output", str(output)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = output.read_text()
    # The command that produced the report is in it, so a recorded run can be repeated.
    assert "benchmarks/speed.py --quick --presets tiny" in report
    for heading in ("## Machine limit", "## Inference", "## Training steps", "## FLOPs per image"):
        assert heading in report, heading
    # The limit, one positive GFLOP/s figure per dtype.
    for dtype in ("fp32", "bf16"):
        row = re.search(rf"^\| {dtype} \| ([0-9.,]+) \|", report, flags=re.MULTILINE)
        assert row is not None and float(row.group(1).replace(",", "")) > 0, dtype
    # Inference rows for both dtypes, the DAPS / VQ step-time ratio and the fp32 / bf16 step-time ratio.
    assert re.search(r"^\| tiny \| fp32 \| [0-9,]+ \(", report, flags=re.MULTILINE)
    assert re.search(r"^\| tiny \| bf16 \| [0-9,]+ \(", report, flags=re.MULTILINE)
    assert re.search(r"^\| tiny \| daps K=4 / vq \| fp32 \| [0-9.]+ \|", report, flags=re.MULTILINE)
    assert re.search(r"^\| tiny \| daps K=4: fp32 time / bf16 time \|", report, flags=re.MULTILINE)
    # FLOPs are counted (a non-zero step count for each method).
    flops = re.search(r"^\| tiny \| ([0-9.]+) M \|.*\| ([0-9.]+) M \| ([0-9.]+) M \|", report, flags=re.MULTILINE)
    assert flops is not None and all(float(value) > 0 for value in flops.groups())


def train_tiny_daps_run(run: Path) -> Path:
    """A 3-step DAPS run on the built-in digits, in a child process: a run folder for the scripts that read one."""
    train = [sys.executable, "-m", "training", "train", "--dataset", "digits", "--max_steps", "3", "--batch_size", "16",
             "--num_samples", "4", "--eval_every", "0", "--save_every", "0", "--progress", "false", "--num_threads", "1",
             "--output_dir", str(run)]
    completed = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return run


def test_decoder_polish_benchmark_reports_each_learning_rate(tmp_path):
    run = train_tiny_daps_run(tmp_path / "run")
    output = tmp_path / "polish.md"
    command = [sys.executable, "benchmarks/decoder_polish.py", str(run), "--learning-rates", "1e-3", "1e-4",
               "--steps", "4", "--every", "2", "--output", str(output)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = output.read_text()
    assert "benchmarks/decoder_polish.py" in report and "| step 0 | step 2 | step 4 |" in report
    for lr in ("0.001", "0.0001"):
        # One PSNR per evaluated step, then the CPU seconds and the test PSNR.
        assert re.search(rf"^\| {lr} \|( [0-9.]+ \|){{5}}$", report, flags=re.MULTILINE), lr


def test_code_head_cost_benchmark_times_three_steps_and_checks_the_two_head_forms_agree(tmp_path):
    output = tmp_path / "code_head_cost.json"
    command = [sys.executable, "benchmarks/code_head_cost.py", "--rounds", "2", "--batch-size", "8", "--method",
               "daps-na", "--output", str(output)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    figures = json.loads(output.read_text())
    assert set(figures["median_step_seconds"]) == {"learned + full", "lattice + factorized, gather",
                                                  "lattice + factorized"}
    assert all(seconds > 0 for seconds in figures["median_step_seconds"].values())
    assert all(len(values) == 2 for values in figures["step_seconds"].values())
    # The gather (the reference) and the model's outer sum give the same log-probabilities.
    assert figures["max_log_prob_difference"] < 1e-4
    assert (figures["num_samples"], figures["update_samples"]) == (6, 2)


def test_step_phases_benchmark_times_each_phase_of_a_daps_step():
    command = [sys.executable, "benchmarks/step_phases.py", "--rounds", "2", "--batch-size", "8"]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    for phase in ("whole step", "draw K codes", "decode K codes \\(no grad\\)", "update on M = 2 codes"):
        row = re.search(rf"^\| {phase} \| ([0-9.]+) \| ([0-9]+)% \|$", completed.stdout, flags=re.MULTILINE)
        assert row is not None and float(row.group(1)) > 0, phase


def test_reward_noise_benchmark_compares_binarised_and_expected_targets(tmp_path):
    run = train_tiny_daps_run(tmp_path / "run")
    output = tmp_path / "noise.md"
    command = [sys.executable, "benchmarks/reward_noise.py", str(run), "--dataset", "digits", "--images", "32",
               "--num-samples", "4", "--output", str(output)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = output.read_text()
    assert "benchmarks/reward_noise.py" in report
    same = re.search(r"^\| heaviest sample the same under the two binarisations \| ([0-9.]+) \|$", report,
                     flags=re.MULTILINE)
    assert same is not None and 0 <= float(same.group(1)) <= 1
    noise = re.search(r"^\| binarisation noise in the centred rewards \(nats\) \| ([0-9.]+) / ([0-9.]+) \|$", report,
                      flags=re.MULTILINE)
    assert noise is not None and float(noise.group(1)) > 0   # the digits have grey levels: binarising moves rewards
