"""Shipped sample images: real test-split images plus variants that exercise the preprocessing.

    python -m router_tools.samples [--out DIR]

Writes, deterministically, into ``router_tools/data/samples/`` (or ``--out``):

* ``NNNN-<label>.png`` -- the first test-split image of each class, as stored (28x28 grayscale);
  ``NNNN`` is its index in the test split, ``<label>`` its true label;
* ``NNNN-<label>-rgb-on-white.jpg`` -- upscaled 8x, tinted, dark on a white background (a product
  photo: auto-inverted and downscaled by the preprocessing);
* ``NNNN-<label>-rgba-transparent.png`` -- upscaled 4x, the object opaque, the background transparent;
* ``NNNN-<label>-exif-rotated.jpg`` -- stored rotated, upright only if the EXIF orientation is honoured.

The true label of any sample is recoverable from its name with :func:`label_of`.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from router_tools.datasets import LABELS, SAMPLES_DIR, load_test

# (test index of the source image, variant) for the preprocessing variants.
VARIANTS = (("rgb-on-white", 9), ("rgba-transparent", 5), ("exif-rotated", 0))
_NAME = re.compile(r"^(?P<index>\d{4})-(?P<slug>[a-z-]+?)(?:-(?P<variant>rgb-on-white|rgba-transparent|exif-rotated))?\.(?:png|jpg)$")


def slug(label: str) -> str:
    """``"T-shirt/top"`` -> ``"t-shirt-top"``, ``"Ankle boot"`` -> ``"ankle-boot"``."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def label_of(path: str | Path) -> int:
    """The true class index encoded in a sample's file name."""
    match = _NAME.match(Path(path).name)
    slugs = [slug(label) for label in LABELS]
    if not match or match["slug"] not in slugs:
        raise ValueError(f"{Path(path).name!r} is not a sample name like '0042-ankle-boot.png'")
    return slugs.index(match["slug"])


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _jpeg(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _rgb_on_white(pixels: np.ndarray) -> bytes:
    big = np.asarray(Image.fromarray(pixels).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    tint = np.array([0.05, 0.10, 0.30], dtype=np.float32)  # a navy object, darker where brighter
    rgb = 255 * (1 - big[..., None] * (1 - tint))
    return _jpeg(Image.fromarray(np.rint(rgb).astype(np.uint8), "RGB"))


def _rgba_transparent(pixels: np.ndarray) -> bytes:
    alpha = Image.fromarray(pixels).resize((112, 112), Image.Resampling.BICUBIC)
    rgba = Image.merge("RGBA", (Image.new("L", alpha.size, 235), Image.new("L", alpha.size, 220),
                                Image.new("L", alpha.size, 200), alpha))
    return _png(rgba)


def _exif_rotated(pixels: np.ndarray) -> bytes:
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(pixels, 1))).resize((84, 84), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": undoes the rotation above
    return _jpeg(stored, exif=exif.tobytes())


_MAKERS = {"rgb-on-white": _rgb_on_white, "rgba-transparent": _rgba_transparent, "exif-rotated": _exif_rotated}


def build() -> dict[str, bytes]:
    """File name -> contents of every sample, computed from the shipped test split."""
    test = load_test()
    files: dict[str, bytes] = {}
    firsts = {c: int(np.flatnonzero(test.labels == c)[0]) for c in range(len(LABELS))}
    for c, i in firsts.items():
        files[f"{i:04d}-{slug(LABELS[c])}.png"] = _png(Image.fromarray(test.images[i], "L"))
    for variant, c in VARIANTS:
        i = firsts[c]
        ext = "png" if variant == "rgba-transparent" else "jpg"
        files[f"{i:04d}-{slug(LABELS[c])}-{variant}.{ext}"] = _MAKERS[variant](test.images[i])
    return files


def write(out: str | Path = SAMPLES_DIR) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, blob in sorted(build().items()):
        (out / name).write_bytes(blob)
        paths.append(out / name)
    return paths


def sample_paths(directory: str | Path = SAMPLES_DIR) -> list[Path]:
    """The shipped sample images, sorted by name."""
    return sorted(p for p in Path(directory).iterdir() if _NAME.match(p.name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m router_tools.samples", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(SAMPLES_DIR), help="output directory (default: the package's data/samples)")
    args = p.parse_args(argv)
    for path in write(args.out):
        print(f"{path}  {path.stat().st_size} bytes  label={LABELS[label_of(path)]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
