"""tokenize_dataset: codes equal model.encode's, kept columns, integer types, workers, bad rows."""

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tokenizer import DapsConfig, DapsImageProcessor, DapsModel, tokenize_dataset
from tokenizer.dataset_tokenization import code_dtype


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


def test_second_run_is_served_from_the_cache(model_and_processor, tmp_path):
    model, processor = model_and_processor
    dataset = make_dataset(8)
    dataset.save_to_disk(tmp_path / "ds")
    on_disk = datasets.load_from_disk(str(tmp_path / "ds"))
    first = tokenize_dataset(on_disk, model, processor, batch_size=4)
    second = tokenize_dataset(on_disk, model, processor, batch_size=4)
    assert first.cache_files and first.cache_files == second.cache_files
    assert first["codes"] == second["codes"]


def test_bad_arguments(model_and_processor):
    model, processor = model_and_processor
    dataset = make_dataset(2)
    with pytest.raises(ValueError, match="No column 'img'"):
        tokenize_dataset(dataset, model, processor, image_column="img")
    with pytest.raises(TypeError, match="datasets.Dataset"):
        tokenize_dataset(datasets.DatasetDict({"train": dataset}), model, processor)
    with pytest.raises(ValueError, match="batch_size"):
        tokenize_dataset(dataset, model, processor, batch_size=0)
