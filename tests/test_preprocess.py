"""Shared preprocessing: every input kind and image mode, EXIF, resizing, normalisation, hostile input.

Real encoded files are made with Pillow in the test; nothing under test is mocked.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from router_tools import datasets as data
from edge_model.errors import ArrayInputError, ImageDecodeError, ImageTooLarge, InputError
from edge_model.manifest import Manifest
from edge_model.preprocess import PreprocessConfig, normalise, preprocess, preprocess_batch, to_pixels
from edge_model.runtime import DEFAULT_EDGE_MANIFEST

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    """A real test-split image: uint8 [28, 28], light object on black."""
    return data.load_test().images[0].copy()


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def gray_png(width: int, height: int, idat: bytes = b"") -> bytes:
    """A syntactically valid 8-bit grayscale PNG whose header declares ``width x height``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def zero_png(width: int, height: int) -> bytes:
    """A complete all-black PNG, compressed row by row (never holding the raw image)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return gray_png(width, height, idat)


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 header is rewritten to claim ``width x height``."""
    raw = bytearray(encode(Image.new("L", (16, 16), 128), "JPEG"))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def bounded(fn, *, max_seconds: float = 2.0, max_peak_bytes: int = 4 * 1024 * 1024):
    """Run ``fn`` expecting an exception; check it came fast and without a large Python allocation."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(InputError) as info:
            fn()
    finally:
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < max_seconds, f"took {elapsed:.2f}s"
    assert peak < max_peak_bytes, f"peak Python allocation {peak / 1e6:.1f} MB"
    return info


# --------------------------------------------------------------------------- input kinds

def _inputs(sample: np.ndarray, tmp_path: Path):
    png = encode(Image.fromarray(sample), "PNG")
    path = tmp_path / "sample.png"
    path.write_bytes(png)
    return {
        "str-path": lambda: str(path),
        "pathlib": lambda: path,
        "bytes": lambda: png,
        "bytearray": lambda: bytearray(png),
        "memoryview": lambda: memoryview(png),
        "bytesio": lambda: io.BytesIO(png),
        "binary-file": lambda: open(path, "rb"),
        "pil-lazy": lambda: Image.open(io.BytesIO(png)),
        "pil-loaded": lambda: Image.fromarray(sample),
        "numpy": lambda: sample.copy(),
    }


KINDS = ["str-path", "pathlib", "bytes", "bytearray", "memoryview", "bytesio", "binary-file", "pil-lazy", "pil-loaded", "numpy"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_input_kind_gives_the_same_pixels(kind, sample, tmp_path):
    value = _inputs(sample, tmp_path)[kind]()
    try:
        pixels = to_pixels(value)
        x = preprocess(_rewind(value) if isinstance(value, io.IOBase) else value)
    finally:
        if hasattr(value, "close") and not isinstance(value, Image.Image):
            value.close()
    assert pixels.dtype == np.uint8 and pixels.shape == (28, 28)
    np.testing.assert_array_equal(pixels, sample)  # PNG is lossless: bit-exact
    assert x.dtype == np.float32 and x.shape == (1, 28, 28)
    np.testing.assert_array_equal(x, normalise(sample)[None])


def _rewind(fh):
    fh.seek(0)
    return fh


def test_preprocess_batch_mixes_kinds(sample, tmp_path):
    inputs = _inputs(sample, tmp_path)
    batch = [inputs[k]() for k in ("bytes", "pathlib", "numpy", "pil-loaded")]
    batch.append(normalise(sample))  # already model input
    x = preprocess_batch(batch, normalised=True)
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    for row in x:
        np.testing.assert_array_equal(row[0], normalise(sample))


def test_preprocess_batch_accepts_a_uint8_array_batch(sample):
    images = data.load_test().images[:6]
    x = preprocess_batch(images)
    np.testing.assert_array_equal(x[:, 0], normalise(images))


def test_preprocess_batch_names_the_failing_index(sample):
    with pytest.raises(ImageDecodeError, match=r"^image 2: .*not a recognised image"):
        preprocess_batch([sample, sample, b"definitely not an image", sample])
    with pytest.raises(ArrayInputError, match=r"^image 1: "):
        preprocess_batch([sample, np.full((28, 28), np.nan)])


def test_caller_pil_image_is_not_altered(tmp_path):
    # A large JPEG opened lazily by the caller: the reduced-scale draft must not shrink *their* object.
    big = Image.new("RGB", (640, 480), (0, 0, 0))
    ImageDraw.Draw(big).ellipse([200, 100, 440, 380], fill=(220, 220, 220))
    im = Image.open(io.BytesIO(encode(big, "JPEG")))
    to_pixels(im)
    assert im.size == (640, 480) and im.mode == "RGB"


# --------------------------------------------------------------------------- image modes

def _modes(g: np.ndarray):
    """(mode, PIL image, expected uint8 pixels, tolerance) built from the real sample ``g``."""
    opaque = np.full_like(g, 255)
    rgb = np.dstack([g, g, g])
    p = Image.fromarray(g, "L").convert("P")  # grey palette, one index per grey level
    p.info["transparency"] = p.getpixel((0, 0))  # the black background index is transparent
    binary = (g >= 128).astype(np.uint8) * 255
    return [
        ("L", Image.fromarray(g, "L"), g, 0),
        ("LA", Image.fromarray(np.dstack([g, opaque]), "LA"), g, 0),
        ("RGB", Image.fromarray(rgb, "RGB"), g, 0),
        ("RGBA", Image.fromarray(np.dstack([rgb, opaque]), "RGBA"), g, 0),
        ("P+transparency", p, g, 0),
        ("P", Image.fromarray(g, "L").convert("P"), g, 0),
        ("I;16", Image.fromarray(g.astype(np.uint16) * 257), g, 0),
        ("I", Image.fromarray(g.astype(np.int32), "I"), g, 0),
        ("F", Image.fromarray(g.astype(np.float32) / 255, "F"), g, 0),
        ("CMYK", Image.fromarray(rgb, "RGB").convert("CMYK"), g, 1),
        ("1", Image.fromarray(binary, "L").convert("1"), binary, 0),
        ("YCbCr", Image.fromarray(rgb, "RGB").convert("YCbCr"), g, 2),
    ]


MODES = ["L", "LA", "RGB", "RGBA", "P+transparency", "P", "I;16", "I", "F", "CMYK", "1", "YCbCr"]
# Formats that store each mode losslessly, to exercise the decoders as well as PIL objects.
ENCODED = {"L": "PNG", "LA": "PNG", "RGB": "PNG", "RGBA": "PNG", "P+transparency": "PNG", "P": "GIF",
           "I;16": "PNG", "I": "TIFF", "F": "TIFF", "CMYK": "TIFF", "1": "PNG", "YCbCr": None}


@pytest.mark.parametrize(
    "mode, via", [(m, "pil") for m in MODES] + [(m, "encoded") for m in MODES if ENCODED[m]]
)
def test_every_mode(mode, via, sample):
    _, im, expected, tol = next(m for m in _modes(sample) if m[0] == mode)
    if via == "encoded":
        fmt = ENCODED[mode]
        blob = encode(im, fmt, **({"transparency": im.info["transparency"]} if "transparency" in im.info else {}))
        reopened = Image.open(io.BytesIO(blob))
        assert reopened.mode.split(";")[0] == im.mode.split(";")[0] or mode.startswith("P"), reopened.mode
        im = blob
    pixels = to_pixels(im)
    assert pixels.dtype == np.uint8 and pixels.shape == (28, 28)
    diff = np.abs(pixels.astype(int) - expected.astype(int))
    assert diff.max() <= tol, f"{mode} via {via}: max diff {diff.max()}"


def test_transparent_background_becomes_black(sample):
    # A light object cut out on transparency: transparent pixels take the training background.
    rgba = np.dstack([np.full_like(sample, 255)] * 3 + [sample])  # white, alpha = the object
    pixels = to_pixels(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(pixels, sample)


def test_dark_icon_on_transparency_does_not_vanish():
    im = Image.new("RGBA", (56, 56), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle([14, 8, 41, 47], fill=(10, 10, 10, 255))
    pixels = to_pixels(encode(im, "PNG"))
    assert pixels[14, 14] > 200 and pixels[0, 0] < 30 and pixels[27, 13] < 30  # light object on black


def test_sixteen_bit_png_uses_the_full_range():
    ramp = (np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) * 65535 // (28 * 28 - 1)).astype(np.uint16)
    pixels = to_pixels(encode(Image.fromarray(ramp), "PNG"), PreprocessConfig(invert="never"))
    np.testing.assert_array_equal(pixels, np.rint(ramp / 257.0).astype(np.uint8))


def test_uint16_array_is_scaled(sample):
    np.testing.assert_array_equal(to_pixels(sample.astype(np.uint16) * 257), sample)
    np.testing.assert_array_equal(to_pixels((sample.astype(np.uint16) * 257).astype(">u2")), sample)


@pytest.mark.parametrize("shape", [(28, 28, 1), (28, 28, 3), (28, 28, 4)])
def test_channel_arrays(shape, sample):
    arr = np.repeat(sample[:, :, None], shape[2], axis=2)
    if shape[2] == 4:
        arr[:, :, 3] = 255
    np.testing.assert_array_equal(to_pixels(arr), sample)


# --------------------------------------------------------------------------- EXIF orientation

def _asymmetric() -> np.ndarray:
    """64 wide x 32 high, dark background, distinct blocks so every flip/rotation is visible."""
    a = np.zeros((32, 64), dtype=np.uint8)
    a[2:14, 2:22] = 250  # top-left, wide
    a[20:30, 48:60] = 150  # bottom-right
    a[2:8, 40:46] = 90  # top, right of centre
    return a


# EXIF orientation -> the transform that makes the stored pixels upright (EXIF 2.3, tag 0x0112).
ORIENTATIONS = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).T,
    8: lambda a: np.rot90(a, 1),  # rotate 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_honoured(orientation):
    stored = _asymmetric()
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg = encode(Image.fromarray(stored, "L"), "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(jpeg)).getexif()[0x0112] == orientation

    got = to_pixels(jpeg).astype(int)
    expected = to_pixels(np.ascontiguousarray(ORIENTATIONS[orientation](stored))).astype(int)
    ignored = to_pixels(stored).astype(int)
    err = np.abs(got - expected).mean()
    assert err < 2.0, f"orientation {orientation}: mean abs diff {err:.2f} from the upright image"
    assert np.abs(got - ignored).mean() > 10 * max(err, 0.5), "orientation was not applied"


def test_exif_orientation_of_an_rgb_photo_on_white():
    # The same through the full path: RGB, white background (auto-inverted), downscaled.
    stored = 255 - np.kron(_asymmetric(), np.ones((8, 8), dtype=np.uint8))  # 512x256, dark on white
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = encode(Image.fromarray(np.dstack([stored] * 3), "RGB"), "JPEG", quality=95, exif=exif.tobytes())
    got = to_pixels(jpeg).astype(int)
    expected = (255 - to_pixels(np.ascontiguousarray(np.rot90(stored, -1)))).astype(int)
    assert np.abs(got - expected).mean() < 3.0


# --------------------------------------------------------------------------- resizing

@pytest.mark.parametrize("size", [(1, 1), (5, 3), (27, 29), (300, 300), (3, 500), (1000, 40), (2000, 1500)])
def test_any_size_becomes_28x28(size):
    im = Image.new("L", size, 0)
    ImageDraw.Draw(im).rectangle([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=255)
    for value in (im, encode(im, "PNG")):
        pixels = to_pixels(value)
        assert pixels.shape == (28, 28) and pixels.dtype == np.uint8


def _bright_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero((pixels > 100).any(1)), np.flatnonzero((pixels > 100).any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def test_resize_keeps_aspect_ratio():
    # 280 x 140 black with a 200 x 100 bright box: scaled by 1/10 to 28 x 14, centred vertically
    # on the black border colour -> a 20 x 10 box at rows 9..19, columns 4..24.
    wide = Image.new("L", (280, 140), 0)
    ImageDraw.Draw(wide).rectangle([40, 20, 239, 119], fill=220)
    pixels = to_pixels(encode(wide, "PNG"))
    top, bottom, left, right = _bright_box(pixels)
    assert (top, bottom, left, right) == (9, 19, 4, 24)
    assert (pixels[:7] == 0).all() and (pixels[21:] == 0).all()
    # The same transposed, as a numpy array: a 10 x 20 box, padded left and right.
    tall = to_pixels(np.ascontiguousarray(np.asarray(wide).T))
    assert _bright_box(tall) == (4, 24, 9, 19)
    assert (tall[:, :7] == 0).all() and (tall[:, 21:] == 0).all()


def test_padding_takes_the_border_colour():
    # A mid-grey photo background stays mid-grey in the padding, not a black bar.
    im = Image.new("L", (280, 140), 90)
    ImageDraw.Draw(im).rectangle([100, 40, 179, 99], fill=250)
    pixels = to_pixels(encode(im, "PNG"))
    assert (pixels[:7] == 90).all() and (pixels[21:] == 90).all()


def test_downscale_matches_the_original(sample):
    # The real image upscaled 8x and brought back: close to the original pixels.
    big = Image.fromarray(sample).resize((224, 224), Image.Resampling.NEAREST)
    pixels = to_pixels(encode(big, "PNG"))
    assert np.abs(pixels.astype(int) - sample.astype(int)).mean() < 4


def test_large_jpeg_photo_decodes_at_reduced_scale():
    photo = Image.new("RGB", (3000, 2000), (255, 255, 255))
    ImageDraw.Draw(photo).ellipse([1000, 400, 2000, 1600], fill=(30, 30, 30))
    pixels = to_pixels(encode(photo, "JPEG", quality=80))
    # White background inverted to black; the dark ellipse becomes the bright object.
    assert pixels[14, 14] > 200 and pixels[1, 1] < 30 and pixels.shape == (28, 28)


# --------------------------------------------------------------------------- straight through, normalisation

def test_28x28_uint8_array_goes_straight_through_bit_exact(sample):
    np.testing.assert_array_equal(to_pixels(sample), sample)
    bright = 255 - sample  # bright border: arrays are never auto-inverted
    np.testing.assert_array_equal(to_pixels(bright), bright)
    x = preprocess(sample)
    expected = (sample.astype(np.float32) / np.float32(255) - np.float32(0.286)) / np.float32(0.353)
    np.testing.assert_array_equal(x[0], expected)


def test_normalisation_equals_training():
    """The manifest's mean/std, the training formula, bit for bit on the real test split."""
    manifest = Manifest.load(DEFAULT_EDGE_MANIFEST)
    config = PreprocessConfig.from_input_spec(manifest.input)
    images = data.load_test().images[:256]
    x = preprocess_batch(images, config)

    mean, std = manifest.input.mean, manifest.input.std
    expected = ((images.astype(np.float32) / 255.0 - mean) / std)[:, None]
    np.testing.assert_array_equal(x, expected)

    from router_tools import train  # numpy-only at import; torch is imported inside its functions

    assert (train.MEAN, train.STD) == (mean, std)
    np.testing.assert_array_equal(x, train.normalise(images))


