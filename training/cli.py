"""The `daps` command (also `python -m training`, and `accelerate launch -m training train ...`).

    daps train  [--dataset NAME|PATH] [--preset NAME] [--method daps|daps-na|vq|fsq|gumbel|gumbel-na] ...
    daps eval DIR [--dataset ...] [--split validation|test]
    daps reconstruct DIR IMAGE... [--output grid.png]
    daps tokenize DIR --dataset ... --output PATH
    daps push DIR --repo-id ORG/NAME [--private] [--revision BRANCH]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

COMMANDS = ("train", "eval", "reconstruct", "tokenize", "push")


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "datasets", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from .arguments import TrainArguments
    from .trainer import resolve_defaults, train

    parser = HfArgumentParser(TrainArguments, prog="daps train",
                              description="Train a DAPS tokenizer (or a baseline) and write a loadable folder.")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        resolve_defaults(args)   # a bad setting is a one-line error here, before anything is loaded or written
    except ValueError as error:
        print(f"daps train: error: {error}", file=sys.stderr)
        return 2
    metrics = train(args)
    print(json.dumps({k: metrics[k] for k in ("psnr", "ssim", "code_usage", "neg_elbo_bits", "steps") if k in metrics}))
    return 0


def _load(folder: str):
    import tokenizer  # noqa: F401  (registers the Auto classes)
    from tokenizer import DapsImageProcessor, DapsModel

    path = Path(folder)
    if not (path / "config.json").exists():
        raise SystemExit(f"error: {folder} is not a saved tokenizer folder (no config.json).")
    model = DapsModel.from_pretrained(folder).eval()
    if (path / "preprocessor_config.json").exists():
        processor = DapsImageProcessor.from_pretrained(folder)
    else:
        processor = DapsImageProcessor.from_model_config(model.config)
    return model, processor


def cmd_eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="daps eval", description="Held-out metrics of a saved tokenizer, as JSON.")
    parser.add_argument("folder")
    parser.add_argument("--dataset", default=None, help="Default: the dataset it was trained on (metrics.json).")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fid", action="store_true", help="Also compute FID (needs the fid extra).")
    args = parser.parse_args(argv)

    from .data import binarize_fixed, load_image_splits
    from .evaluation import evaluate

    model, _ = _load(args.folder)
    dataset = args.dataset
    if dataset is None:
        metrics_file = Path(args.folder) / "metrics.json"
        dataset = json.loads(metrics_file.read_text()).get("dataset") if metrics_file.exists() else None
        if dataset is None:
            raise SystemExit("error: pass --dataset (the folder records no training dataset).")
    splits = load_image_splits(dataset, image_size=model.config.image_size,
                               num_channels=model.config.num_channels, seed=args.seed)
    images = getattr(splits, args.split)
    targets = binarize_fixed(images, seed=0) if model.config.likelihood == "bernoulli" else None
    metrics = evaluate(model, images, batch_size=args.batch_size, binarized_targets=targets,
                       generator=__import__("torch").Generator().manual_seed(1234), compute_fid=args.fid)
    metrics.update(dataset=dataset, split=args.split)
    print(json.dumps(metrics, indent=2))
    return 0


def _add_search_arguments(parser: argparse.ArgumentParser, choices: tuple[str, ...]) -> None:
    parser.add_argument("--search", choices=choices, default=None,
                        help="improve each image's greedy code by searching on log p(x | z) "
                             "(`DapsModel.encode(search=...)`); default: greedy codes")
    parser.add_argument("--num-candidates", type=int, default=4, help="codes tried per position (default 4)")
    parser.add_argument("--num-sweeps", type=int, default=1, help="passes over the positions (default 1)")
    parser.add_argument("--search-objective", choices=("likelihood", "squared_error"), default="likelihood",
                        help="what the search maximises: log p(x | z) (default) or minus the squared error (PSNR)")


def cmd_reconstruct(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="daps reconstruct",
                                     description="Encode and decode images; write an original/reconstruction grid PNG.")
    parser.add_argument("folder")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--output", default="reconstructions.png")
    _add_search_arguments(parser, choices=("local", "parallel"))
    args = parser.parse_args(argv)

    from PIL import Image

    from .plots import save_reconstruction_grid

    model, processor = _load(args.folder)
    pictures = []
    for path in args.images:
        try:
            pictures.append(Image.open(path))
        except Exception as error:
            raise SystemExit(f"error: cannot read image {path}: {error}")
    pixel_values = processor(pictures, return_tensors="pt").pixel_values
    search = {} if args.search is None else dict(search=args.search, num_candidates=args.num_candidates,
                                                 num_sweeps=args.num_sweeps, search_objective=args.search_objective)
    codes = model.encode(pixel_values, **search).codes
    reconstruction = model.decode(codes).pixel_values
    originals = processor.postprocess(pixel_values, output_type="pt")
    reconstructions = processor.postprocess(reconstruction, output_type="pt")
    save_reconstruction_grid(originals, reconstructions, args.output)
    print(json.dumps({"output": args.output, "codes": codes.tolist()}))
    return 0


def cmd_tokenize(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="daps tokenize",
                                     description="Add a `codes` column to a dataset and save it.")
    parser.add_argument("folder")
    parser.add_argument("--dataset", required=True, help="An image folder, a saved dataset, or a Hub dataset name.")
    parser.add_argument("--output", required=True, help="Folder (save_to_disk) or a .parquet file.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-proc", type=int, default=None)
    _add_search_arguments(parser, choices=("local", "parallel"))
    args = parser.parse_args(argv)

    import datasets

    from tokenizer import tokenize_dataset

    model, processor = _load(args.folder)
    if Path(args.dataset).is_dir() and (Path(args.dataset) / "dataset_info.json").exists():
        dataset = datasets.load_from_disk(args.dataset)
    elif Path(args.dataset).is_dir():
        dataset = datasets.load_dataset("imagefolder", data_dir=args.dataset, split=args.split)
    else:
        dataset = datasets.load_dataset(args.dataset, split=args.split)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[args.split]
    tokenized = tokenize_dataset(dataset, model, processor, image_column=args.image_column,
                                 batch_size=args.batch_size, num_proc=args.num_proc, search=args.search,
                                 num_candidates=args.num_candidates, num_sweeps=args.num_sweeps,
                                 search_objective=args.search_objective)
    if args.output.endswith(".parquet"):
        tokenized.to_parquet(args.output)
    else:
        tokenized.save_to_disk(args.output)
    print(json.dumps({"output": args.output, "rows": len(tokenized)}))
    return 0


def cmd_push(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="daps push", description="Write the model card and upload to the Hub.")
    parser.add_argument("folder")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)

    from .hub import push_to_hub

    url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision, token=args.token)
    print(json.dumps({"url": str(url)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        # `daps` alone is `daps train`: the project's main job.
        if not argv or argv[0].startswith("-"):
            argv = ["train", *argv]
        else:
            print(f"error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}.", file=sys.stderr)
            return 2
    _setup_logging()
    command, rest = argv[0], argv[1:]
    return {"train": cmd_train, "eval": cmd_eval, "reconstruct": cmd_reconstruct,
            "tokenize": cmd_tokenize, "push": cmd_push}[command](rest)


if __name__ == "__main__":
    sys.exit(main())
