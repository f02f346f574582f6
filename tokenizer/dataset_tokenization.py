"""`tokenize_dataset`: add a column of integer codes to a 🤗 `datasets.Dataset` with `Dataset.map`.

Images are decoded here (not by `datasets`) so that an unreadable image raises an error naming its row, and so that
grey, palette or RGBA images are converted to the model's channel count instead of failing deep inside torch.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import torch


def code_dtype(codebook_size: int) -> str:
    """The smallest Arrow integer type that holds every code 0 … V−1."""
    for name, limit in (("uint8", 2**8), ("uint16", 2**16), ("uint32", 2**32)):
        if codebook_size <= limit:
            return name
    return "int64"


def _fingerprint(model, processor, image_column: str, codes_column: str, previous: str) -> str:
    """A deterministic cache key: the dataset's fingerprint, the weights, the processor and the column names.
    Equal inputs map to the same cache file, so an interrupted or repeated run reuses what is done."""
    digest = hashlib.sha256(previous.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(processor.to_json_string().encode())
    digest.update(f"{image_column}|{codes_column}|v1".encode())
    return digest.hexdigest()[:32]


_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"))


def _sniff_format(data: bytes | None) -> tuple[str, ...] | None:
    """The image format named by the file's first bytes, or None (then PIL tries every plugin)."""
    if data:
        for signature, name in _SIGNATURES:
            if data.startswith(signature):
                return (name,)
    return None


def _decode_image(value, row: int):
    """A stored image (PIL, path/bytes dict, array) → PIL image; a clear error naming the row otherwise."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
            data = value.get("bytes")
            source = io.BytesIO(data) if data is not None else value["path"]
            # Name the format when the bytes say it: PIL otherwise tries its plugins one by one, which cost more
            # than decoding a small image (a third of tokenize_dataset's time on 28×28 PNGs).
            image = Image.open(source, formats=_sniff_format(data))
            image.load()
        elif isinstance(value, np.ndarray):
            return value
        elif value is None:
            raise ValueError("the image is missing (None)")
        else:
            raise TypeError(f"unsupported image value of type {type(value).__name__}")
    except Exception as error:
        raise ValueError(f"Row {row}: cannot read the image: {error}") from error
    if image.mode not in ("L", "RGB"):
        # Palette, RGBA, LA, CMYK, 16-bit grey … → RGB (or L for single-channel kinds); the processor then matches
        # the model's channel count. Alpha is composited onto white, not dropped to black.
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
        elif image.mode in ("I;16", "I", "F"):
            array = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode == "I;16" else max(float(array.max()), 1.0)
            image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
        else:
            image = image.convert("RGB")
    return image


class _Encoder:
    """The function `Dataset.map` calls; picklable, so it runs in `num_proc` worker processes too."""

    def __init__(self, model, processor, image_column, codes_column, dtype, num_proc):
        self.model = model
        self.processor = processor
        self.image_column = image_column
        self.codes_column = codes_column
        self.dtype = dtype
        self.num_proc = num_proc
        self._device = None

    def _prepare(self, rank):
        if self._device is not None:
            return
        if torch.cuda.is_available() and rank is not None:
            self._device = torch.device(f"cuda:{rank % torch.cuda.device_count()}")
        elif torch.cuda.is_available():
            self._device = torch.device("cuda")
        else:
            self._device = torch.device("cpu")
            if self.num_proc and self.num_proc > 1:
                # Share the cores between workers instead of every worker using all of them.
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.num_proc))
        self.model = self.model.to(self._device).eval()

    def __call__(self, batch, indices, rank=None):
        self._prepare(rank)
        images = [_decode_image(value, row) for value, row in zip(batch[self.image_column], indices)]
        try:
            pixel_values = self.processor(images, return_tensors="pt").pixel_values
        except (ValueError, TypeError):
            # Find the offending row so the message names it.
            for image, row in zip(images, indices):
                try:
                    self.processor([image], return_tensors="pt")
                except (ValueError, TypeError) as row_error:
                    raise ValueError(f"Row {row}: {row_error}") from row_error
            raise
        with torch.inference_mode():
            codes = self.model.encode(pixel_values.to(self._device)).codes
        return {self.codes_column: codes.cpu().numpy().astype(self.dtype)}


def tokenize_dataset(dataset, model, processor, image_column: str = "image", batch_size: int = 64,
                     num_proc: int | None = None, codes_column: str = "codes", load_from_cache_file: bool = True,
                     desc: str = "Tokenizing"):
    """Add a `codes` column of greedy codes to `dataset` (every other column kept).

    Args:
        dataset (`datasets.Dataset`): rows with an image column (PIL images, image files or HWC arrays).
        model ([`DapsModel`]): the tokenizer; greedy (deterministic) codes are stored.
        processor ([`DapsImageProcessor`]): the model's processor.
        image_column: the column holding images.
        batch_size: images per `model.encode` call.
        num_proc: worker processes (`Dataset.map`'s); with GPUs, worker `rank` uses GPU `rank % num_gpus`.
        codes_column: name of the new column.

    Returns:
        The dataset with `codes_column`: a fixed-length sequence of L integers per row, of the smallest unsigned
        type holding 0 … V−1 (uint8 for V ≤ 256, uint16 for V ≤ 65,536). Results are cached by `datasets` under a
        key of the dataset, the weights and the processor, so re-running (or resuming after an interruption) reuses
        finished work.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"tokenize_dataset expects a datasets.Dataset, got {type(dataset).__name__} "
                        "(for a DatasetDict, tokenize each split).")
    if image_column not in dataset.column_names:
        raise ValueError(f"No column {image_column!r} in the dataset; its columns are {dataset.column_names}.")
    if codes_column in dataset.column_names:
        raise ValueError(f"The dataset already has a column {codes_column!r}; pass another codes_column.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc must be None or >= 1, got {num_proc}.")
    config = model.config
    dtype = code_dtype(config.codebook_size)
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    features = dataset.features.copy()
    features[codes_column] = datasets.List(datasets.Value(dtype), length=config.num_tokens)
    encoder = _Encoder(model.cpu() if num_proc and num_proc > 1 else model, processor, image_column,
                       codes_column, dtype, num_proc)
    fingerprint = _fingerprint(model, processor, image_column, codes_column, dataset._fingerprint)
    tokenized = dataset.map(
        encoder, batched=True, batch_size=batch_size, num_proc=num_proc, with_indices=True,
        with_rank=bool(num_proc and num_proc > 1 and torch.cuda.is_available()),
        features=features, new_fingerprint=fingerprint, load_from_cache_file=load_from_cache_file, desc=desc,
    )
    if isinstance(feature, datasets.Image) and feature.decode:
        tokenized = tokenized.cast_column(image_column, feature)
    return tokenized
