"""Image processor for the DAPS image tokenizer: raw images -> `pixel_values` and decoded `pixel_values` -> images.

This module is self-contained (it imports only numpy, PIL, torch and transformers) so that `save_pretrained` can
ship it next to a checkpoint for `trust_remote_code=True` loading.

Pipeline of `DapsImageProcessor.preprocess`, per image:

1. read the input (PIL image, numpy array, torch tensor) into a (H, W, C_in) array, uint8 for 8-bit data or
   float32 in [0, 1] for float data, checking its type, rank, channel count, value range and finiteness;
2. convert to `num_channels`: grey -> RGB by repeating, RGB -> grey by ITU-R 601-2 luminance (the same
   integer formula as PIL's `convert("L")`), alpha (RGBA, LA) composited onto white;
3. resize (PIL, `resample`) so that the shorter side is `image_size` (skipped when it already is), then crop
   the centre `image_size` x `image_size` square;
4. rescale 8-bit data by `rescale_factor` (1/255: [0, 255] -> [0, 1]); float input is already in [0, 1];
5. normalise `(x - image_mean) / image_std` per channel (mean = std = 0.5 maps [0, 1] to [-1, 1]).

`postprocess` inverts step 5 exactly and clamps to [0, 1].
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["DapsImageProcessor"]

# PIL resampling filters by value: NEAREST=0, LANCZOS=1, BILINEAR=2, BICUBIC=3, BOX=4, HAMMING=5.
_RESAMPLE_NAMES = {int(r): r.name for r in PIL.Image.Resampling}
# Settings that `preprocess` accepts as per-call overrides (also the constructor's own settings).
_SETTINGS = (
    "image_size", "num_channels", "do_resize", "resample", "do_center_crop",
    "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
)
# Keys transformers itself writes into / reads from preprocessor_config.json that are not settings.
_SERVICE_KEYS = ("image_processor_type", "processor_class", "feature_extractor_type")
_KNOWN_EXTRA_KEYS = ("auto_map", "_processor_class")
_OUTPUT_TYPES = ("pil", "np", "pt")
_CHANNEL_COUNTS = (1, 2, 3, 4)  # grey, grey + alpha, RGB, RGBA
_LIKELIHOOD_NORMALIZE = {"bernoulli": False, "gaussian": True}


class DapsImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments `from_pretrained(path, **kwargs)` applies on top of the saved settings."""

    image_size: int
    num_channels: int


def _describe(obj: Any) -> str:
    """Short description of an input for error messages."""
    if isinstance(obj, PIL.Image.Image):
        return f"PIL.Image (mode {obj.mode!r}, size {obj.size[0]}x{obj.size[1]})"
    if isinstance(obj, np.ndarray):
        return f"numpy.ndarray (shape {tuple(obj.shape)}, dtype {obj.dtype})"
    if isinstance(obj, torch.Tensor):
        return f"torch.Tensor (shape {tuple(obj.shape)}, dtype {obj.dtype})"
    if isinstance(obj, str):
        shown = obj if len(obj) <= 60 else obj[:57] + "..."
        return f"str {shown!r}"
    return type(obj).__name__


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


