"""The built-in real data sets (emoji, digits, photos) and the ``load_dataset`` registry."""

from __future__ import annotations

import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from ldmkit.data import DATASETS, load_dataset
from ldmkit.data.base import Sample

# --- emoji -------------------------------------------------------------------------------------------


def test_emoji_has_at_least_1000_captioned_images() -> None:
    from ldmkit.data.emoji import EmojiDataset, emoji_codepoints

    every = emoji_codepoints(split="all")
    assert len(every) >= 1000
    assert every == sorted(every)
    train, held_out = EmojiDataset("train"), EmojiDataset("eval")
    assert len(train) + len(held_out) == len(every)
    assert set(train.codepoints).isdisjoint(held_out.codepoints)
    assert all(cp % 10 == 0 for cp in held_out.codepoints)
    sample = train[0]
    assert isinstance(sample, Sample)
    assert sample.image.shape == (32, 32, 3) and sample.image.dtype == np.uint8
    cp = int(sample.meta["codepoint"][2:], 16)
    assert sample.caption == unicodedata.name(chr(cp)).lower()
    grinning = EmojiDataset("all").codepoints.index(0x1F600)
    assert EmojiDataset("all")[grinning].caption == "grinning face"


def test_emoji_renders_on_white_at_64_and_is_deterministic() -> None:
    from ldmkit.data.emoji import EmojiDataset

    a, b = EmojiDataset("eval", size=64), EmojiDataset("eval", size=64)
    for i in (0, len(a) // 2, -1):
        image = a[i].image
        assert image.shape == (64, 64, 3)
        assert (image[0, 0] == 255).all() and (image[-1, -1] == 255).all()  # white corners
        assert image.std() > 5  # something was drawn
        np.testing.assert_array_equal(image, b[i].image)


@pytest.mark.slow
def test_every_emoji_renders_something() -> None:
    from ldmkit.data.emoji import EmojiDataset

    data = EmojiDataset("all", size=16)
    blank = [s.meta["codepoint"] for s in data[:] if s.image.min() > 250]
    assert not blank
    assert all(s.caption for s in data[:])


def test_emoji_missing_font_raises_the_install_hint(tmp_path, monkeypatch) -> None:
    from ldmkit.data.emoji import EmojiDataset

    hint = "emoji data needs the Debian package fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji)"
    with pytest.raises(FileNotFoundError, match=r"fonts-noto-color-emoji \(apt-get install") as err:
        EmojiDataset(font_path=tmp_path / "missing.ttf")
    assert hint in str(err.value)
    monkeypatch.setenv("LDMKIT_EMOJI_FONT", str(tmp_path / "missing.ttf"))
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        load_dataset("emoji")


def test_emoji_argument_validation() -> None:
    from ldmkit.data.emoji import EmojiDataset

    with pytest.raises(ValueError, match="split must be one of train, eval, all"):
        EmojiDataset("test")
    with pytest.raises(ValueError, match="size must be"):
        EmojiDataset(size=0)


# --- digits ------------------------------------------------------------------------------------------


def test_digits_counts_classes_and_split() -> None:
    from ldmkit.data.digits import DigitsDataset

    everything = DigitsDataset("all")
    assert len(everything) == 1797
    train, held_out = DigitsDataset("train"), DigitsDataset("eval")
    assert len(train) + len(held_out) == 1797
    assert set(train.indices.tolist()).isdisjoint(held_out.indices.tolist())
    labels = {int(t) for t in everything._targets}
    assert labels == set(range(10))
    sample = everything[7]
    assert sample.label == 7 and sample.caption == "the digit seven"
    assert sample.image.shape == (32, 32, 3) and sample.image.dtype == np.uint8
    assert sample.image.max() == 255 and sample.image.min() < 100  # white paper, dark ink
    assert DigitsDataset("eval", size=64)[0].image.shape == (64, 64, 3)


def test_digits_missing_sklearn_names_the_package(monkeypatch) -> None:
    from ldmkit.data import digits

    digits._load.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match="scikit-learn"):
            digits.DigitsDataset()
    finally:
        digits._load.cache_clear()


