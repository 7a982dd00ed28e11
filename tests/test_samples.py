"""The shipped sample images and their generator."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from router_tools import datasets as data
from edge_model.preprocess import to_pixels
from router_tools.samples import VARIANTS, build, label_of, main, sample_paths, slug


@pytest.fixture(scope="module")
def test_split() -> data.Split:
    return data.load_test()


def test_one_real_png_per_class(test_split):
    plain = [p for p in sample_paths() if not any(variant in p.name for variant, _ in VARIANTS)]
    assert len(plain) == 10
    assert sorted(label_of(p) for p in plain) == list(range(10))
    for p in plain:
        index = int(p.name[:4])
        assert label_of(p) == test_split.labels[index], p.name
        with Image.open(p) as im:
            assert im.mode == "L" and im.size == (28, 28)
        np.testing.assert_array_equal(to_pixels(p), test_split.images[index])


def test_variants_exercise_the_preprocessing(test_split):
    rgb = next(p for p in sample_paths() if "rgb-on-white" in p.name)
    rgba = next(p for p in sample_paths() if "rgba-transparent" in p.name)
    rotated = next(p for p in sample_paths() if "exif-rotated" in p.name)
    with Image.open(rgb) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (224, 224)
        assert np.asarray(im)[0, 0].min() > 240  # white background
    with Image.open(rgba) as im:
        assert im.format == "PNG" and im.mode == "RGBA"
        assert np.asarray(im)[..., 3].min() == 0  # really transparent somewhere
    with Image.open(rotated) as im:
        assert im.format == "JPEG" and im.getexif()[0x0112] == 6
    for path, tolerance in ((rgb, 10), (rgba, 6), (rotated, 8)):
        original = test_split.images[int(path.name[:4])].astype(int)
        err = np.abs(to_pixels(path).astype(int) - original).mean()
        assert err < tolerance, f"{path.name}: mean abs diff {err:.1f}"
    # Upright only because the orientation tag is honoured.
    stored = np.asarray(Image.open(rotated).convert("L").resize((28, 28))).astype(int)
    original = test_split.images[int(rotated.name[:4])].astype(int)
    assert np.abs(stored - original).mean() > 3 * np.abs(to_pixels(rotated).astype(int) - original).mean()


def test_samples_are_small():
    paths = sample_paths()
    assert 10 < len(paths) <= 16
    assert all(p.stat().st_size < 16_000 for p in paths)


def test_generator_is_deterministic_and_matches_the_shipped_files(tmp_path):
    first, second = build(), build()
    assert first == second
    assert main(["--out", str(tmp_path)]) == 0
    shipped = {p.name for p in sample_paths()}
    assert {p.name for p in tmp_path.iterdir()} == shipped == set(first)
    for name in shipped:
        # Same pixels as shipped (encoder versions may change the bytes, not the image).
        a = np.asarray(Image.open(io.BytesIO(first[name])), dtype=int)
        b = np.asarray(Image.open(data.SAMPLES_DIR / name), dtype=int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2, name


def test_label_names():
    assert slug("T-shirt/top") == "t-shirt-top" and slug("Ankle boot") == "ankle-boot"
    assert label_of("0042-ankle-boot.png") == 9
    assert label_of("/x/0019-t-shirt-top-exif-rotated.jpg") == 0
    for bad in ("42-ankle-boot.png", "0042-hat.png", "0042-ankle-boot.gif", "readme.txt"):
        with pytest.raises(ValueError, match="not a sample name"):
            label_of(bad)
