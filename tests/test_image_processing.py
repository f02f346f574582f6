"""Tests for DapsImageProcessor: preprocessing, postprocessing, serialisation and error messages."""

import json
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from tokenizer.image_processing_daps import DapsImageProcessor


def rng(seed=0):
    return np.random.default_rng(seed)


def random_uint8(shape, seed=0):
    return rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("do_normalize", [True, False])
def test_round_trip_is_exact(num_channels, do_normalize):
    processor = DapsImageProcessor(image_size=16, num_channels=num_channels, do_normalize=do_normalize)
    images = random_uint8((4, 16, 16, num_channels), seed=num_channels)
    pixel_values = processor([im for im in images], return_tensors="pt").pixel_values
    assert pixel_values.shape == (4, num_channels, 16, 16)
    assert pixel_values.dtype == torch.float32
    if do_normalize:
        assert pixel_values.min() >= -1 and pixel_values.max() <= 1 and pixel_values.min() < -0.9
    else:
        assert pixel_values.min() >= 0 and pixel_values.max() <= 1
    back = processor.postprocess(pixel_values, output_type="np")
    assert back.dtype == np.uint8 and back.shape == (4, 16, 16, num_channels)
    np.testing.assert_array_equal(back, images)
    # The same from a numpy array, and through "pt".
    back_np = processor.postprocess(pixel_values.numpy(), output_type="np")
    np.testing.assert_array_equal(back_np, images)
    as_float = processor.postprocess(pixel_values, output_type="pt")
    assert as_float.shape == (4, num_channels, 16, 16) and as_float.dtype == torch.float32
    np.testing.assert_allclose(as_float.numpy(), images.transpose(0, 3, 1, 2) / 255.0, atol=1e-6)


def test_pixel_values_normalisation_values():
    image = np.array([[[0, 255, 51]]], dtype=np.uint8)  # 1x1 RGB
    gaussian = DapsImageProcessor(image_size=1)(image).pixel_values
    bernoulli = DapsImageProcessor(image_size=1, do_normalize=False)(image).pixel_values
    np.testing.assert_allclose(gaussian[0, :, 0, 0], [-1.0, 1.0, 51 / 255 * 2 - 1], atol=1e-6)
    np.testing.assert_allclose(bernoulli[0, :, 0, 0], [0.0, 1.0, 0.2], atol=1e-6)
    custom = DapsImageProcessor(image_size=1, image_mean=[0.0, 0.5, 0.2], image_std=[1.0, 0.25, 0.2])
    np.testing.assert_allclose(custom(image).pixel_values[0, :, 0, 0], [0.0, 2.0, 0.0], atol=1e-6)
    # postprocess inverts a non-trivial normalisation exactly
    np.testing.assert_array_equal(custom.postprocess(custom(image, return_tensors="pt").pixel_values, "np")[0], image)


def test_postprocess_pil_modes_and_content():
    for channels, mode in [(1, "L"), (3, "RGB")]:
        processor = DapsImageProcessor(image_size=8, num_channels=channels)
        image = random_uint8((8, 8, channels), seed=channels)
        pil = processor.postprocess(processor(image, return_tensors="pt").pixel_values, output_type="pil")
        assert isinstance(pil, list) and len(pil) == 1
        assert pil[0].mode == mode and pil[0].size == (8, 8)
        np.testing.assert_array_equal(np.asarray(pil[0]), image[:, :, 0] if channels == 1 else image)


def test_postprocess_rounds_and_clamps():
    processor = DapsImageProcessor(image_size=2, num_channels=1, do_normalize=False)
    values = torch.tensor([0.999, 0.998, -3.0, 7.0]).view(1, 1, 2, 2)
    out = processor.postprocess(values, output_type="np")[0, :, :, 0]
    # 0.999 * 255 = 254.7 -> 255 (rounded, not truncated); 0.998 * 255 = 254.5 -> 254; clamped to [0, 255]
    np.testing.assert_array_equal(out, [[255, 254], [0, 255]])
    as_float = processor.postprocess(values, output_type="pt")
    assert as_float.min() == 0.0 and as_float.max() == 1.0


