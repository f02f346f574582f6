"""`tokenize_dataset`: add a column of integer codes to a 🤗 `datasets.Dataset` with `Dataset.map`.

Images are decoded here (not by `datasets`) so that an unreadable image raises an error naming its row, and so that
grey, palette or RGBA images are converted to the model's channel count instead of failing deep inside torch.

A batch whose images are all plain 8-bit grey/RGB PNGs at the processor's size (MNIST- or CIFAR-like data) takes a
batch path: one PIL decode and one vectorised preprocessing for the whole batch, with the same pixels and the same
pixel values as the per-row path (decoding a small PNG row by row cost more than encoding it). Any other batch takes
the per-row path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib

import numpy as np
import torch


def code_dtype(codebook_size: int) -> str:
    """The smallest Arrow integer type that holds every code 0 … V−1."""
    for name, limit in (("uint8", 2**8), ("uint16", 2**16), ("uint32", 2**32)):
        if codebook_size <= limit:
            return name
    return "int64"


def _fingerprint(model, processor, image_column: str, codes_column: str, previous: str,
                 search: dict | None = None) -> str:
    """A deterministic cache key: the dataset's fingerprint, the weights, the processor, the column names and the
    search settings. Equal inputs map to the same cache file, so an interrupted or repeated run reuses what is done."""
    digest = hashlib.sha256(previous.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(processor.to_json_string().encode())
    digest.update(f"{image_column}|{codes_column}|v1".encode())
    if search:  # greedy runs keep the key they had before search existed
        digest.update(json.dumps(search, sort_keys=True).encode())
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


# ------------------------------------------------------------------ the batch path for small plain PNGs
#
# Decoding a 28×28 PNG with `Image.open` costs ~30 µs, nearly all of it Python bookkeeping (plugin set-up, chunk
# reading, the image object, the copy out to numpy) rather than inflating 300 bytes. When every image of a batch is a
# plain 8-bit grey or RGB PNG already at the processor's size, the batch is decoded with one PIL call instead: each
# file's IDAT stream is inflated with zlib, the filtered scanlines of all files are stacked into one tall image,
# separated by an all-zero row, and PIL's own PNG decoder ("zip": inflate + PNG unfiltering) decodes that tall image
# in one go. A PNG row's unfiltering depends only on the row above it (all zeros above the first row), so an
# all-zero separator row (filter 0) puts every image's first row in exactly the state it has at the top of its own
# file: the pixels are the same as `Image.open` gives, byte for byte. Anything else (other colour types or bit
# depths, interlacing, palettes, animation, a bad checksum, a stream of the wrong length, other sizes) returns None
# and the batch takes the per-row path, which decodes like `Image.open` and raises errors that name the row.

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: "L", 2: "RGB"}  # colour type (8-bit) → the PIL mode `Image.open` gives it, used as is
_PNG_ANIMATION_CHUNKS = (b"acTL", b"fcTL", b"fdAT")


def _png_headers(size: int) -> dict[bytes, int]:
    """The IHDR chunks (length, type, fields, CRC: 25 bytes) of the PNGs the batch path takes → colour type:
    size×size, 8 bits, grey or RGB, deflate, standard filtering, not interlaced. One lookup checks a header."""
    headers = {}
    for colour in _PNG_MODES:
        body = b"IHDR" + struct.pack(">IIBBBBB", size, size, 8, colour, 0, 0, 0)
        headers[struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))] = colour
    return headers


def _png_scanlines(data, size: int, headers: dict[bytes, int]):
    """(colour type, inflated IDAT stream) of a PNG whose header is one of `headers`; None for anything else.

    Checksums are checked where `Image.open` checks them (the header and the chunks before the image data); a
    bad one sends the row to the per-row path, which then fails or succeeds exactly as `Image.open` does."""
    if not isinstance(data, bytes) or not data.startswith(_PNG_SIGNATURE):
        return None
    colour = headers.get(data[8:33])
    if colour is None:
        return None
    end, pos, idat, idat_done = len(data), 33, [], False
    while True:
        if pos + 12 > end:
            return None
        length, kind = struct.unpack_from(">I4s", data, pos)
        stop = pos + 8 + length
        if stop + 4 > end:
            return None
        if kind == b"IDAT":
            if idat_done:  # IDAT chunks must be consecutive (PIL stops reading at the first other chunk)
                return None
            idat.append(data[pos + 8:stop])
        elif kind == b"IEND":
            break
        elif not kind[0] & 0x20 or kind in _PNG_ANIMATION_CHUNKS:  # a critical chunk (PLTE …) or an APNG
            return None
        elif idat:
            idat_done = True
        elif zlib.crc32(data[pos + 4:stop]) != struct.unpack_from(">I", data, stop)[0]:
            return None
        pos = stop + 4
    expected = size * (1 + size * len(_PNG_MODES[colour]))
    inflater = zlib.decompressobj()
    try:
        scanlines = inflater.decompress(idat[0] if len(idat) == 1 else b"".join(idat), expected + 1)
    except zlib.error:
        return None
    if len(scanlines) != expected or not inflater.eof:
        return None
    return colour, scanlines


def _decode_png_batch(values, size: int) -> np.ndarray | None:
    """A batch of stored images → (B, size, size, C) uint8 when every one is a plain PNG of the model's size
    and the same colour type (see above); None otherwise (the caller then decodes row by row)."""
    from PIL import Image

    headers = _png_headers(size)
    colour, parts = None, []
    for value in values:
        parsed = _png_scanlines(value.get("bytes"), size, headers) if isinstance(value, dict) else None
        if parsed is None or (colour is not None and parsed[0] != colour):
            return None
        colour = parsed[0]
        parts.append(parsed[1])
    if not parts:
        return None
    mode = _PNG_MODES[colour]
    channels = len(mode)
    separator = bytes(1 + size * channels)  # filter type 0 (None), all-zero pixels
    stream = separator + separator.join(parts)
    rows = len(parts) * (size + 1)
    if np.frombuffer(stream, dtype=np.uint8).reshape(rows, -1)[:, 0].max() > 4:  # an unknown filter type
        return None
    try:
        tall = Image.new(mode, (size, rows))
        tall.frombytes(zlib.compress(stream, 0), "zip", mode)  # level 0: stored blocks, no compression work
    except Exception:
        return None
    return np.asarray(tall).reshape(len(parts), size + 1, size, channels)[:, 1:]


def _batch_pixel_values(processor, images: np.ndarray) -> torch.Tensor | None:
    """`processor(images)` for a (B, S, S, C) uint8 batch at the model's size, computed once for the whole batch
    with exactly DapsImageProcessor's per-image arithmetic (so the values are bitwise equal); None when the
    processor is not exactly a DapsImageProcessor or the images need converting beyond grey → RGB."""
    from .image_processing_daps import DapsImageProcessor

    if type(processor) is not DapsImageProcessor:  # a subclass (or a remote-code copy) may preprocess differently
        return None
    settings = processor._settings_with({})
    size, channels = settings["image_size"], settings["num_channels"]
    if images.dtype != np.uint8 or images.shape[1:3] != (size, size):
        return None
    if images.shape[-1] != channels:
        if images.shape[-1] != 1 or channels != 3:
            return None
        images = np.repeat(images, 3, axis=3)  # the processor's grey → RGB
    # No resize or crop: a size×size image is left as it is whatever the settings.
    array = DapsImageProcessor._rescale_and_normalize(images, settings)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2), dtype=np.float32))


class _Encoder:
    """The function `Dataset.map` calls; picklable, so it runs in `num_proc` worker processes too."""

    def __init__(self, model, processor, image_column, codes_column, dtype, num_proc, fast=True, search=None):
        self.model = model
        self.search = dict(search or {})  # keyword arguments of `model.encode` (search, num_candidates, num_sweeps)
        self.processor = processor
        # The batch path takes PNGs already at the size the processor makes (no resizing to do).
        self.image_size = getattr(processor, "image_size", model.config.image_size)
        self.fast = fast  # try the batch path for plain PNGs first (False: always the per-row path)
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

    def __call__(self, values, indices, rank=None):
        self._prepare(rank)
        pixel_values = None
        if self.fast:
            decoded = _decode_png_batch(values, self.image_size)
            if decoded is not None:
                pixel_values = _batch_pixel_values(self.processor, decoded)
                if pixel_values is None:
                    from PIL import Image

                    values = [Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
                              for image in decoded]
        if pixel_values is None:
            pixel_values = self._pixel_values(values, indices)
        with torch.inference_mode():
            codes = self.model.encode(pixel_values.to(self._device), **self.search).codes
        return {self.codes_column: codes.cpu().numpy().astype(self.dtype)}

    def _pixel_values(self, values, indices):
        """The per-row path: any stored image, decoded and converted one by one; errors name the row."""
        images = [_decode_image(value, row) for value, row in zip(values, indices)]
        try:
            return self.processor(images, return_tensors="pt").pixel_values
        except (ValueError, TypeError):
            # Find the offending row so the message names it.
            for image, row in zip(images, indices):
                try:
                    self.processor([image], return_tensors="pt")
                except (ValueError, TypeError) as row_error:
                    raise ValueError(f"Row {row}: {row_error}") from row_error
            raise

def tokenize_dataset(dataset, model, processor, image_column: str = "image", batch_size: int = 64,
                     num_proc: int | None = None, codes_column: str = "codes", load_from_cache_file: bool = True,
                     desc: str = "Tokenizing", search: str | None = None, num_candidates: int = 4,
                     num_sweeps: int = 1, search_objective: str = "likelihood"):
    """Add a `codes` column of greedy (or searched) codes to `dataset` (every other column kept).

    Args:
        dataset (`datasets.Dataset`): rows with an image column (PIL images, image files or HWC arrays).
        model ([`DapsModel`]): the tokenizer; greedy (deterministic) codes are stored.
        processor ([`DapsImageProcessor`]): the model's processor.
        image_column: the column holding images.
        batch_size: images per `model.encode` call.
        num_proc: worker processes (`Dataset.map`'s); with GPUs, worker `rank` uses GPU `rank % num_gpus`.
        codes_column: name of the new column.
        search: None (greedy codes, the default) or "local" / "parallel": each image's codes are improved by
            `model.encode(search=...)` with `num_candidates` and `num_sweeps` (deterministic, so the result is
            cached like greedy codes; the settings are part of the cache key). "best-of-n" is refused: it samples,
            and a cached column must not depend on a random draw.
        search_objective: what the search maximises, "likelihood" (log p(x | z), the default) or "squared_error"
            (PSNR); see `DapsModel.encode`.

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
    if search is None and search_objective != "likelihood":
        raise ValueError(f"search_objective={search_objective!r} is what a search maximises: pass search= too.")
    settings = None
    if search is not None:
        if search not in ("local", "parallel"):
            raise ValueError(f"search must be None, 'local' or 'parallel' (deterministic searches), got {search!r}.")
        settings = {"search": search, "num_candidates": num_candidates, "num_sweeps": num_sweeps}
        if search_objective != "likelihood":  # likelihood searches keep the cache key they had before objectives
            settings["search_objective"] = search_objective
        # Check the settings (and that the model can run this search) on one image before mapping the dataset.
        size = model.config.image_size
        model.encode(torch.zeros(1, model.config.num_channels, size, size, device=model.device), **settings)
    config = model.config
    dtype = code_dtype(config.codebook_size)
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    features = dataset.features.copy()
    features[codes_column] = datasets.List(datasets.Value(dtype), length=config.num_tokens)
    encoder = _Encoder(model.cpu() if num_proc and num_proc > 1 else model, processor, image_column,
                       codes_column, dtype, num_proc, search=settings)
    fingerprint = _fingerprint(model, processor, image_column, codes_column, dataset._fingerprint, settings)
    tokenized = dataset.map(
        encoder, batched=True, batch_size=batch_size, num_proc=num_proc, with_indices=True,
        input_columns=[image_column],  # only the image column is read into Python; the others are copied as Arrow
        with_rank=bool(num_proc and num_proc > 1 and torch.cuda.is_available()),
        features=features, new_fingerprint=fingerprint, load_from_cache_file=load_from_cache_file, desc=desc,
    )
    if isinstance(feature, datasets.Image) and feature.decode:
        tokenized = tokenized.cast_column(image_column, feature)
    return tokenized