def test_config_defaults_match_the_shipped_manifest():
    spec = Manifest.load(DEFAULT_EDGE_MANIFEST).input
    default = PreprocessConfig()
    assert (default.mean, default.std, default.height, default.width) == (spec.mean, spec.std, spec.height, spec.width)


def test_bright_background_is_inverted(sample):
    photo = 255 - sample  # dark object on white, like a product photo
    blob = encode(Image.fromarray(np.dstack([photo] * 3), "RGB"), "PNG")
    np.testing.assert_array_equal(to_pixels(blob), sample)
    np.testing.assert_array_equal(to_pixels(blob, PreprocessConfig(invert="never")), photo)
    dark = encode(Image.fromarray(sample), "PNG")
    np.testing.assert_array_equal(to_pixels(dark), sample)  # dark background: untouched
    np.testing.assert_array_equal(to_pixels(dark, PreprocessConfig(invert="always")), photo)


@pytest.mark.parametrize("shape", [(28, 28), (1, 28, 28), (1, 1, 28, 28)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_float_model_input_passes_through(shape, dtype, sample):
    x = normalise(sample).astype(dtype).reshape(shape)
    out = preprocess(x, normalised=True)
    assert out.shape == (1, 28, 28) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], x.reshape(28, 28).astype(np.float32))
    out[0, 0, 0] = 123.0
    assert x.reshape(-1)[0] != 123.0  # the caller's array is not aliased


