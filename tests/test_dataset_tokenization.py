"""tokenize_dataset: codes equal model.encode's, kept columns, integer types, workers, bad rows, the PNG batch path."""

import io
import struct
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer import DapsConfig, DapsImageProcessor, DapsModel, tokenize_dataset
from tokenizer import dataset_tokenization
from tokenizer.dataset_tokenization import _batch_pixel_values, _decode_png_batch, code_dtype


@pytest.fixture(scope="module")
def model_and_processor():
    torch.manual_seed(0)
    model = DapsModel(DapsConfig.from_preset("tiny")).eval()
    return model, DapsImageProcessor.from_model_config(model.config)


def make_dataset(n=24, size=16, modes=("RGB",)):
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(n):
        mode = modes[i % len(modes)]
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        array = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
        images.append(Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode))
        labels.append(i % 3)
    return datasets.Dataset.from_dict({"image": images, "label": labels},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.Value("int64")}))


def expected_codes(model, processor, dataset):
    pixel_values = processor([row["image"] for row in dataset], return_tensors="pt").pixel_values
    return model.encode(pixel_values).codes.numpy()


def test_codes_equal_model_encode_with_two_workers(model_and_processor, tmp_path):
    model, processor = model_and_processor
    dataset = make_dataset()
    tokenized = tokenize_dataset(dataset, model, processor, batch_size=5, num_proc=2)
    assert tokenized.column_names == ["image", "label", "codes"]
    codes = np.array(tokenized["codes"])
    np.testing.assert_array_equal(codes, expected_codes(model, processor, dataset))
    assert tokenized["label"] == dataset["label"]


def test_codes_column_uses_the_smallest_integer_type(model_and_processor):
    model, processor = model_and_processor
    tokenized = tokenize_dataset(make_dataset(6), model, processor, batch_size=4)
    feature = tokenized.features["codes"]
    assert feature.feature.dtype == "uint8" and feature.length == model.config.num_tokens
    assert code_dtype(256) == "uint8" and code_dtype(257) == "uint16" and code_dtype(65536) == "uint16"
    assert code_dtype(65537) == "uint32"


def test_grey_and_rgba_images_are_converted(model_and_processor):
    model, processor = model_and_processor
    dataset = make_dataset(9, modes=("L", "RGB", "RGBA"))
    tokenized = tokenize_dataset(dataset, model, processor, batch_size=4)
    assert len(tokenized) == 9
    grey = dataset[0]["image"].convert("RGB")
    pixel_values = processor([grey], return_tensors="pt").pixel_values
    assert tokenized[0]["codes"] == model.encode(pixel_values).codes[0].tolist()


def test_an_unreadable_image_names_its_row(model_and_processor):
    model, processor = model_and_processor
    good = io.BytesIO()
    Image.new("RGB", (16, 16)).save(good, format="PNG")
    rows = [{"bytes": good.getvalue(), "path": None}] * 3 + [{"bytes": b"definitely not an image", "path": None}]
    dataset = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(Exception, match="Row 3"):
        tokenize_dataset(dataset, model, processor, batch_size=2, load_from_cache_file=False)


def saved_and_loaded(dataset, folder):
    """The dataset written with save_to_disk and read back: a dataset with cache files, as `datasets` caches maps."""
    dataset.save_to_disk(folder)
    return datasets.load_from_disk(str(folder))


def test_second_run_is_served_from_the_cache(model_and_processor, tmp_path):
    model, processor = model_and_processor
    on_disk = saved_and_loaded(make_dataset(8), tmp_path / "ds")
    first = tokenize_dataset(on_disk, model, processor, batch_size=4)
    second = tokenize_dataset(on_disk, model, processor, batch_size=4)
    assert first.cache_files and first.cache_files == second.cache_files
    assert first["codes"] == second["codes"]