def test_postprocess_sample_axis():
    processor = DapsImageProcessor(image_size=4, num_channels=3)
    values = torch.rand(2, 5, 3, 4, 4) * 2 - 1  # (B, K, C, H, W)
    assert processor.postprocess(values, output_type="pt").shape == (2, 5, 3, 4, 4)
    flat = processor.postprocess(values, output_type="np")
    assert flat.shape == (10, 4, 4, 3)
    # index b * K + k
    single = processor.postprocess(values[1, 2][None], output_type="np")[0]
    np.testing.assert_array_equal(flat[1 * 5 + 2], single)
    pil = processor.postprocess(values, output_type="pil")
    assert len(pil) == 10 and all(im.mode == "RGB" for im in pil)


# ----------------------------------------------------------------------------- input kinds


def test_pil_numpy_tensor_inputs_agree_rgb():
    processor = DapsImageProcessor(image_size=16)
    for shape in [(16, 16, 3), (24, 40, 3)]:  # already the size, and one that is resized and cropped
        image = random_uint8(shape, seed=shape[1])
        reference = processor(image, return_tensors="np").pixel_values
        variants = {
            "pil": PIL.Image.fromarray(image),
            "numpy CHW": image.transpose(2, 0, 1).copy(),
            "torch CHW": torch.from_numpy(image.transpose(2, 0, 1).copy()),
            "torch HWC": torch.from_numpy(image),
            "list": [image],
        }
        for name, variant in variants.items():
            np.testing.assert_array_equal(processor(variant).pixel_values, reference, err_msg=name)
    # float input in [0, 1] agrees with uint8 (no resize: float images are resized without quantisation)
    image = random_uint8((16, 16, 3), seed=3)
    reference = processor(image).pixel_values
    np.testing.assert_allclose(processor(image / 255.0).pixel_values, reference, atol=1e-6)
    tensor = torch.from_numpy(image.transpose(2, 0, 1).copy()).float() / 255
    np.testing.assert_allclose(processor(tensor).pixel_values, reference, atol=1e-6)
    np.testing.assert_allclose(processor(tensor.half()).pixel_values, reference, atol=2e-3)


def test_pil_numpy_tensor_inputs_agree_grey():
    processor = DapsImageProcessor(image_size=12, num_channels=1)
    image = random_uint8((12, 12), seed=5)
    reference = processor(image, return_tensors="np").pixel_values
    assert reference.shape == (1, 1, 12, 12)
    for variant in [PIL.Image.fromarray(image), image[:, :, None], image[None], torch.from_numpy(image),
                    torch.from_numpy(image)[None], image.astype(np.int64)]:
        np.testing.assert_array_equal(processor(variant).pixel_values, reference)
    # 16-bit data is scaled by 1/65535
    sixteen = image.astype(np.uint16) * 257
    np.testing.assert_allclose(processor(sixteen).pixel_values, reference, atol=1e-6)
    np.testing.assert_allclose(processor(PIL.Image.fromarray(sixteen)).pixel_values, reference, atol=1e-6)


def test_ambiguous_layouts_numpy_is_hwc_tensor_is_chw():
    processor = DapsImageProcessor(image_size=3, do_center_crop=True)
    array = random_uint8((3, 8, 3), seed=6)  # both end axes could be channels
    np.testing.assert_array_equal(processor(array).pixel_values, processor(PIL.Image.fromarray(array)).pixel_values)
    as_hwc = np.ascontiguousarray(array.transpose(1, 2, 0))  # (8, 3, 3): unambiguous HWC
    np.testing.assert_array_equal(processor(torch.from_numpy(array)).pixel_values, processor(as_hwc).pixel_values)