# --------------------------------------------------------------------------- hostile input

def test_not_an_image():
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        to_pixels(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        to_pixels(b"%PDF-1.7\n" + bytes(range(256)))


def test_zero_bytes(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for value in (b"", bytearray(), memoryview(b""), io.BytesIO(), empty):
        with pytest.raises(ImageDecodeError, match=r"empty input \(0 bytes\)"):
            to_pixels(value)


@pytest.fixture(scope="module")
def noisy() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.97, 0.6, 0.2])
def test_truncated(fmt, keep, noisy):
    blob = encode(noisy, fmt)
    with pytest.raises(ImageDecodeError, match="truncated|not a recognised image|corrupt"):
        to_pixels(blob[: int(len(blob) * keep)])


def test_truncated_in_the_header():
    blob = encode(Image.new("L", (40, 40)), "PNG")
    with pytest.raises(ImageDecodeError):
        to_pixels(blob[:20])


def test_corrupt_png_data(noisy):
    blob = bytearray(encode(noisy, "PNG"))
    idat = blob.index(b"IDAT")
    blob[idat + 20 : idat + 60] = b"\x00" * 40
    with pytest.raises(ImageDecodeError):
        to_pixels(bytes(blob))


def test_decompression_bomb_header_is_refused_fast():
    bomb = gray_png(100_000, 100_000)  # 10^10 pixels declared by a ~60-byte file
    to_pixels(gray_png(1, 1, zlib.compress(b"\x00\x00")))  # warm Pillow's plugin registry
    info = bounded(lambda: to_pixels(bomb))
    assert info.type is ImageTooLarge
    assert "100000" in str(info.value) or "10000000000" in str(info.value)