def test_searched_codes_equal_model_encode_and_have_their_own_cache(model_and_processor, tmp_path):
    model, processor = model_and_processor
    dataset = make_dataset(8)
    on_disk = saved_and_loaded(dataset, tmp_path / "ds")
    greedy = tokenize_dataset(on_disk, model, processor, batch_size=4)
    searched = tokenize_dataset(on_disk, model, processor, batch_size=4, search="parallel", num_candidates=3,
                                num_sweeps=2)
    pixel_values = processor([row["image"] for row in dataset], return_tensors="pt").pixel_values
    expected = model.encode(pixel_values, search="parallel", num_candidates=3, num_sweeps=2).codes.numpy()
    np.testing.assert_array_equal(np.array(searched["codes"]), expected)
    # Another search setting is another cache entry, never the greedy column served again.
    assert searched.cache_files != greedy.cache_files
    assert not np.array_equal(np.array(searched["codes"]), np.array(greedy["codes"]))
    again = tokenize_dataset(on_disk, model, processor, batch_size=4, search="parallel", num_candidates=3,
                             num_sweeps=2)
    assert again.cache_files == searched.cache_files
    # A search for PSNR is a cache entry of its own.
    for_psnr = tokenize_dataset(on_disk, model, processor, batch_size=4, search="parallel", num_candidates=3,
                                num_sweeps=2, search_objective="squared_error")
    assert for_psnr.cache_files != searched.cache_files
    expected = model.encode(pixel_values, search="parallel", num_candidates=3, num_sweeps=2,
                            search_objective="squared_error").codes.numpy()
    np.testing.assert_array_equal(np.array(for_psnr["codes"]), expected)
    with pytest.raises(ValueError, match="pass search="):
        tokenize_dataset(dataset, model, processor, search_objective="squared_error")
    with pytest.raises(ValueError, match="deterministic"):
        tokenize_dataset(dataset, model, processor, search="best-of-n")
    with pytest.raises(ValueError, match="num_sweeps"):
        tokenize_dataset(dataset, model, processor, search="local", num_sweeps=0)
    with pytest.raises(ValueError, match="num_candidates"):  # not silently truncated to 4
        tokenize_dataset(dataset, model, processor, search="local", num_candidates=4.7)


def test_bad_arguments(model_and_processor):
    model, processor = model_and_processor
    dataset = make_dataset(2)
    with pytest.raises(ValueError, match="No column 'img'"):
        tokenize_dataset(dataset, model, processor, image_column="img")
    with pytest.raises(TypeError, match="datasets.Dataset"):
        tokenize_dataset(datasets.DatasetDict({"train": dataset}), model, processor)
    with pytest.raises(ValueError, match="batch_size"):
        tokenize_dataset(dataset, model, processor, batch_size=0)


# ------------------------------------------------------------------ the batch path for plain PNGs

def png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def handmade_png(rng, size=16, colour=0, idat_parts=1, extra=(), rows=None, depth=8, first_filter=None):
    """A PNG written chunk by chunk: random filtered scanlines (every filter type, the first row's included,
    so Average and Paeth rows see the all-zero row above the image), the stream split over `idat_parts` IDATs."""
    channels = {0: 1, 2: 3}[colour]
    if rows is None:
        rows = rng.integers(0, 256, size=(size, 1 + size * channels), dtype=np.uint8)
        rows[:, 0] = np.arange(size) % 5
        rng.shuffle(rows[:, 0])
        if first_filter is not None:
            rows[0, 0] = first_filter
    stream = zlib.compress(rows.tobytes())
    cuts = np.linspace(0, len(stream), idat_parts + 1).astype(int)
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, depth, colour, 0, 0, 0)), *extra]
    chunks += [png_chunk(b"IDAT", stream[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + png_chunk(b"IEND", b"")


def pil_saved(image, **options):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def pil_pixels(data):
    array = np.asarray(Image.open(io.BytesIO(data)))
    return array[..., None] if array.ndim == 2 else array


def as_rows(files):
    return [{"bytes": data, "path": None} for data in files]


def test_batch_png_decoding_gives_the_pixels_pil_gives():
    rng = np.random.default_rng(1)
    text = png_chunk(b"tEXt", b"Comment\x00hello")
    for colour, mode in ((0, "L"), (2, "RGB")):
        files = [handmade_png(rng, colour=colour, idat_parts=1 + i % 3, extra=(text,) if i % 2 else (),
                              first_filter=i % 5)
                 for i in range(10)]
        array = rng.integers(0, 256, size=(16, 16, len(mode)), dtype=np.uint8)
        image = Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode=mode)
        files += [pil_saved(image), pil_saved(image, compress_level=0), pil_saved(image, optimize=True)]
        decoded = _decode_png_batch(as_rows(files), 16)
        assert decoded is not None and decoded.shape == (len(files), 16, 16, len(mode))
        np.testing.assert_array_equal(decoded, np.stack([pil_pixels(data) for data in files]))


def test_batch_png_decoding_declines_what_it_does_not_handle():
    rng = np.random.default_rng(2)
    good = handmade_png(rng)
    rgb = Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
    broken_header = bytearray(good)
    broken_header[20] ^= 1  # inside IHDR: its checksum no longer matches
    short_rows = np.zeros((15, 17), dtype=np.uint8)
    bad_filter = np.zeros((16, 17), dtype=np.uint8)
    bad_filter[3, 0] = 5
    cases = {
        "other size": handmade_png(rng, size=17),
        "palette": pil_saved(rgb.convert("P")),
        "RGBA": pil_saved(rgb.convert("RGBA")),
        "16-bit": pil_saved(Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16))),
        "bad IHDR checksum": bytes(broken_header),
        "not deflate data": good[:41] + b"junk" + good[45:],
        "too few rows": handmade_png(rng, rows=short_rows),
        "unknown filter type": handmade_png(rng, rows=bad_filter),
        "truncated": good[:-20],
        "not a PNG": b"definitely not an image",
    }
    assert _decode_png_batch(as_rows([good, good]), 16) is not None
    for name, data in cases.items():
        assert _decode_png_batch(as_rows([good, data, good]), 16) is None, name
    assert _decode_png_batch(as_rows([good, handmade_png(rng, colour=2)]), 16) is None  # mixed colour types
    assert _decode_png_batch([{"bytes": None, "path": "x.png"}], 16) is None
    assert _decode_png_batch([rgb], 16) is None