def test_batched_array_inputs():
    processor = DapsImageProcessor(image_size=8)
    images = random_uint8((3, 8, 8, 3), seed=7)
    from_list = processor(list(images)).pixel_values
    np.testing.assert_array_equal(processor(images).pixel_values, from_list)  # (B, H, W, C) numpy
    np.testing.assert_array_equal(processor(torch.from_numpy(images).permute(0, 3, 1, 2)).pixel_values, from_list)
    np.testing.assert_array_equal(processor(tuple(images)).pixel_values, from_list)


def test_return_tensors_types():
    processor = DapsImageProcessor(image_size=4)
    image = random_uint8((4, 4, 3))
    out = processor(image, return_tensors="pt")
    assert isinstance(out, BatchFeature) and isinstance(out["pixel_values"], torch.Tensor)
    assert out.pixel_values.dtype == torch.float32 and out.pixel_values.is_contiguous()
    for kind in ("np", None):
        values = processor(image, return_tensors=kind).pixel_values
        assert isinstance(values, np.ndarray) and values.dtype == np.float32 and values.shape == (1, 3, 4, 4)
    assert processor.model_input_names == ["pixel_values"]
    assert isinstance(processor, BaseImageProcessor)


# ----------------------------------------------------------------------------- channel conversion


def test_grey_to_rgb_repeats_channel():
    processor = DapsImageProcessor(image_size=8, num_channels=3)
    image = random_uint8((8, 8), seed=11)
    for variant in [image, PIL.Image.fromarray(image), PIL.Image.fromarray(image).convert("1")]:
        values = processor(variant).pixel_values
        assert values.shape == (1, 3, 8, 8)
        np.testing.assert_array_equal(values[0, 0], values[0, 1])
        np.testing.assert_array_equal(values[0, 0], values[0, 2])
    np.testing.assert_allclose(processor(image).pixel_values[0, 0], image / 255.0 * 2 - 1, atol=1e-6)


def test_rgb_to_grey_matches_pil_luminance():
    processor = DapsImageProcessor(image_size=8, num_channels=1, do_normalize=False)
    image = random_uint8((8, 8, 3), seed=12)
    expected = np.asarray(PIL.Image.fromarray(image).convert("L"))
    out = processor.postprocess(processor(image).pixel_values, output_type="np")[0, :, :, 0]
    np.testing.assert_array_equal(out, expected)
    # float RGB uses the same weights (within one grey level)
    out_float = processor.postprocess(processor(image / 255.0).pixel_values, output_type="np")[0, :, :, 0]
    assert np.abs(out_float.astype(int) - expected.astype(int)).max() <= 1


