"""Tokenize an image dataset with a saved tokenizer and store the integer codes (`datasets.map` under the hood).

    python examples/tokenize_dataset.py --tokenizer outputs/daps-mnist-5k --images my_images/ --output tokens/
    python examples/tokenize_dataset.py --tokenizer outputs/daps-mnist-5k --builtin mnist-5k --output tokens/

The result keeps every column and adds `codes`: L integers per image, stored as uint8 when V <= 256.
Load it back with `datasets.load_from_disk(output)`.
"""

from __future__ import annotations

import argparse
import json

import datasets

from tokenizer import DapsImageProcessor, DapsModel, tokenize_dataset


def builtin_as_dataset(name: str, image_size: int, num_channels: int) -> datasets.Dataset:
    """A built-in dataset's training split as a datasets.Dataset of PIL images and labels."""
    import numpy as np
    from PIL import Image

    from training.data import load_image_splits

    splits = load_image_splits(name, image_size=image_size, num_channels=num_channels)
    arrays = (splits.train.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    columns = {"image": [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]}
    if splits.train_labels is not None:
        columns["label"] = splits.train_labels.tolist()
    return datasets.Dataset.from_dict(columns)


def main(argv=None) -> datasets.Dataset:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="An image folder.")
    source.add_argument("--builtin", help="A built-in dataset: mnist-5k, digits, photo-crops, faces.")
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-proc", type=int, default=None)
    args = parser.parse_args(argv)

    model = DapsModel.from_pretrained(args.tokenizer).eval()
    processor = DapsImageProcessor.from_pretrained(args.tokenizer)
    if args.images:
        dataset = datasets.load_dataset("imagefolder", data_dir=args.images, split="train")
    else:
        dataset = builtin_as_dataset(args.builtin, model.config.image_size, model.config.num_channels)
    tokenized = tokenize_dataset(dataset, model, processor, batch_size=args.batch_size, num_proc=args.num_proc)
    tokenized.save_to_disk(args.output)
    print(json.dumps({"output": args.output, "rows": len(tokenized), "columns": tokenized.column_names}))
    return tokenized


if __name__ == "__main__":
    main()