class DapsImageProcessor(BaseImageProcessor):
    r"""
    Turns images into the `pixel_values` a DAPS tokenizer encodes, and decoded `pixel_values` back into images.

    A PIL/numpy processor (no torchvision). Settings are plain attributes, saved to and loaded from
    `preprocessor_config.json` by `save_pretrained` / `from_pretrained`.

    Args:
        image_size (`int`, defaults to 32):
            Side of the square images the model takes; `preprocess` returns (B, C, image_size, image_size).
        num_channels (`int`, defaults to 3):
            1 (grey) or 3 (RGB). Inputs are converted to this many channels.
        do_resize (`bool`, defaults to `True`):
            Resize so that the shorter side equals `image_size` (aspect ratio kept). Skipped for images whose
            shorter side already equals `image_size`.
        resample (`PIL.Image.Resampling` or `int`, defaults to `PIL.Image.Resampling.BICUBIC`):
            PIL filter used for resizing.
        do_center_crop (`bool`, defaults to `True`):
            Crop the centre `image_size` x `image_size` square after resizing.
        do_rescale (`bool`, defaults to `True`):
            Multiply 8-bit (integer, 0..255) inputs by `rescale_factor`. Float inputs must already lie in [0, 1]
            and are never rescaled.
        rescale_factor (`float`, defaults to 1/255):
            Scale for 8-bit inputs.
        do_normalize (`bool`, defaults to `True`):
            Apply `(x - image_mean) / image_std` per channel. Models with a Bernoulli likelihood use `False`
            (pixel values in [0, 1]); Gaussian models use mean = std = 0.5 (pixel values in [-1, 1]).
        image_mean (`float` or `list[float]`, defaults to 0.5 per channel):
            Per-channel mean; a single number applies to every channel; a list must have `num_channels` entries.
        image_std (`float` or `list[float]`, defaults to 0.5 per channel):
            Per-channel standard deviation, every entry > 0; same broadcasting as `image_mean`.

    Example:

    ```python
    processor = DapsImageProcessor(image_size=32, num_channels=3)
    pixel_values = processor(images, return_tensors="pt").pixel_values   # (B, 3, 32, 32), float32 in [-1, 1]
    images = processor.postprocess(pixel_values, output_type="pil")        # list of B RGB PIL images
    ```
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = DapsImageProcessorKwargs

    def __init__(
        self,
        image_size: int = 32,
        num_channels: int = 3,
        do_resize: bool = True,
        resample: PIL.Image.Resampling | int = PIL.Image.Resampling.BICUBIC,
        do_center_crop: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        **kwargs,
    ):
        for key in _SERVICE_KEYS:
            kwargs.pop(key, None)
        unknown = [key for key in kwargs if key not in _KNOWN_EXTRA_KEYS]
        if unknown:
            # transformers convention: unknown keys are kept as attributes (forward compatibility of saved files).
            logger.warning(
                f"DapsImageProcessor: ignoring unknown settings {unknown}; the settings are {list(_SETTINGS)}."
            )
        super().__init__(**kwargs)
        settings = self._resolve_settings(
            dict(
                image_size=image_size, num_channels=num_channels, do_resize=do_resize, resample=resample,
                do_center_crop=do_center_crop, do_rescale=do_rescale, rescale_factor=rescale_factor,
                do_normalize=do_normalize, image_mean=image_mean, image_std=image_std,
            )
        )
        for key, value in settings.items():
            setattr(self, key, value)

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_model_config(cls, config: Any, **kwargs) -> DapsImageProcessor:
        """
        Build the processor that matches a model config.

        Args:
            config: any object with attributes `image_size`, `num_channels` and `likelihood`
                ("bernoulli" -> `do_normalize=False`, pixel values in [0, 1]; "gaussian" -> `do_normalize=True`
                with mean = std = 0.5, pixel values in [-1, 1]); a `DapsConfig` qualifies.
            kwargs: further settings that override the derived ones.
        """
        missing = [name for name in ("image_size", "num_channels", "likelihood") if not hasattr(config, name)]
        if missing:
            raise TypeError(
                "DapsImageProcessor.from_model_config expects a config with attributes image_size, num_channels "
                f"and likelihood; got {type(config).__name__} without {missing}."
            )
        likelihood = config.likelihood
        if likelihood not in _LIKELIHOOD_NORMALIZE:
            raise ValueError(
                f"DapsImageProcessor.from_model_config: likelihood must be one of {list(_LIKELIHOOD_NORMALIZE)}, "
                f"got {likelihood!r}."
            )
        settings = dict(
            image_size=config.image_size,
            num_channels=config.num_channels,
            do_normalize=_LIKELIHOOD_NORMALIZE[likelihood],
        )
        settings.update(kwargs)
        return cls(**settings)

    @staticmethod
    def _per_channel(name: str, value: Any, num_channels: int) -> list[float]:
        """Validate a mean/std setting and return it as `num_channels` floats."""
        if value is None:
            return [0.5] * num_channels
        if isinstance(value, torch.Tensor | np.ndarray):
            value = value.tolist()
        if isinstance(value, numbers.Real) and not _is_bool(value):
            values = [float(value)] * num_channels
        elif isinstance(value, Sequence) and not isinstance(value, str):
            if not all(isinstance(v, numbers.Real) and not _is_bool(v) for v in value):
                raise TypeError(f"DapsImageProcessor: {name} must be a number or a list of numbers, got {value!r}.")
            values = [float(v) for v in value]
            if len(values) != num_channels:
                raise ValueError(
                    f"DapsImageProcessor: {name} must have one entry per channel (num_channels={num_channels}), "
                    f"got {len(values)} entries: {values}."
                )
        else:
            raise TypeError(f"DapsImageProcessor: {name} must be a number or a list of numbers, got {value!r}.")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"DapsImageProcessor: {name} must be finite, got {values}.")
        if name == "image_std" and any(v <= 0 for v in values):
            raise ValueError(f"DapsImageProcessor: image_std entries must be > 0 (it divides), got {values}.")
        return values

    @classmethod
    def _resolve_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Validate a full set of settings; return them in canonical (JSON-friendly) form."""
        out = dict(settings)
        size = out["image_size"]
        if not isinstance(size, numbers.Integral) or _is_bool(size):
            raise TypeError(f"DapsImageProcessor: image_size must be an int, got {size!r} ({type(size).__name__}).")
        if size <= 0:
            raise ValueError(f"DapsImageProcessor: image_size must be a positive int, got {size}.")
        out["image_size"] = int(size)
        channels = out["num_channels"]
        if not isinstance(channels, numbers.Integral) or _is_bool(channels) or int(channels) not in (1, 3):
            raise ValueError(f"DapsImageProcessor: num_channels must be 1 (grey) or 3 (RGB), got {channels!r}.")
        out["num_channels"] = int(channels)
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if not _is_bool(out[flag]):
                raise TypeError(f"DapsImageProcessor: {flag} must be True or False, got {out[flag]!r}.")
            out[flag] = bool(out[flag])
        resample = out["resample"]
        if not isinstance(resample, numbers.Integral) or _is_bool(resample) or int(resample) not in _RESAMPLE_NAMES:
            raise ValueError(
                "DapsImageProcessor: resample must be a PIL.Image.Resampling filter "
                f"({', '.join(f'{k}={v}' for k, v in _RESAMPLE_NAMES.items())}), got {resample!r}."
            )
        out["resample"] = int(resample)
        factor = out["rescale_factor"]
        if not isinstance(factor, numbers.Real) or _is_bool(factor) or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"DapsImageProcessor: rescale_factor must be a finite number > 0, got {factor!r}.")
        out["rescale_factor"] = float(factor)
        out["image_mean"] = cls._per_channel("image_mean", out["image_mean"], out["num_channels"])
        out["image_std"] = cls._per_channel("image_std", out["image_std"], out["num_channels"])
        return out

    def _settings_with(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(_SETTINGS))
        if unknown:
            raise TypeError(
                f"DapsImageProcessor.preprocess got unexpected keyword arguments {unknown}; "
                f"it accepts return_tensors and the settings {list(_SETTINGS)}."
            )
        settings = {key: getattr(self, key) for key in _SETTINGS}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        # A per-call num_channels keeps a uniform mean/std (e.g. the default 0.5) instead of failing on its length.
        for key in ("image_mean", "image_std"):
            own = settings[key]
            if key not in overrides and "num_channels" in overrides and len(set(own)) == 1:
                settings[key] = own[0]
        settings.update(overrides)
        return self._resolve_settings(settings)

    # ------------------------------------------------------------------ preprocessing

    def __call__(self, images: Any, return_tensors: str | None = None, **overrides) -> BatchFeature:
        """Same as `preprocess`."""
        return self.preprocess(images, return_tensors=return_tensors, **overrides)

    def preprocess(self, images: Any, return_tensors: str | None = None, **overrides) -> BatchFeature:
        r"""
        Turn one image or a batch of images into model inputs.

        Args:
            images:
                One image or a batch. One image is a `PIL.Image.Image` (any mode; 16-bit modes "I;16"/"I" are
                scaled by 1/65535, "F" must lie in [0, 1]), a numpy array of shape (H, W), (H, W, C) or
                (C, H, W), or a torch tensor of shape (H, W), (C, H, W) or (H, W, C), with C in {1, 2, 3, 4}
                (grey, grey+alpha, RGB, RGBA). When both end axes could be channels, numpy arrays are read as
                (H, W, C) and tensors as (C, H, W). A batch is a list/tuple of such images (sizes may differ)
                or one 4-D array/tensor (B, H, W, C) / (B, C, H, W).
                Values: uint8 in 0..255; other integer dtypes with values in 0..255; uint16 in 0..65535
                (16-bit, scaled by 1/65535); bool (True = white); float in [0, 1]. NaN/inf are rejected.
            return_tensors (`str`, *optional*):
                "pt" for a torch tensor, "np" or `None` for a numpy array.
            overrides:
                Any constructor setting (`image_size`, `num_channels`, `do_resize`, `resample`, `do_center_crop`,
                `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`) for this call only;
                `None` means "use the processor's own".

        Returns:
            `BatchFeature` with `pixel_values`: float32, shape (B, num_channels, image_size, image_size),
            channel-first; in [-1, 1] with the default normalisation, in [0, 1] with `do_normalize=False`.

        Raises:
            TypeError: an input is not a PIL image, numpy array or tensor (e.g. a path, a dict), or an unknown
                keyword argument.
            ValueError: empty batch, wrong rank, a channel count other than 1-4, a float image outside [0, 1],
                integer values outside their range, NaN/inf values, an image that cannot be brought to
                image_size x image_size with the given settings, or an unsupported `return_tensors`.
        """
        settings = self._settings_with(overrides)
        if return_tensors not in (None, "np", "pt"):
            # TensorType is a str enum, so TensorType.PYTORCH == "pt".
            raise ValueError(
                f"DapsImageProcessor: return_tensors must be 'pt', 'np' or None, got {return_tensors!r}."
            )
        batch = self._as_list(images)
        processed = [self._process_one(image, index, settings) for index, image in enumerate(batch)]
        pixel_values = np.stack(processed).astype(np.float32, copy=False)
        if return_tensors == "pt":
            return BatchFeature(data={"pixel_values": torch.from_numpy(pixel_values)})
        return BatchFeature(data={"pixel_values": pixel_values})

    @staticmethod
    def _as_list(images: Any) -> list[Any]:
        """Split the `images` argument into a list of single images."""
        if isinstance(images, list | tuple):
            if len(images) == 0:
                raise ValueError("DapsImageProcessor: expected at least one image, got an empty list.")
            return list(images)
        if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError(
                    f"DapsImageProcessor: expected at least one image, got an empty batch {_describe(images)}."
                )
            return list(images)
        return [images]

    def _process_one(self, image: Any, index: int, settings: dict[str, Any]) -> np.ndarray:
        """One input image -> (C, S, S) float32 array."""
        where = f"image {index}"
        array = self._read(image, where)  # (H, W, C_in), uint8 or float32 in [0, 1]
        array = self._convert_channels(array, settings["num_channels"])
        array = self._resize_and_crop(array, settings, where)
        array = self._rescale_and_normalize(array, settings)
        return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)

    @staticmethod
    def _rescale_and_normalize(array: np.ndarray, settings: dict[str, Any]) -> np.ndarray:
        """(..., H, W, C) uint8 (rescaled) or float32 in [0, 1] -> float32, normalised per channel when asked.
        Works on one image or a stacked batch with the same arithmetic, so both give bitwise-equal values."""
        if array.dtype == np.uint8:
            if settings["do_rescale"]:
                array = array.astype(np.float32) * np.float32(settings["rescale_factor"])
            else:
                array = array.astype(np.float32)
        if settings["do_normalize"]:
            mean = np.asarray(settings["image_mean"], dtype=np.float32)
            std = np.asarray(settings["image_std"], dtype=np.float32)
            array = (array - mean) / std
        return array

    # -- reading

    @classmethod
    def _read(cls, image: Any, where: str) -> np.ndarray:
        """Any supported single image -> (H, W, C_in) array, uint8 (8-bit data) or float32 in [0, 1]."""
        if isinstance(image, PIL.Image.Image):
            return cls._read_pil(image, where)
        if isinstance(image, torch.Tensor):
            tensor = image.detach().cpu()
            if tensor.is_complex():
                raise ValueError(f"DapsImageProcessor: {where} has complex dtype {tensor.dtype}; expected real pixels.")
            if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
                tensor = tensor.float()  # float16 / bfloat16: numpy has no bfloat16
            array, channels_last_first = tensor.numpy(), False
        elif isinstance(image, np.ndarray):
            array, channels_last_first = image, True
        else:
            hint = ""
            if isinstance(image, str | bytes):
                hint = " To use a file, open it first: PIL.Image.open(path)."
            elif isinstance(image, dict):
                hint = " For a dataset row, pass the image column, e.g. example['image']."
            elif isinstance(image, list | tuple):
                hint = " Nested lists are not supported: pass a flat list of images, or one array."
            raise TypeError(
                "DapsImageProcessor: expected a PIL.Image.Image, numpy.ndarray or torch.Tensor (or a list of them), "
                f"got {_describe(image)} for {where}.{hint}"
            )
        array = cls._to_hwc(array, prefer_channels_last=channels_last_first, where=where, original=image)
        return cls._to_canonical_dtype(array, where)

    @classmethod
    def _read_pil(cls, image: PIL.Image.Image, where: str) -> np.ndarray:
        mode = image.mode
        if mode in ("L", "RGB", "RGBA", "LA"):
            array = np.asarray(image)
        elif mode == "1":
            array = np.asarray(image.convert("L"))
        elif mode in ("P", "PA"):
            has_alpha = mode == "PA" or "transparency" in image.info
            array = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
        elif mode == "La":
            array = np.asarray(image.convert("LA"))
        elif mode == "RGBa":
            array = np.asarray(image.convert("RGBA"))
        elif mode.startswith("I;16") or mode == "I":
            values = np.asarray(image).astype(np.int64)
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise ValueError(
                    f"DapsImageProcessor: {where} is a PIL image of mode {mode!r}, read as 16-bit (0..65535), but its "
                    f"values span [{values.min()}, {values.max()}]."
                )
            array = (values.astype(np.float64) / 65535.0).astype(np.float32)
        elif mode == "F":
            array = np.asarray(image, dtype=np.float32)
        else:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
            array = np.asarray(image.convert("RGB"))
        if array.ndim == 2:
            array = array[:, :, None]
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ValueError(f"DapsImageProcessor: {where} is empty: {_describe(image)}.")
        return cls._to_canonical_dtype(array, where)

    @staticmethod
    def _to_hwc(array: np.ndarray, prefer_channels_last: bool, where: str, original: Any) -> np.ndarray:
        kind = "numpy array" if isinstance(original, np.ndarray) else "tensor"
        if array.ndim == 2:
            array = array[:, :, None]
        elif array.ndim == 3:
            first, last = array.shape[0] in _CHANNEL_COUNTS, array.shape[-1] in _CHANNEL_COUNTS
            if first and last:
                channels_last = prefer_channels_last
            elif first or last:
                channels_last = last
            else:
                raise ValueError(
                    f"DapsImageProcessor: {where}: expected 1, 2, 3 or 4 channels (grey, grey+alpha, RGB, RGBA) on the "
                    f"first (C, H, W) or last (H, W, C) axis, got {_describe(original)}. A batch of grey images "
                    "needs a channel axis, (B, H, W, 1), or pass a list of (H, W) images."
                )
            if not channels_last:
                array = array.transpose(1, 2, 0)
        else:
            raise ValueError(
                f"DapsImageProcessor: {where}: expected a {kind} with 2 dims (H, W) or 3 dims (H, W, C) / (C, H, W) "
                f"(or a 4-D batch, or a list of images), got {array.ndim} dims: {_describe(original)}."
            )
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise ValueError(f"DapsImageProcessor: {where} is empty: {_describe(original)}.")
        return array

    @staticmethod
    def _to_canonical_dtype(array: np.ndarray, where: str) -> np.ndarray:
        """(H, W, C) of any supported dtype -> uint8 (8-bit data) or float32 in [0, 1], with checks."""
        dtype = array.dtype
        if dtype == np.uint8:
            return array
        if dtype == np.bool_:
            return array.astype(np.uint8) * np.uint8(255)
        if np.issubdtype(dtype, np.floating):
            if not np.isfinite(array).all():
                bad = int((~np.isfinite(array)).sum())
                raise ValueError(
                    f"DapsImageProcessor: {where} contains {bad} NaN or inf value(s); expected finite pixel values."
                )
            low, high = float(array.min()), float(array.max())
            if low < 0.0 or high > 1.0:
                raise ValueError(
                    f"DapsImageProcessor: {where} is a float image with values in [{low:g}, {high:g}], outside [0, 1]. "
                    "Float pixels must lie in [0, 1]; pass uint8 for 0..255 data (or divide by 255)."
                )
            return array.astype(np.float32, copy=False)
        if dtype == np.uint16:
            return (array.astype(np.float64) / 65535.0).astype(np.float32)
        if np.issubdtype(dtype, np.integer):
            low, high = int(array.min()), int(array.max())
            if low < 0 or high > 255:
                raise ValueError(
                    f"DapsImageProcessor: {where} has integer ({dtype}) values in [{low}, {high}]; integer pixels must "
                    "lie in 0..255 (use uint16 for 16-bit data, or float in [0, 1])."
                )
            return array.astype(np.uint8)
        raise ValueError(
            f"DapsImageProcessor: {where} has dtype {dtype}; expected uint8, another integer type, bool or float."
        )

    # -- channels, size

    @staticmethod
    def _composite_on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        if colour.dtype == np.uint8:
            a = alpha.astype(np.float32) / 255.0
            out = colour.astype(np.float32) * a + 255.0 * (1.0 - a)
            return np.clip(np.rint(out), 0, 255).astype(np.uint8)
        return np.clip(colour * alpha + (1.0 - alpha), 0.0, 1.0).astype(np.float32)

    @classmethod
    def _convert_channels(cls, array: np.ndarray, num_channels: int) -> np.ndarray:
        """(H, W, C_in) with C_in in {1, 2, 3, 4} -> (H, W, num_channels), same dtype."""
        channels = array.shape[-1]
        if channels == 2:  # grey + alpha
            array = cls._composite_on_white(array[:, :, :1], array[:, :, 1:])
        elif channels == 4:  # RGBA
            array = cls._composite_on_white(array[:, :, :3], array[:, :, 3:])
        channels = array.shape[-1]
        if channels == num_channels:
            return array
        if num_channels == 3:  # grey -> RGB
            return np.repeat(array, 3, axis=2)
        # RGB -> grey, ITU-R 601-2 luma; integer version is exactly PIL's convert("L").
        if array.dtype == np.uint8:
            rgb = array.astype(np.uint32)
            luma = (rgb[:, :, 0] * 19595 + rgb[:, :, 1] * 38470 + rgb[:, :, 2] * 7471 + 0x8000) >> 16
            return luma.astype(np.uint8)[:, :, None]
        luma = array[:, :, 0] * 0.299 + array[:, :, 1] * 0.587 + array[:, :, 2] * 0.114
        return np.clip(luma, 0.0, 1.0).astype(np.float32)[:, :, None]

    @staticmethod
    def _resize(array: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
        """Resize (H, W, C) with PIL: uint8 in "L"/"RGB" mode, float32 channel by channel in "F" mode."""
        if array.dtype == np.uint8:
            source = array[:, :, 0] if array.shape[-1] == 1 else array
            resized = np.asarray(PIL.Image.fromarray(np.ascontiguousarray(source)).resize((width, height), resample))
            return resized[:, :, None] if resized.ndim == 2 else resized
        planes = []
        for c in range(array.shape[-1]):
            plane = PIL.Image.fromarray(np.ascontiguousarray(array[:, :, c], dtype=np.float32))  # mode "F"
            planes.append(np.asarray(plane.resize((width, height), resample)))
        # Bicubic/Lanczos overshoot: keep float pixels in [0, 1] like PIL clamps uint8.
        return np.clip(np.stack(planes, axis=-1), 0.0, 1.0).astype(np.float32)

    def _resize_and_crop(self, array: np.ndarray, settings: dict[str, Any], where: str) -> np.ndarray:
        size = settings["image_size"]
        height, width = array.shape[:2]
        if settings["do_resize"]:
            short, long = min(height, width), max(height, width)
            new_long = max(size, int(round(long * size / short)))
            new_h, new_w = (size, new_long) if height <= width else (new_long, size)
            if (new_h, new_w) != (height, width):
                array = self._resize(array, new_h, new_w, settings["resample"])
                height, width = new_h, new_w
        if settings["do_center_crop"] and (height, width) != (size, size):
            if height < size or width < size:
                raise ValueError(
                    f"DapsImageProcessor: {where} is {height}x{width}, smaller than image_size={size} on a side, and "
                    "do_resize=False: it cannot be centre-cropped to the model's size. Enable do_resize."
                )
            top, left = (height - size) // 2, (width - size) // 2
            array = array[top : top + size, left : left + size]
        if array.shape[:2] != (size, size):
            raise ValueError(
                f"DapsImageProcessor: {where} is {array.shape[0]}x{array.shape[1]} after resizing, but the model takes "
                f"{size}x{size} images; enable do_center_crop (and do_resize) or pass square images."
            )
        return array

    # ------------------------------------------------------------------ postprocessing

    def postprocess(self, pixel_values: torch.Tensor | np.ndarray, output_type: str = "pil"):
        r"""
        Turn model-space pixel values (e.g. `model.decode(codes).pixel_values`) back into images.

        Inverts the normalisation exactly (`x * image_std + image_mean` when `do_normalize`) and clamps to [0, 1].

        Args:
            pixel_values (`torch.Tensor` or `np.ndarray`, float):
                (B, C, H, W), or (B, K, C, H, W) for K samples per image; C must equal `num_channels`.
                An unbatched (C, H, W) array is rejected.
            output_type (`str`, defaults to "pil"):
                - "pt": float32 tensor in [0, 1], same shape as the input ((B, C, H, W) or (B, K, C, H, W)),
                  on the input tensor's device.
                - "np": uint8 array (N, H, W, C), values rounded from [0, 1] * 255.
                - "pil": list of N PIL images, mode "L" (1 channel) or "RGB" (3 channels).
                For "np" and "pil", N = B for 4-D input and N = B * K for 5-D input (the K axis is flattened
                into the batch, sample-major within each image: index b * K + k).

        Raises:
            TypeError: `pixel_values` is not a tensor or array.
            ValueError: unknown `output_type`, wrong number of dims, channel count != num_channels, a non-float
                dtype, or NaN/inf values.
        """
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(
                "DapsImageProcessor.postprocess: output_type must be one of "
                f"{list(_OUTPUT_TYPES)}, got {output_type!r}."
            )
        if isinstance(pixel_values, np.ndarray):
            if not np.issubdtype(pixel_values.dtype, np.floating):
                raise ValueError(
                    f"DapsImageProcessor.postprocess: expected float pixel values, got {_describe(pixel_values)}."
                )
            values = torch.from_numpy(np.asarray(pixel_values, dtype=np.float32))
        elif isinstance(pixel_values, torch.Tensor):
            if not pixel_values.is_floating_point():
                raise ValueError(
                    f"DapsImageProcessor.postprocess: expected float pixel values, got {_describe(pixel_values)}."
                )
            values = pixel_values.detach().float()
        else:
            raise TypeError(
                "DapsImageProcessor.postprocess: expected a torch.Tensor or numpy.ndarray of shape (B, C, H, W) or "
                f"(B, K, C, H, W), got {_describe(pixel_values)}."
            )
        if values.ndim not in (4, 5):
            hint = " An unbatched (C, H, W) image needs a batch axis: x[None]." if values.ndim == 3 else ""
            raise ValueError(
                "DapsImageProcessor.postprocess: expected pixel values of shape (B, C, H, W) or (B, K, C, H, W), "
                f"got {values.ndim} dims {tuple(values.shape)}.{hint}"
            )
        channels = values.shape[-3]
        if channels != self.num_channels:
            raise ValueError(
                f"DapsImageProcessor.postprocess: expected {self.num_channels} channel(s) on axis -3 "
                f"(num_channels={self.num_channels}), got shape {tuple(values.shape)}."
            )
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise ValueError(f"DapsImageProcessor.postprocess: pixel values contain {bad} NaN or inf value(s).")
        if self.do_normalize:
            shape = (-1, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32, device=values.device).view(shape)
            mean = torch.tensor(self.image_mean, dtype=torch.float32, device=values.device).view(shape)
            values = values * std + mean
        values = values.clamp(0.0, 1.0)
        if output_type == "pt":
            return values
        flat = values.reshape(-1, *values.shape[-3:])  # (N, C, H, W)
        images = torch.round(flat * 255.0).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
        if output_type == "np":
            return images
        if self.num_channels == 1:
            return [PIL.Image.fromarray(np.ascontiguousarray(image[:, :, 0])) for image in images]
        return [PIL.Image.fromarray(np.ascontiguousarray(image)) for image in images]