def test_batch_pixel_values_equal_the_processors():
    rng = np.random.default_rng(3)
    for settings in ({}, {"do_normalize": False}, {"do_rescale": False, "image_mean": [0.1, 0.2, 0.3]}):
        processor = DapsImageProcessor(image_size=16, num_channels=3, **settings)
        for channels in (1, 3):
            images = rng.integers(0, 256, size=(5, 16, 16, channels), dtype=np.uint8)
            expected = processor(list(images), return_tensors="pt").pixel_values
            got = _batch_pixel_values(processor, images)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
    grey = DapsImageProcessor(image_size=16, num_channels=1)
    rgb_images = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    assert _batch_pixel_values(grey, rgb_images) is None  # RGB → grey is left to the processor
    assert _batch_pixel_values(grey, rgb_images[..., :1][:, :8]) is None  # not the processor's size

    class Custom(DapsImageProcessor):
        pass

    assert _batch_pixel_values(Custom(image_size=16, num_channels=3), rgb_images) is None


def png_dataset(rng, n=11):
    files = [handmade_png(rng, colour=0) for _ in range(n)]
    return datasets.Dataset.from_dict({"image": as_rows(files), "label": list(range(n))},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.Value("int64")}))


def test_batch_path_is_taken_and_gives_the_per_row_paths_codes(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    dataset = png_dataset(np.random.default_rng(4))  # grey PNGs for an RGB model
    per_row = []
    monkeypatch.setattr(dataset_tokenization, "_decode_png_batch", lambda values, size: per_row.append(1))
    slow = tokenize_dataset(dataset, model, processor, batch_size=4, load_from_cache_file=False)
    monkeypatch.undo()
    assert per_row  # the per-row path ran

    def no_per_row_path(self, values, indices):
        raise AssertionError("the per-row path ran")

    monkeypatch.setattr(dataset_tokenization._Encoder, "_pixel_values", no_per_row_path)
    fast = tokenize_dataset(dataset, model, processor, batch_size=4, load_from_cache_file=False)
    assert fast["codes"] == slow["codes"] and fast["label"] == dataset["label"]
    np.testing.assert_array_equal(np.array(fast["codes"]), expected_codes(model, processor, dataset))


def test_batch_decoded_images_reach_a_custom_processor(model_and_processor):
    model, processor = model_and_processor

    class Custom(DapsImageProcessor):  # not batch-preprocessed: the decoded pixels go through preprocess
        pass

    custom = Custom.from_model_config(model.config)
    dataset = png_dataset(np.random.default_rng(5), n=6)
    tokenized = tokenize_dataset(dataset, model, custom, batch_size=4, load_from_cache_file=False)
    np.testing.assert_array_equal(np.array(tokenized["codes"]), expected_codes(model, processor, dataset))


def test_a_png_with_broken_image_data_names_its_row(model_and_processor):
    model, processor = model_and_processor
    rng = np.random.default_rng(6)
    files = [handmade_png(rng) for _ in range(5)]
    files[4] = files[4][:41] + b"junk" + files[4][45:]  # a valid header, then data that is not deflate
    dataset = datasets.Dataset.from_dict({"image": as_rows(files)},
                                         features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(ValueError, match="Row 4"):
        tokenize_dataset(dataset, model, processor, batch_size=3, load_from_cache_file=False)
