"""`tokenize_dataset` throughput against raw `model.encode` on the same images, in one run.

    python benchmarks/tokenize_throughput.py [--tokenizer DIR] [--threads 1] [--repeats 3]

Three timings over the 4,000 mnist-5k training images (stored on disk as PNGs in a datasets.Dataset), each
warmed up once, then interleaved and repeated (median):
  raw encode          model.encode on an already preprocessed tensor: the model's own cost, the issue's baseline;
  preprocess+encode   DapsImageProcessor image by image on PIL images already decoded in memory, then model.encode
                      (a plain loop; it does no PNG decoding, which tokenize_dataset must do);
  tokenize_dataset    the datasets.map path: PNG decoding, preprocessing, encoding, Arrow writing of the cache file.
The map overhead is tokenize_dataset's time over raw encode (and over preprocess+encode), minus one: from the
medians, and the median of the per-repeat ratios (each repeat runs the paths back to back, so slow phases of a
shared machine hit them alike). The codes tokenize_dataset stores are checked against raw encode's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import DapsConfig, DapsImageProcessor, DapsModel, tokenize_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="A saved tokenizer (default: an untrained mnist preset).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import datasets

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from tokenize_dataset import builtin_as_dataset

    if args.tokenizer:
        model = DapsModel.from_pretrained(args.tokenizer).eval()
        processor = DapsImageProcessor.from_pretrained(args.tokenizer)
    else:
        torch.manual_seed(0)
        model = DapsModel(DapsConfig.from_preset("mnist")).eval()
        processor = DapsImageProcessor.from_model_config(model.config)
    config = model.config
    with tempfile.TemporaryDirectory() as cache:
        datasets.config.HF_DATASETS_CACHE = cache
        dataset = builtin_as_dataset("mnist-5k", config.image_size, config.num_channels)
        folder = Path(cache) / "mnist"
        dataset.save_to_disk(str(folder))
        dataset = datasets.load_from_disk(str(folder))  # on disk, as a user's dataset would be
        images = [row["image"] for row in dataset]
        pixel_values = processor(images, return_tensors="pt").pixel_values
        n = len(images)

        def raw():
            with torch.inference_mode():
                return torch.cat([model.encode(pixel_values[start:start + args.batch_size]).codes
                                  for start in range(0, n, args.batch_size)])

        def preprocess_and_encode():
            with torch.inference_mode():
                for start in range(0, n, args.batch_size):
                    batch = processor(images[start:start + args.batch_size], return_tensors="pt").pixel_values
                    model.encode(batch)

        def mapped():
            return tokenize_dataset(dataset, model, processor, batch_size=args.batch_size,
                                    load_from_cache_file=False)

        timings = {"raw encode": [], "preprocess+encode": [], "tokenize_dataset": []}
        functions = {"raw encode": raw, "preprocess+encode": preprocess_and_encode, "tokenize_dataset": mapped}
        # Warm-up (imports, first Arrow write, allocator), and a check that the paths agree.
        stored = torch.from_numpy(np.stack(mapped().with_format("numpy")["codes"])).long()
        if not torch.equal(stored, raw()):
            raise SystemExit("tokenize_dataset's codes differ from model.encode's")
        preprocess_and_encode()
        for _ in range(args.repeats):
            for name, function in functions.items():
                started = time.perf_counter()
                function()
                timings[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    lines = [
        f"`python benchmarks/tokenize_throughput.py {' '.join(sys.argv[1:])}` — {date.today()}, torch "
        f"{torch.__version__}, {args.threads} thread(s), {n} mnist-5k images, batch {args.batch_size}, median of "
        f"{args.repeats}, {'tokenizer ' + args.tokenizer if args.tokenizer else 'untrained mnist preset'}", "",
        "| path | seconds | images/s |", "|---|---|---|",
    ]
    for name, seconds in medians.items():
        lines.append(f"| {name} | {seconds:.2f} | {n / seconds:,.0f} |")
    over_raw = medians["tokenize_dataset"] / medians["raw encode"] - 1
    over_encode = medians["tokenize_dataset"] / medians["preprocess+encode"] - 1
    paired = statistics.median(m / r for m, r in zip(timings["tokenize_dataset"], timings["raw encode"])) - 1
    lines += ["", f"map overhead over raw encode: {over_raw:+.1%} (median of the per-repeat ratios: {paired:+.1%}); "
              f"over preprocess+encode: {over_encode:+.1%}"]
    text = "\n".join(lines) + "\n"
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "tokenize_throughput.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
