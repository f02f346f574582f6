"""Fine-tune a saved tokenizer on your own images (an image folder), from Python.

    python examples/finetune_custom.py --tokenizer outputs/daps-mnist-5k --images my_sketches/ --output-dir outputs/sketches

The same as `daps train --init-from outputs/daps-mnist-5k --dataset my_sketches/ --output-dir outputs/sketches`.
Images of any size and mode are converted to the tokenizer's size and channels. The folder is split into
train/validation/test (seeded 90/5/5) unless it already has train/ validation/ test/ subfolders (the
`imagefolder` convention); subfolder names below those become labels.
"""

from __future__ import annotations

import argparse
import json

from training.arguments import TrainArguments
from training.trainer import train


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="A saved tokenizer folder to start from.")
    parser.add_argument("--images", required=True, help="A folder of images (imagefolder layout).")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="Lower than from scratch: keep what it knows.")
    parser.add_argument("--method", default=None, help="Default: the method the tokenizer was trained with.")
    args = parser.parse_args(argv)

    method = args.method
    if method is None:
        try:
            method = json.load(open(f"{args.tokenizer}/metrics.json"))["method"]
        except (OSError, KeyError):
            method = "daps"
    metrics = train(TrainArguments(
        dataset=args.images, init_from=args.tokenizer, output_dir=args.output_dir, method=method,
        max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_steps=0, eval_every=max(args.max_steps // 4, 1), save_every=max(args.max_steps // 2, 1),
    ))
    print(json.dumps({k: metrics[k] for k in ("psnr", "ssim", "code_usage", "steps")}))
    return metrics


if __name__ == "__main__":
    main()
