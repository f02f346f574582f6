"""FID of trained tokenizers' greedy reconstructions on the first N test images, for run folders already written.

    python benchmarks/fid_of_runs.py benchmarks/runs/cifar-amx-600s/*/seed0 --images 200

The same measurement as `benchmarks/quality.py --fid-images N` (training.evaluation.evaluate with compute_fid,
greedy codes, the run's own test split), for runs whose table was made without the `fid` extra installed
(`pip install -e ".[fid]"`). One thread.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import DapsModel  # noqa: E402
from training.data import load_image_splits  # noqa: E402
from training.evaluation import evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"| run | FID ({args.images} test images, greedy reconstructions) |\n|---|---|")
    for folder in map(Path, args.folders):
        model = DapsModel.from_pretrained(folder).eval()
        config = model.config
        if config.likelihood != "gaussian":
            raise SystemExit(f"{folder}: FID is measured on natural images (gaussian likelihood) only.")
        run_args = folder / "train_args.json"
        dataset = json.loads(run_args.read_text())["dataset"] if run_args.exists() else "photo-crops"
        images = load_image_splits(dataset, image_size=config.image_size,
                                   num_channels=config.num_channels).test[:args.images]
        fid = evaluate(model, images, compute_fid=True)["fid"]
        if fid is None:
            raise SystemExit("FID is unavailable: install the fid extra (pip install -e \".[fid]\").")
        print(f"| {folder} | {fid:.1f} |", flush=True)


if __name__ == "__main__":
    main()
