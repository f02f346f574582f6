"""Data: the built-in offline datasets, image folders, errors, the resumable sampler and binarisation."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from training import data
from training.data import (
    BUILTIN_DATASETS,
    PHOTO_NAMES,
    PHOTO_SPLITS,
    EpochSampler,
    ImageSplits,
    batch_iterator,
    binarize,
    binarize_fixed,
    load_image_splits,
)

# name -> (train, validation, test, channels, size)
EXPECTED = {
    "mnist-5k": (4000, 500, 500, 1, 28),
    "digits": (1439, 179, 179, 1, 8),
    "faces": (160, 20, 20, 1, 25),
}


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def _all_splits(s: ImageSplits):
    return (s.train, s.validation, s.test), (s.train_labels, s.validation_labels, s.test_labels)


# ----------------------------------------------------------------------------------------------- built-ins
@pytest.mark.parametrize("name", BUILTIN_DATASETS)
def test_builtin_shapes_dtypes_ranges(name):
    s = load_image_splits(name)
    assert s.name == name
    images, labels = _all_splits(s)
    for x, y in zip(images, labels):
        assert x.dtype == torch.float32 and x.ndim == 4 and x.is_contiguous()
        assert x.shape[1:] == (s.num_channels, s.image_size, s.image_size)
        assert torch.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0
        assert y is not None and y.dtype == torch.int64 and y.shape == (len(x),)
    assert s.train.max() > 0.9 and s.train.min() < 0.1  # really scaled to [0, 1], not 0..255 or 0..1/255
    if name in EXPECTED:
        n_train, n_val, n_test, c, size = EXPECTED[name]
        assert (len(s.train), len(s.validation), len(s.test)) == (n_train, n_val, n_test)
        assert (s.num_channels, s.image_size) == (c, size)
    else:  # photo-crops and its folds (fold 2 trains on the four smallest photographs)
        assert (s.num_channels, s.image_size) == (3, 32)
        assert 4_000 <= len(s.train) <= 30_000
        assert len(s.validation) >= 1000 and len(s.test) >= 1000
    line = s.describe()
    assert "\n" not in line and name in line
    assert all(str(n) in line for n in (len(s.train), len(s.validation), len(s.test)))
    assert f"{s.num_channels}×{s.image_size}×{s.image_size}" in line


def test_mnist_balanced_disjoint_and_labels_match_the_file():
    s = load_image_splits("mnist-5k")
    for y, per_class in zip(_all_splits(s)[1], (400, 50, 50)):
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
    train, val, test = (_rows(x) for x in _all_splits(s)[0])
    assert len(train) == 4000 and len(val) == 500 and len(test) == 500  # no image twice within a split
    assert not (train & test) and not (train & val) and not (val & test)
    # Every image keeps the label the file gives it (the label is the LAST column of the CSV).
    raw_images, raw_labels = data._raw_mnist()
    label_of = {img.astype(np.float32).tobytes(): int(lab) for img, lab in zip(raw_images.reshape(5000, -1), raw_labels)}
    for x, y in zip(*_all_splits(s)):
        pixels = (x.reshape(len(x), -1) * 255).round().numpy().astype(np.float32)
        assert [label_of[p.tobytes()] for p in pixels[:200]] == y[:200].tolist()
    # The splits are shuffled: a validation prefix is not one class (the file is sorted by class).
    assert len(set(s.validation_labels[:50].tolist())) >= 5


def test_digits_stratified_and_disjoint():
    s = load_image_splits("digits")
    counts = [torch.bincount(y, minlength=10) for y in _all_splits(s)[1]]
    total = sum(counts)
    for part, fraction in zip(counts, (0.8, 0.1, 0.1)):
        assert ((part.float() - fraction * total.float()).abs() <= 1.0).all()
    train, val, test = (_rows(x) for x in _all_splits(s)[0])
    assert not (train & test) and not (train & val) and not (val & test)
    assert len(train) + len(val) + len(test) == 1797
    assert torch.equal(s.train * 16, (s.train * 16).round())  # 0..16 scaled by 1/16


def test_faces_stratified_and_labelled():
    s = load_image_splits("faces")
    for y, per_class in zip(_all_splits(s)[1], (80, 10, 10)):
        assert torch.bincount(y, minlength=2).tolist() == [per_class, per_class]
    raw, _ = data._raw_faces()
    faces = {r.tobytes() for r in raw[:100].reshape(100, -1)}  # lfw_subset: the first 100 are the faces
    for x, y in zip(*_all_splits(s)):
        is_face = [row.tobytes() in faces for row in x.reshape(len(x), -1).numpy()]
        assert is_face == (y == 1).tolist()


def test_photo_crops_split_by_source_photo():
    assert "cat" not in PHOTO_SPLITS  # the same photograph as chelsea
    photos = {split: {p for p, v in PHOTO_SPLITS.items() if v == split} for split in ("train", "validation", "test")}
    assert set(PHOTO_SPLITS.values()) == set(photos)
    assert len(photos["validation"]) >= 2 and len(photos["test"]) >= 2
    s = load_image_splits("photo-crops")
    for split, y in zip(("train", "validation", "test"), _all_splits(s)[1]):
        sources = {PHOTO_NAMES[i] for i in y.unique().tolist()}
        assert sources == photos[split], split
    train, val, test = (_rows(x) for x in _all_splits(s)[0])
    assert not (train & val) and not (train & test) and not (val & test)


def test_photo_crop_folds_rotate_the_held_out_photographs():
    from training.arguments import DATASET_PRESETS

    assert data.photo_splits(0) == PHOTO_SPLITS
    assert {name for pair in data.PHOTO_PAIRS for name in pair} == set(PHOTO_NAMES)
    held = {name: [] for name in PHOTO_NAMES}
    everything = None
    for name, fold in data.PHOTO_FOLDS.items():
        assignment = data.photo_splits(fold)
        for photo, split in assignment.items():
            held[photo].append(split)
        s = load_image_splits(name)
        for split, y in zip(("train", "validation", "test"), _all_splits(s)[1]):
            assert {PHOTO_NAMES[i] for i in y.unique().tolist()} == {p for p, v in assignment.items() if v == split}
        train, val, test = (_rows(x) for x in _all_splits(s)[0])
        assert not (train & val) and not (train & test) and not (val & test)
        assert everything is None or train | val | test == everything   # the same crops, assigned differently
        everything = train | val | test
        assert data.photo_fold(name) == fold and DATASET_PRESETS[name] == "cifar"   # daps train's preset for it
    # Over the four folds every photograph is held out for test once and for validation once.
    assert all(sorted(splits) == ["test", "train", "train", "validation"] for splits in held.values())
    assert data.photo_fold("mnist-5k") is None
    for bad in (4, -1, True, 1.0):
        with pytest.raises(ValueError, match="fold"):
            data.photo_splits(bad)


def test_photo_crop_labels_name_the_photo_they_come_from():
    import skimage.data

    s = load_image_splits("photo-crops", seed=3)
    for x, y in zip(*_all_splits(s)):
        for i in (0, len(x) // 2, len(x) - 1):
            photo = Image.fromarray(getattr(skimage.data, PHOTO_NAMES[int(y[i])])()[..., :3])
            crop = (x[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            found = False
            for factor in data.PHOTO_SCALES:
                scaled = np.asarray(photo if factor == 1 else photo.reduce(factor))
                windows = np.lib.stride_tricks.sliding_window_view(scaled, (32, 32, 3))[::16, ::16, 0]
                found = found or bool((windows == crop).all(axis=(-3, -2, -1)).any())
            assert found, (PHOTO_NAMES[int(y[i])], i)


@pytest.mark.parametrize("name", ["mnist-5k", "faces", "photo-crops"])
def test_deterministic_given_seed_and_safe_to_mutate(name):
    a = load_image_splits(name, seed=5)
    a.train.add_(1.0)  # a caller mutating its tensors must not change the cached data
    b = load_image_splits(name, seed=5)
    c = load_image_splits(name, seed=5)
    assert torch.equal(b.train, c.train) and torch.equal(b.test, c.test) and torch.equal(b.test_labels, c.test_labels)
    assert b.train.max() <= 1.0
    other = load_image_splits(name, seed=6)
    assert not torch.equal(b.train, other.train)
    if name == "photo-crops":  # the split is fixed by the photo table; only the order follows the seed
        assert _rows(b.test) == _rows(other.test)


def test_builtin_resize_channels_and_max_images():
    s = load_image_splits("mnist-5k", image_size=32, num_channels=3, max_images=64)
    assert s.train.shape == (64, 3, 32, 32) and s.validation.shape == (64, 3, 32, 32) and len(s.test_labels) == 64
    assert torch.equal(s.train[:, 0], s.train[:, 1]) and torch.equal(s.train[:, 0], s.train[:, 2])
    assert s.train.min() >= 0.0 and s.train.max() <= 1.0
    native = load_image_splits("mnist-5k", max_images=64)
    assert torch.equal(native.train_labels, s.train_labels)
    # Resizing keeps the picture: downsampled back, it is close to the original.
    back = torch.nn.functional.interpolate(s.train[:, :1], size=(28, 28), mode="bilinear", antialias=True)
    assert (back - native.train).abs().mean() < 0.05
    rgb = load_image_splits("photo-crops", max_images=100)
    grey = load_image_splits("photo-crops", num_channels=1, max_images=100)
    luminance = (rgb.train * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert grey.train.shape == (100, 1, 32, 32) and torch.allclose(grey.train, luminance, atol=1e-5)
    small = load_image_splits("photo-crops", image_size=16, max_images=10)
    assert small.train.shape == (10, 3, 16, 16)


# ----------------------------------------------------------------------------------------------- folders, errors
@pytest.fixture
def isolated_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _solid(mode: str, size: tuple[int, int], value) -> Image.Image:
    return Image.new(mode, size, value)


def test_image_folder_mixed_modes_sizes_and_labels(tmp_path, isolated_datasets_cache):
    root = tmp_path / "imgs"
    # Solid colours, so every loaded image can be recognised after resizing; two classes from subfolders.
    expected = {}
    specs = [
        ("L", (30, 20), 128, (128 / 255,) * 3),
        ("RGB", (16, 16), (255, 0, 0), (1.0, 0.0, 0.0)),
        ("RGBA", (24, 40), (0, 0, 255, 255), (0.0, 0.0, 1.0)),
        ("RGBA", (12, 12), (0, 255, 0, 0), (1.0, 1.0, 1.0)),  # fully transparent: composited onto white
        ("RGB", (50, 10), (0, 255, 0), (0.0, 1.0, 0.0)),
        ("L", (9, 9), 0, (0.0, 0.0, 0.0)),
    ]
    for k in range(24):
        mode, size, value, colour = specs[k % len(specs)]
        folder = root / ("cats" if k % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        _solid(mode, size, value).save(folder / f"img{k:02d}.png")
        expected.setdefault("cats" if k % 2 else "dogs", []).append(colour)
    s = load_image_splits(str(root), image_size=8, seed=1)
    assert (len(s.train), len(s.validation), len(s.test)) == (22, 1, 1)  # 90/5/5 with at least one each
    assert s.num_channels == 3 and s.image_size == 8  # any colour image makes the dataset RGB
    found = []
    for x, y in zip(*_all_splits(s)):
        assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32
        assert y is not None and set(y.tolist()) <= {0, 1}
        for image, label in zip(x, y):
            assert (image - image[:, :1, :1]).abs().max() < 1e-5  # still a solid image
            colour = tuple(round(v, 3) for v in image[:, 0, 0].tolist())
            found.append((("cats", "dogs")[int(label)], colour))  # ClassLabel order: sorted folder names
    wanted = sorted((cls, tuple(round(v, 3) for v in c)) for cls, cs in expected.items() for c in cs)
    assert sorted(found) == wanted
    again = load_image_splits(str(root), image_size=8, seed=1)
    assert torch.equal(again.train, s.train) and torch.equal(again.train_labels, s.train_labels)
    grey = load_image_splits(str(root), image_size=8, num_channels=1, max_images=5)
    assert grey.train.shape == (5, 1, 8, 8) and grey.validation.shape == (1, 1, 8, 8)


def test_image_folder_grey_natural_size_and_named_splits(tmp_path, isolated_datasets_cache):
    root = tmp_path / "grey"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        (root / split).mkdir(parents=True)
        for k in range(n):
            size = (20, 14) if k == 1 else (12, 12)  # an odd size: resized and centre-cropped to the first's 12×12
            Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L").save(root / split / f"{k}.png")
    s = load_image_splits(str(root))
    assert (len(s.train), len(s.validation), len(s.test)) == (6, 2, 3)  # existing splits used ("val" included)
    assert s.num_channels == 1 and s.image_size == 12
    assert s.train_labels is None  # no class subfolders


def test_image_folder_bad_file_names_the_row(tmp_path, isolated_datasets_cache):
    root = tmp_path / "bad"
    root.mkdir()
    for k in range(5):
        _solid("RGB", (8, 8), (k * 40, 0, 0)).save(root / f"ok{k}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match=r"row \d+.*broken\.png"):
        load_image_splits(str(root), image_size=8)


def test_empty_or_imageless_folder_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_image_splits(str(empty))
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no image files"):
        load_image_splits(str(empty))


def test_argument_and_name_errors(tmp_path, isolated_datasets_cache):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            load_image_splits("digits", image_size=bad)
    for bad in (0, 2, 4):
        with pytest.raises(ValueError, match="num_channels"):
            load_image_splits("digits", num_channels=bad)
    with pytest.raises(ValueError, match="max_images"):
        load_image_splits("digits", max_images=0)
    with pytest.raises(ValueError, match="could not load dataset"):
        load_image_splits(str(tmp_path / "no" / "such" / "folder"))
    started = time.perf_counter()
    with pytest.raises(ValueError, match="could not load dataset 'nobody/no-such-dataset'"):
        load_image_splits("nobody/no-such-dataset")  # offline: fails at once, never downloads
    assert time.perf_counter() - started < 5.0


# ----------------------------------------------------------------------------------------------- batching
def test_epoch_sampler_resume_matches_uninterrupted_run():
    reference = EpochSampler(23, 5, seed=7)
    uninterrupted = [next(reference).tolist() for _ in range(30)]
    first = EpochSampler(23, 5, seed=7)
    head = [next(first).tolist() for _ in range(11)]
    state = json.loads(json.dumps(first.state_dict()))  # survives the JSON trainer state
    resumed = EpochSampler(23, 5, seed=7)
    resumed.load_state_dict(state)
    tail = [next(resumed).tolist() for _ in range(19)]
    assert head + tail == uninterrupted
    with pytest.raises(ValueError):
        EpochSampler(24, 5, seed=7).load_state_dict(state)  # different data: not an exact resume


def test_epoch_sampler_epochs_are_permutations():
    sampler = EpochSampler(23, 5, seed=0)
    epochs = [[next(sampler) for _ in range(len(sampler))] for _ in range(3)]
    assert len(sampler) == 4
    for batches in epochs:  # drop_last: 4 full batches, no index twice within an epoch
        assert all(b.dtype == torch.int64 and len(b) == 5 for b in batches)
        flat = torch.cat(batches)
        assert len(set(flat.tolist())) == 20 and flat.max() < 23
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))  # a new shuffle each epoch
    full = EpochSampler(23, 5, seed=0, drop_last=False)
    assert len(full) == 5
    epoch = [next(full) for _ in range(5)]
    assert [len(b) for b in epoch] == [5, 5, 5, 5, 3] and sorted(torch.cat(epoch).tolist()) == list(range(23))
    assert not torch.equal(torch.cat(epochs[0]), torch.cat([next(EpochSampler(23, 5, seed=1)) for _ in range(4)]))
    with pytest.raises(ValueError):
        EpochSampler(3, 5, seed=0)


def test_batch_iterator_is_deterministic():
    images = torch.arange(40, dtype=torch.float32).view(10, 1, 2, 2)
    a, b = batch_iterator(images, 4, seed=3), batch_iterator(images, 4, seed=3)
    for _ in range(7):  # past several epochs
        x, y = next(a), next(b)
        assert x.shape == (4, 1, 2, 2) and torch.equal(x, y)


# ----------------------------------------------------------------------------------------------- binarisation
def test_binarize_values_and_mean():
    x = torch.full((64, 1, 32, 32), 0.3)
    g = torch.Generator().manual_seed(0)
    b = binarize(x, generator=g)
    assert b.dtype == x.dtype and b.shape == x.shape
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert abs(b.mean().item() - 0.3) < 0.01
    assert not torch.equal(b, binarize(x, generator=g))  # dynamic: a fresh draw each call
    edges = torch.tensor([0.0, 1.0]).repeat(1000)
    assert torch.equal(binarize(edges), edges)  # p = 0 and p = 1 are exact
    fixed = binarize_fixed(x, seed=0)
    assert torch.equal(fixed, binarize_fixed(x, seed=0)) and not torch.equal(fixed, binarize_fixed(x, seed=1))
    assert torch.equal(binarize_fixed(x[:10], seed=0), fixed[:10])  # a prefix of the images, a prefix of the draws
    images = load_image_splits("mnist-5k", max_images=200).validation
    assert abs(binarize_fixed(images).mean().item() - images.mean().item()) < 0.01


def test_hub_dataset_splits_labels_and_array_images(monkeypatch):
    """A Hub dataset (here an in-memory stand-in for `datasets.load_dataset(name)`): "valid" is the validation
    split, a missing test split is carved from train, string labels are numbered, array images are accepted."""
    import datasets

    rng = np.random.default_rng(0)
    def part(n, offset):
        return datasets.Dataset.from_dict({
            "img": [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(n)],
            "kind": [("b", "a", "c")[(k + offset) % 3] for k in range(n)],
        })
    fake = datasets.DatasetDict({"train": part(40, 0), "valid": part(6, 1)})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: fake)
    s = load_image_splits("someone/tiny", image_column="img", label_column="kind", image_size=4)
    assert (len(s.train), len(s.validation), len(s.test)) == (38, 6, 2)
    assert s.train.shape[1:] == (3, 4, 4)
    assert sorted(torch.bincount(s.validation_labels, minlength=3).tolist()) == [2, 2, 2]
    assert set(s.train_labels.tolist()) == {0, 1, 2}
    no_labels = load_image_splits("someone/tiny", image_column="img", label_column="missing")
    assert no_labels.train_labels is None and no_labels.image_size == 6
    with pytest.raises(ValueError, match="no column 'image'"):
        load_image_splits("someone/tiny")


def test_augment_images_flips_about_half_reproducibly():
    from training.data import augment_images

    images = torch.rand(200, 3, 4, 5)
    out = augment_images(images, seed=0, step=7, flip=True)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    kept = (out == images).flatten(1).all(1)
    assert bool((flipped | kept).all()) and 70 < int(flipped.sum()) < 130
    assert torch.equal(out, augment_images(images, seed=0, step=7, flip=True))   # the same step draws the same flips
    assert not torch.equal(out, augment_images(images, seed=0, step=8, flip=True))   # the next step draws new ones
    assert not torch.equal(out, augment_images(images, seed=1, step=7, flip=True))
    assert torch.equal(augment_images(images, seed=0, step=7), images)               # nothing asked, nothing done


def test_augment_images_rotates_and_permutes_channels_per_image():
    from itertools import permutations

    from training.data import augment_images

    images = torch.rand(400, 3, 6, 6)
    rotated = augment_images(images, seed=3, step=1, rotate=True)
    turns = torch.stack([(rotated == torch.rot90(images, k, dims=(-2, -1))).flatten(1).all(1) for k in range(4)], 1)
    assert bool((turns.sum(1) == 1).all())                      # every image is exactly one of its four rotations
    assert all(60 < int(count) < 140 for count in turns.sum(0))  # and each rotation is drawn about a quarter of the time
    permuted = augment_images(images, seed=3, step=1, permute_channels=True)
    orders = torch.stack([(permuted == images[:, list(order)]).flatten(1).all(1)
                          for order in permutations(range(3))], 1)
    assert bool((orders.sum(1) == 1).all()) and all(30 < int(count) < 110 for count in orders.sum(0))
    # The flips are drawn first: adding the other augmentations leaves each image's flip unchanged.
    both = augment_images(images, seed=3, step=1, flip=True, rotate=True, permute_channels=True)
    flipped = augment_images(images, seed=3, step=1, flip=True)
    assert torch.equal(both, augment_images(flipped, seed=3, step=1, rotate=True, permute_channels=True))
    with pytest.raises(ValueError, match="square"):
        augment_images(torch.rand(2, 3, 4, 5), seed=0, step=0, rotate=True)
    with pytest.raises(ValueError, match="more than one channel"):
        augment_images(torch.rand(2, 1, 4, 4), seed=0, step=0, permute_channels=True)


def test_augment_images_shifts_each_image_by_a_drawn_offset():
    from training.data import augment_images

    def moved(image, dy, dx):    # written out: pixel (i, j) reads (i − dy, j − dx), clamped to the image
        h, w = image.shape[-2:]
        out = torch.empty_like(image)
        for i in range(h):
            for j in range(w):
                out[:, i, j] = image[:, min(max(i - dy, 0), h - 1), min(max(j - dx, 0), w - 1)]
        return out

    images = torch.rand(150, 2, 7, 8)
    out = augment_images(images, seed=2, step=5, shift=2)
    assert out.shape == images.shape
    offsets = []
    for image, result in zip(images, out):
        matches = [(y, x) for y in range(-2, 3) for x in range(-2, 3) if torch.equal(result, moved(image, y, x))]
        assert len(matches) == 1                                       # each image is one translation of itself
        offsets += matches
    assert set(offsets) == {(y, x) for y in range(-2, 3) for x in range(-2, 3)}   # and every offset is drawn
    # A lit pixel in the middle of a dark image moves by that offset, alone (content moves by +dy, +dx).
    dot = torch.zeros(150, 2, 7, 8)                                    # the same shape draws the same offsets
    dot[:, :, 3, 4] = 1.0
    where = augment_images(dot, seed=2, step=5, shift=2)[:, 0].flatten(1).argmax(1)
    assert list(zip((where // 8 - 3).tolist(), (where % 8 - 4).tolist())) == offsets
    assert torch.equal(out, augment_images(images, seed=2, step=5, shift=2))
    assert not torch.equal(out, augment_images(images, seed=2, step=6, shift=2))
    # The border a shift uncovers repeats the edge pixels: a constant image stays constant, a ramp stays a ramp.
    flat = torch.full((20, 1, 9, 9), 0.7)
    assert torch.equal(augment_images(flat, seed=0, step=0, shift=3), flat)
    ramp = torch.arange(9.0).expand(20, 1, 9, 9).contiguous()          # columns 0..8
    assert bool((augment_images(ramp, seed=0, step=0, shift=3).diff(dim=-1) >= 0).all())
    # Drawn after the flips: adding the shift leaves each image's flip unchanged.
    pictures = torch.rand(50, 1, 9, 9)
    both = augment_images(pictures, seed=1, step=3, flip=True, shift=1)
    assert torch.equal(both, augment_images(augment_images(pictures, seed=1, step=3, flip=True), seed=1, step=3,
                                            shift=1))
    assert torch.equal(augment_images(pictures, seed=1, step=3, shift=0), pictures)
    for bad in (-1, 9, 1.5, True):
        with pytest.raises(ValueError, match="shift must be an integer"):
            augment_images(pictures, seed=0, step=0, shift=bad)