def test_highly_compressible_huge_png_is_refused_fast():
    bomb = zero_png(6000, 6000)  # 36 M pixels in ~35 kB
    assert len(bomb) < 100_000
    to_pixels(gray_png(1, 1, zlib.compress(b"\x00\x00")))
    info = bounded(lambda: to_pixels(bomb))
    assert info.type is ImageTooLarge and "6000x6000" in str(info.value)


def test_forged_jpeg_header_is_refused_fast():
    to_pixels(jpeg_with_size(16, 16))  # the forged header is otherwise a valid JPEG
    info = bounded(lambda: to_pixels(jpeg_with_size(60_000, 60_000)))
    assert info.type is ImageTooLarge


def test_bomb_causes_no_large_native_allocation():
    """Pillow allocates pixels with malloc (invisible to tracemalloc): measure the process peak RSS."""
    code = (
        "import resource, zlib, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tests.test_preprocess import zero_png, gray_png\n"
        "from edge_model.preprocess import to_pixels\n"
        "from edge_model.errors import ImageTooLarge\n"
        "to_pixels(gray_png(1, 1, zlib.compress(b'\\x00\\x00')))\n"
        "bombs = [zero_png(6000, 6000), gray_png(100000, 100000)]\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for b in bombs:\n"
        "    try:\n"
        "        to_pixels(b)\n"
        "    except ImageTooLarge:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit('bomb accepted')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    grown_kb = int(out.stdout.strip())
    assert grown_kb < 20_000, f"peak RSS grew by {grown_kb} kB while refusing bombs"


def test_custom_max_pixels():
    config = PreprocessConfig(max_pixels=5_000)
    ok = Image.new("L", (50, 100))  # exactly at the limit
    assert to_pixels(encode(ok, "PNG"), config).shape == (28, 28)
    big = Image.new("L", (100, 100))
    for value in (encode(big, "PNG"), big, np.zeros((100, 100), dtype=np.uint8)):
        with pytest.raises(ImageTooLarge, match="10000 pixels, over the limit of 5000"):
            to_pixels(value, config)


def test_bytes_over_max_bytes(noisy, tmp_path):
    blob = encode(noisy, "PNG")
    config = PreprocessConfig(max_bytes=len(blob) - 1)
    path = tmp_path / "big.png"
    path.write_bytes(blob)
    for value in (blob, bytearray(blob), memoryview(blob), io.BytesIO(blob), path):
        with pytest.raises(ImageTooLarge, match=f"limit of {len(blob) - 1} bytes"):
            to_pixels(value, config)
    assert to_pixels(blob, PreprocessConfig(max_bytes=len(blob))).shape == (28, 28)


def test_directory_path(tmp_path):
    with pytest.raises(ImageDecodeError, match="is a directory"):
        to_pixels(tmp_path)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageDecodeError, match="not found") as info:
        to_pixels(str(missing))
    assert "nope.png" in str(info.value)