# --- photos ------------------------------------------------------------------------------------------


def test_photos_train_and_eval_never_share_a_photograph() -> None:
    from ldmkit.data.photos import EVAL_PHOTOS, PhotosDataset

    train = PhotosDataset("train", n=300, seed=0)
    held_out = PhotosDataset("eval")
    train_sources = {s.meta["source"] for s in train[:]}
    eval_sources = {s.meta["source"] for s in held_out[:]}
    assert len(train_sources) >= 10
    assert {src.split(":")[1] for src in eval_sources} == set(EVAL_PHOTOS)
    assert train_sources.isdisjoint(eval_sources)
    assert len(held_out) == 10 * len(EVAL_PHOTOS)
    for s in (train[0], held_out[0]):
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8 and s.caption


def test_photos_are_deterministic_by_seed() -> None:
    from ldmkit.data.photos import PhotosDataset

    a, b, c = (PhotosDataset("train", n=8, seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(a[i].image, b[i].image) for i in range(8))
    assert not all(np.array_equal(a[i].image, c[i].image) for i in range(8))
    e1, e2 = PhotosDataset("eval", seed=0, size=64), PhotosDataset("eval", seed=9, size=64)
    assert np.array_equal(e1[-1].image, e2[-1].image) and e1[-1].image.shape == (64, 64, 3)


def test_photos_argument_validation(monkeypatch) -> None:
    from ldmkit.data import photos

    with pytest.raises(ValueError, match="split must be one of train, eval"):
        photos.PhotosDataset("all")
    with pytest.raises(ValueError, match="n must be a positive integer"):
        photos.PhotosDataset(n=0)
    photos.load_photo.cache_clear()
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    try:
        with pytest.raises(ImportError, match="scikit-image"):
            photos.PhotosDataset("train")
    finally:
        photos.load_photo.cache_clear()


# --- registry ----------------------------------------------------------------------------------------


def test_registry_names_and_unknown_name() -> None:
    assert set(DATASETS) == {"shapes", "emoji", "digits", "photos"}
    with pytest.raises(ValueError, match="unknown data set 'mnist'; allowed: shapes, emoji, digits, photos"):
        load_dataset("mnist")
    assert len(load_dataset("digits", split="eval")) == 180
    assert len(load_dataset("photos", n=5)) == 5
    shapes = load_dataset("shapes", split="eval", length=3)
    assert len(shapes) == 3 and shapes[0].image.shape == (32, 32, 3)
    assert load_dataset("shapes", split="train-text", only_captioned=True).only_captioned


@pytest.mark.parametrize("name, allowed", [("shapes", "length, only_captioned"), ("photos", "n"), ("digits", "none")])
def test_unknown_data_set_option_names_it_and_the_options(name: str, allowed: str) -> None:
    from ldmkit.data import dataset_options

    assert (", ".join(dataset_options(name)) or "none") == allowed
    with pytest.raises(ValueError, match=f"data set '{name}' has no option 'colour'; its options: {allowed}$"):
        load_dataset(name, colour=1)


def test_registry_own_data(tmp_path) -> None:
    from PIL import Image

    Image.new("RGB", (10, 10), "red").save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "red"}\n')
    assert load_dataset(f"folder:{tmp_path}")[0].image.shape == (32, 32, 3)
    assert load_dataset(f"manifest:{tmp_path / 'm.jsonl'}", size=8)[0].caption == "red"
    assert load_dataset(tmp_path / "m.jsonl", size=None)[0].image.shape == (10, 10, 3)
    with pytest.raises(ValueError, match="split must be one of train, all for your own data"):
        load_dataset(str(tmp_path / "m.jsonl"), split="eval")


def test_importing_ldmkit_data_imports_no_optional_package() -> None:
    code = (
        "import sys, ldmkit.data; "
        "bad = [m for m in ('sklearn', 'skimage', 'ldmkit.data.emoji', 'ldmkit.data.shapes') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