def test_rgba_to_rgb_composites_on_white():
    processor = DapsImageProcessor(image_size=4, do_normalize=False)
    rgb = random_uint8((4, 4, 3), seed=13)
    opaque = np.concatenate([rgb, np.full((4, 4, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(processor(opaque).pixel_values, processor(rgb).pixel_values)
    np.testing.assert_array_equal(processor(PIL.Image.fromarray(opaque, "RGBA")).pixel_values,
                                  processor(rgb).pixel_values)
    transparent = opaque.copy()
    transparent[..., 3] = 0
    np.testing.assert_array_equal(processor(transparent).pixel_values, np.ones((1, 3, 4, 4), np.float32))
    half = np.zeros((4, 4, 4), np.uint8)
    half[..., 3] = 51  # 20 % black over white -> 0.8
    np.testing.assert_allclose(processor(half).pixel_values, np.full((1, 3, 4, 4), 204 / 255), atol=1e-6)
    # float RGBA agrees
    np.testing.assert_allclose(processor(half / 255.0).pixel_values, np.full((1, 3, 4, 4), 0.8), atol=1e-6)


def test_la_to_grey_and_palette():
    processor = DapsImageProcessor(image_size=4, num_channels=1, do_normalize=False)
    grey = random_uint8((4, 4), seed=14)
    la = np.stack([grey, np.full_like(grey, 255)], axis=-1)
    np.testing.assert_array_equal(processor(PIL.Image.fromarray(la, "LA")).pixel_values, processor(grey).pixel_values)
    la[..., 1] = 0
    np.testing.assert_array_equal(processor(la).pixel_values, np.ones((1, 1, 4, 4), np.float32))
    palette = PIL.Image.fromarray(random_uint8((4, 4, 3), seed=15)).convert("P")
    rgb = processor(palette.convert("RGB")).pixel_values
    np.testing.assert_array_equal(processor(palette).pixel_values, rgb)


# ----------------------------------------------------------------------------- size


@pytest.mark.parametrize("height,width", [(40, 64), (64, 40), (32, 96), (100, 33), (64, 64), (10, 20)])
def test_resize_and_crop_shapes(height, width):
    processor = DapsImageProcessor(image_size=32)
    values = processor(random_uint8((height, width, 3))).pixel_values
    assert values.shape == (1, 3, 32, 32)


def test_crop_is_centred_and_resize_skipped_when_short_side_matches():
    processor = DapsImageProcessor(image_size=8, do_normalize=False)
    wide = random_uint8((8, 24, 3), seed=16)  # short side already 8: no resampling, exact centre crop
    np.testing.assert_allclose(processor(wide).pixel_values[0], wide[:, 8:16].transpose(2, 0, 1) / 255.0, atol=1e-6)
    tall = random_uint8((13, 8, 3), seed=17)
    np.testing.assert_allclose(processor(tall).pixel_values[0], tall[2:10].transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_resize_matches_pil_bicubic_and_mixed_sizes_batch():
    processor = DapsImageProcessor(image_size=8, do_normalize=False)
    image = random_uint8((16, 16, 3), seed=18)
    expected = np.asarray(PIL.Image.fromarray(image).resize((8, 8), PIL.Image.Resampling.BICUBIC))
    np.testing.assert_allclose(processor(image).pixel_values[0], expected.transpose(2, 0, 1) / 255.0, atol=1e-6)
    values = processor([image, random_uint8((8, 8, 3)), random_uint8((30, 12))]).pixel_values
    assert values.shape == (3, 3, 8, 8)
    # float images are resized without quantisation and stay in [0, 1]
    smooth = processor(image / 255.0).pixel_values
    assert smooth.min() >= 0 and smooth.max() <= 1
    np.testing.assert_allclose(smooth[0], expected.transpose(2, 0, 1) / 255.0, atol=2 / 255)


def test_per_call_overrides_do_not_change_processor():
    processor = DapsImageProcessor(image_size=8)
    image = random_uint8((16, 16, 3))
    assert processor(image, image_size=4, num_channels=1).pixel_values.shape == (
        1, 1, 4, 4)
    assert processor(image, do_normalize=False).pixel_values.min() >= 0
    assert processor.image_size == 8 and processor.num_channels == 3 and processor.do_normalize is True
    assert processor(image).pixel_values.shape == (1, 3, 8, 8)


# ----------------------------------------------------------------------------- construction and serialisation


def test_defaults():
    processor = DapsImageProcessor()
    assert processor.image_size == 32 and processor.num_channels == 3
    assert processor.do_resize and processor.do_center_crop and processor.do_rescale and processor.do_normalize
    assert processor.resample == PIL.Image.Resampling.BICUBIC
    assert processor.rescale_factor == pytest.approx(1 / 255)
    assert processor.image_mean == [0.5, 0.5, 0.5] and processor.image_std == [0.5, 0.5, 0.5]
    assert DapsImageProcessor(num_channels=1).image_mean == [0.5]
    assert DapsImageProcessor(image_mean=0.25).image_mean == [0.25, 0.25, 0.25]


def test_save_and_load_round_trip(tmp_path):
    processor = DapsImageProcessor(image_size=28, num_channels=1, do_normalize=False, do_center_crop=False,
                                   resample=PIL.Image.Resampling.BILINEAR, image_mean=[0.1], image_std=[0.3])
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "DapsImageProcessor"
    assert saved["image_size"] == 28 and saved["num_channels"] == 1 and saved["resample"] == 2
    loaded = DapsImageProcessor.from_pretrained(tmp_path)
    for key in ("image_size", "num_channels", "do_resize", "resample", "do_center_crop", "do_rescale",
                "rescale_factor", "do_normalize", "image_mean", "image_std"):
        assert getattr(loaded, key) == getattr(processor, key), key
    image = random_uint8((28, 28), seed=19)
    np.testing.assert_array_equal(loaded(image).pixel_values, processor(image).pixel_values)
    # from_pretrained kwargs override saved settings
    assert DapsImageProcessor.from_pretrained(tmp_path, image_size=14).image_size == 14
    # and the JSON holds nothing the constructor cannot take back
    assert DapsImageProcessor(**saved).to_dict() == loaded.to_dict()


def test_from_model_config():
    bernoulli = DapsImageProcessor.from_model_config(
        SimpleNamespace(image_size=28, num_channels=1, likelihood="bernoulli"))
    assert (bernoulli.image_size, bernoulli.num_channels, bernoulli.do_normalize) == (28, 1, False)
    gaussian = DapsImageProcessor.from_model_config(
        SimpleNamespace(image_size=32, num_channels=3, likelihood="gaussian"))
    assert gaussian.do_normalize and gaussian.image_mean == [0.5] * 3 and gaussian.image_std == [0.5] * 3
    with pytest.raises(ValueError, match="likelihood must be one of .*'laplace'"):
        DapsImageProcessor.from_model_config(SimpleNamespace(image_size=32, num_channels=3, likelihood="laplace"))
    with pytest.raises(TypeError, match="without \\['likelihood'\\]"):
        DapsImageProcessor.from_model_config(SimpleNamespace(image_size=32, num_channels=3))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,exception,pattern",
    [
        ({"image_size": 0}, ValueError, "image_size must be a positive int, got 0"),
        ({"image_size": -4}, ValueError, "image_size must be a positive int, got -4"),
        ({"image_size": 32.0}, TypeError, "image_size must be an int"),
        ({"num_channels": 2}, ValueError, "num_channels must be 1 \\(grey\\) or 3 \\(RGB\\), got 2"),
        ({"num_channels": 4}, ValueError, "num_channels must be 1 \\(grey\\) or 3 \\(RGB\\), got 4"),
        ({"image_mean": [0.5, 0.5]}, ValueError,
         "image_mean must have one entry per channel \\(num_channels=3\\), got 2"),
        ({"num_channels": 1, "image_std": [0.5, 0.5, 0.5]}, ValueError, "image_std must have one entry per channel"),
        ({"image_std": 0.0}, ValueError, "image_std entries must be > 0"),
        ({"image_std": [0.5, 0.0, 0.5]}, ValueError, "image_std entries must be > 0"),
        ({"image_mean": float("nan")}, ValueError, "image_mean must be finite"),
        ({"image_mean": "0.5"}, TypeError, "image_mean must be a number or a list of numbers"),
        ({"resample": 17}, ValueError, "resample must be a PIL.Image.Resampling filter"),
        ({"rescale_factor": 0}, ValueError, "rescale_factor must be a finite number > 0"),
        ({"do_normalize": "yes"}, TypeError, "do_normalize must be True or False"),
    ],
)
def test_bad_settings(kwargs, exception, pattern):
    with pytest.raises(exception, match=pattern):
        DapsImageProcessor(**kwargs)
    if "image_size" in kwargs or "image_std" in kwargs:  # the same checks apply to per-call overrides
        with pytest.raises(exception, match=pattern):
            DapsImageProcessor(image_size=4)(np.zeros((4, 4, 3), np.uint8), **kwargs)


@pytest.mark.parametrize(
    "images,exception,pattern",
    [
        ("cat.png", TypeError,
         "expected a PIL.Image.Image, numpy.ndarray or torch.Tensor .*got str 'cat.png'.*PIL.Image.open"),
        ({"image": np.zeros((8, 8))}, TypeError, "got dict .*example\\['image'\\]"),
        (3.5, TypeError, "got float"),
        ([[0.0, 1.0], [1.0, 0.0]], TypeError, "got list .*Nested lists"),
        ([], ValueError, "expected at least one image, got an empty list"),
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "expected at least one image"),
        (np.zeros(8, np.uint8), ValueError, "expected a numpy array with 2 dims .* got 1 dims"),
        (torch.zeros(1, 1, 1, 8, 8), ValueError, "expected a tensor with 2 dims .* got 5 dims"),
        ([np.zeros((2, 8, 8, 3), np.uint8)], ValueError, "got 4 dims"),
        (np.zeros((8, 8, 5), np.uint8), ValueError, "expected 1, 2, 3 or 4 channels .*shape \\(8, 8, 5\\)"),
        (torch.zeros(6, 8, 8), ValueError, "expected 1, 2, 3 or 4 channels .*shape \\(6, 8, 8\\)"),
        (np.zeros((10, 8, 8), np.uint8), ValueError, "A batch of grey images needs a channel axis"),
        (np.zeros((0, 8), np.uint8), ValueError, "image 0 is empty"),
        (np.full((8, 8), np.nan, np.float32), ValueError, "contains 64 NaN or inf value"),
        (torch.full((3, 8, 8), float("inf")), ValueError, "NaN or inf"),
        (np.full((8, 8, 3), 255.0), ValueError, "float image with values in \\[255, 255\\], outside \\[0, 1\\]"),
        (-np.ones((8, 8)), ValueError, "outside \\[0, 1\\]"),
        (np.full((8, 8), 300, np.int64), ValueError, "integer \\(int64\\) values in \\[300, 300\\]; .* 0..255"),
        (np.zeros((8, 8), np.complex64), ValueError, "dtype complex64"),
        ([np.zeros((8, 8), np.uint8), "x"], TypeError, "for image 1"),
    ],
)
def test_bad_images(images, exception, pattern):
    with pytest.raises(exception, match=pattern):
        DapsImageProcessor(image_size=8)(images)


def test_bad_preprocess_arguments():
    processor = DapsImageProcessor(image_size=8)
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="return_tensors must be 'pt', 'np' or None, got 'tf'"):
        processor(image, return_tensors="tf")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['imagesize'\\]"):
        processor(image, imagesize=8)
    with pytest.raises(ValueError, match="is 4x6, smaller than image_size=8 .* do_resize=False"):
        processor(np.zeros((4, 6, 3), np.uint8), do_resize=False)
    with pytest.raises(ValueError, match="is 8x12 after resizing, but the model takes 8x8"):
        processor(np.zeros((8, 12, 3), np.uint8), do_center_crop=False)


def test_bad_postprocess_inputs():
    processor = DapsImageProcessor(image_size=8)
    good = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="output_type must be one of \\['pil', 'np', 'pt'\\], got 'png'"):
        processor.postprocess(good, output_type="png")
    with pytest.raises(ValueError, match="got 3 dims \\(3, 8, 8\\).*needs a batch axis"):
        processor.postprocess(good[0], output_type="np")
    with pytest.raises(ValueError, match="got 6 dims"):
        processor.postprocess(torch.zeros(1, 1, 1, 3, 8, 8))
    with pytest.raises(ValueError, match="expected 3 channel\\(s\\) on axis -3 .* got shape \\(2, 1, 8, 8\\)"):
        processor.postprocess(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="contain 1 NaN or inf"):
        bad = good.clone()
        bad[0, 0, 0, 0] = float("nan")
        processor.postprocess(bad)
    with pytest.raises(ValueError, match="expected float pixel values, got torch.Tensor .*uint8"):
        processor.postprocess(good.to(torch.uint8))
    with pytest.raises(ValueError, match="expected float pixel values, got numpy.ndarray .*int64"):
        processor.postprocess(np.zeros((2, 3, 8, 8), np.int64))
    with pytest.raises(TypeError, match="expected a torch.Tensor or numpy.ndarray .* got list"):
        processor.postprocess([good])