def test_text_mode_file_object(sample, tmp_path):
    path = tmp_path / "s.png"
    path.write_bytes(encode(Image.fromarray(sample), "PNG"))
    for kwargs in ({}, {"encoding": "latin-1"}):
        with open(path, "r", **kwargs) as fh, pytest.raises(ImageDecodeError, match="text mode"):
            to_pixels(fh)
    with pytest.raises(ImageDecodeError, match="text mode|did not return bytes"):
        to_pixels(io.StringIO("not bytes"))


def test_closed_file_object(sample, tmp_path):
    path = tmp_path / "s.png"
    path.write_bytes(encode(Image.fromarray(sample), "PNG"))
    fh = open(path, "rb")
    fh.close()
    with pytest.raises(ImageDecodeError, match="closed"):
        to_pixels(fh)


@pytest.mark.parametrize("value", [42, 3.5, None, [[0] * 28] * 28, {"image": 1}], ids=["int", "float", "none", "list", "dict"])
def test_unsupported_types(value):
    with pytest.raises(ImageDecodeError, match="unsupported input type"):
        preprocess(value)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros(784, dtype=np.uint8), r"\(H, W\) or \(H, W, 1\|3\|4\); got shape \(784,\)"),
        (np.zeros((1, 1, 28, 28), dtype=np.uint8), r"got shape \(1, 1, 28, 28\)"),
        (np.zeros((28, 28, 2), dtype=np.uint8), r"got shape \(28, 28, 2\)"),
        (np.zeros((0, 28), dtype=np.uint8), "empty array"),
        (np.zeros((28, 28), dtype=np.int64), "must be uint8 .* got int64"),
        (np.zeros((28, 28), dtype=bool), "got bool"),
        (np.zeros((28, 28), dtype=np.int8), "got int8"),
        (np.zeros((27, 28), dtype=np.float32), r"normalised model input .* got \(27, 28\)"),
        (np.zeros((2, 1, 28, 28), dtype=np.float32), r"got \(2, 1, 28, 28\)"),
        (np.full((28, 28), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.full((28, 28), np.inf, dtype=np.float64), "NaN or infinite"),
        (np.full((28, 28), -np.inf, dtype=np.float16), "NaN or infinite"),
        (np.full((28, 28), 1e300), "overflow float32"),
    ],
    ids=["rank1", "rank4", "2ch", "empty", "int64", "bool", "int8", "float-shape", "float-batch", "nan", "inf", "-inf16", "overflow"],
)
def test_bad_arrays(arr, match):
    with pytest.raises(ArrayInputError, match=match):
        preprocess(arr, normalised=True)


FLOAT_HINT = r"pass uint8 pixels \(e\.g\. \(img\*255\)\.astype\(np\.uint8\)\) or normalised=True for model-ready input"


@pytest.mark.parametrize("scale, seen", [(1 / 255, r"\[0, 1\]"), (1.0, r"\[0, 255\]")], ids=["unit", "byte-range"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_pixels_without_normalised_are_refused(scale, seen, dtype, sample):
    arr = (sample.astype(np.float64) * scale).astype(dtype)
    for call in (preprocess, to_pixels, lambda a: preprocess_batch([a])):
        with pytest.raises(ArrayInputError, match=seen + ".*" + FLOAT_HINT):
            call(arr)


def test_normalised_float_without_the_flag_is_refused_too(sample):
    # Model-ready only when the caller says so: a normalised array without the flag is refused as well.
    with pytest.raises(ArrayInputError, match=FLOAT_HINT):
        preprocess(normalise(sample))


def test_normalised_flag_leaves_uint8_and_encoded_inputs_alone(sample):
    png = encode(Image.fromarray(sample), "PNG")
    for image in (sample, png):
        np.testing.assert_array_equal(preprocess(image, normalised=True), preprocess(image))


def test_float_array_is_not_pixels(sample):
    with pytest.raises(ArrayInputError, match="no pixel form"):
        to_pixels(sample.astype(np.float32), normalised=True)
    with pytest.raises(ArrayInputError, match=FLOAT_HINT):
        to_pixels(sample.astype(np.float32))


def test_nan_in_a_float_tiff():
    arr = np.zeros((28, 28), dtype=np.float32)
    arr[3, 3] = np.nan
    with pytest.raises(ImageDecodeError, match="NaN or infinite"):
        to_pixels(encode(Image.fromarray(arr, "F"), "TIFF"))


def test_errors_are_value_errors_too():
    # Callers that only know the stdlib can still catch bad input as ValueError.
    with pytest.raises(ValueError):
        to_pixels(b"junk")


@pytest.mark.parametrize(
    "kwargs, field",
    [({"std": 0.0}, "std"), ({"std": float("nan")}, "std"), ({"max_pixels": 0}, "max_pixels"),
     ({"max_bytes": -1}, "max_bytes"), ({"height": 0}, "height"), ({"invert": "sometimes"}, "invert")],
)
def test_config_is_validated(kwargs, field):
    with pytest.raises(ValueError, match=f"PreprocessConfig.{field}"):
        PreprocessConfig(**kwargs)


# --------------------------------------------------------------------------- decode memory budget

def rgba_png(width: int, height: int) -> bytes:
    """A large, highly compressible RGBA PNG (a grey square on transparency), built row by row."""
    comp = zlib.compressobj(9)
    row = b"\x00" + bytes([200, 200, 200, 255]) * width
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def test_decoded_bytes_follow_pillow_storage():
    from edge_model.preprocess import decoded_bytes

    assert decoded_bytes("L", (100, 10)) == 1000
    assert decoded_bytes("RGB", (100, 10)) == 4000  # Pillow stores RGB in 4 bytes per pixel
    assert decoded_bytes("RGBA", (100, 10)) == 6000  # + luminance and alpha planes for compositing
    assert decoded_bytes("P", (100, 10)) == 6000  # P with transparency becomes RGBA first


def test_budget_refuses_one_image_over_the_per_image_cap():
    from edge_model.preprocess import DecodeBudget

    budget = DecodeBudget(total_bytes=1000, per_image_bytes=100, wait_s=0)
    with pytest.raises(ImageTooLarge, match="decodes to 101 bytes, over the limit of 100 bytes per image"):
        with budget.reserve(101):
            pass


def test_budget_is_shared_and_released():
    import threading

    from edge_model.errors import DecodeBusy
    from edge_model.preprocess import DecodeBudget

    budget = DecodeBudget(total_bytes=100, per_image_bytes=80, wait_s=0)
    with budget.reserve(80):
        with pytest.raises(DecodeBusy, match="retry shortly"):
            with budget.reserve(30):
                pass
    assert budget.in_use == 0
    # A waiter gets in as soon as the holder releases (bounded wait, no fixed sleep).
    budget.configure(100, 80, wait_s=30)
    entered = threading.Event()
    release = threading.Event()

    def holder():
        with budget.reserve(80):
            entered.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(30)
    release.set()
    with budget.reserve(50):
        assert budget.in_use == 50
    t.join(30)
    assert budget.in_use == 0 and budget.peak == 80


def test_budget_exhausted_by_a_decode_raises_decode_busy():
    from edge_model.errors import DecodeBusy
    from edge_model.preprocess import DECODE_BUDGET, configure_decode_budget

    old = (DECODE_BUDGET.total, DECODE_BUDGET.per_image, DECODE_BUDGET.wait_s)
    png = rgba_png(1100, 1100)  # 7.3 MB at peak (split into planes: above 1 M pixels)
    try:
        configure_decode_budget(8_000_000, 8_000_000, wait_s=0)
        with DECODE_BUDGET.reserve(1_000_000):
            with pytest.raises(DecodeBusy):
                to_pixels(png)
        assert to_pixels(png).shape == (28, 28)
        configure_decode_budget(8_000_000, 7_000_000, wait_s=0)
        with pytest.raises(ImageTooLarge, match="per image"):
            to_pixels(png)
    finally:
        configure_decode_budget(*old)


def test_large_rgba_png_is_shrunk_before_any_float_copy():
    """A 2000x2000 RGBA decodes to 16 MB in Pillow; numpy (traced) must only see the reduced image."""
    png = rgba_png(2000, 2000)
    to_pixels(gray_png(1, 1, zlib.compress(b"\x00\x00")))
    tracemalloc.start()
    try:
        pixels = to_pixels(png)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, f"peak numpy/Python allocation {peak / 1e6:.1f} MB"
    # Opaque grey 200 fills the frame: a bright border, so "auto" inverts it to a uniform 55.
    assert pixels.shape == (28, 28) and set(np.unique(pixels).tolist()) == {55}


@pytest.mark.parametrize("icon, background", [((0, 0, 0), (255, 255, 255)), ((230, 230, 230), (0, 0, 0))],
                         ids=["dark-icon-on-white-transparency", "light-object"])
def test_large_alpha_image_matches_its_small_version(icon, background):
    """Big alpha images take the plane-split path; the result must look like the small-image path's."""
    def make(size: int) -> Image.Image:
        im = Image.new("RGBA", (size, size), (*background, 0))
        ImageDraw.Draw(im).ellipse([size // 4, size // 8, 3 * size // 4, 7 * size // 8], fill=(*icon, 255))
        return im

    im = make(1400)  # 2 M pixels: split into planes
    large = to_pixels(encode(im, "PNG")).astype(int)
    # Reference: composited at full size by Pillow onto the background the rules pick (white for a
    # dark icon, black otherwise), then the ordinary grayscale path.
    under = (255, 255, 255, 255) if icon == (0, 0, 0) else (0, 0, 0, 255)
    reference = to_pixels(Image.alpha_composite(Image.new("RGBA", im.size, under), im).convert("L")).astype(int)
    assert np.abs(reference - large).max() <= 2
    assert large[14, 14] > 200 and large[1, 1] < 30  # light object on a dark background either way
    small = to_pixels(encode(make(112), "PNG")).astype(int)  # the uint16 path: same picture
    assert large[14, 14] - small[14, 14] in range(-3, 4) and large[1, 1] - small[1, 1] in range(-3, 4)
