"""A seeded RGB data set of road-sign-like symbols on real photographs, made with Pillow and numpy.

Why generated: no labeled RGB image data set installs from the package registries without a
download at run time (PyPI's ``cifar10``, ``cifar10-web`` and ``pure-cifar-10`` are downloaders of
a few KB, ``medmnist`` fetches from Zenodo, Debian has only Fashion-MNIST); scikit-image ships a
dozen photographs, not a labeled set. So the symbols are drawn here and put on crops of seven of
those photographs (public domain / CC0, see ``backgrounds/CREDITS``), 32x32 RGB.

Eight classes, several of which differ only in colour or orientation, so a colour model is needed
and a small one is genuinely unsure on a share of images: ``no_entry`` (red disc, white bar) vs
``mandatory`` (blue disc, white bar) vs ``speed_limit`` (white disc, red ring); ``warning``
(triangle up) vs ``yield`` (triangle down); ``info`` (blue square) vs ``priority`` (yellow diamond)
vs ``stop`` (red octagon). Each image: random size, position, rotation (+-35 degrees), colour and
brightness jitter, blur, noise, and sometimes an occluding patch or haze.

    python router_tools/examples/rgb/signs.py --out rgb-data             # calibration/ and test/ folders
    python router_tools/examples/rgb/signs.py --out rgb-data --split train --count 20000

writes ``OUT/<split>/<label>/<split>-NNNNN.png``. The same split and count give the same bytes on
every run; splits use different seeds, so they never share an image.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

HERE = Path(__file__).resolve().parent
LABELS = ("stop", "yield", "warning", "no_entry", "mandatory", "speed_limit", "priority", "info")
SPLIT_SEEDS = {"train": 1, "calibration": 2, "test": 3}
DEFAULT_COUNTS = {"train": 20000, "calibration": 1000, "test": 2000}
SIZE = 32
CANVAS = 96  # drawn at 3x, then shrunk: anti-aliased edges as a camera would give

RED, BLUE, YELLOW, WHITE = (200, 30, 35), (25, 70, 190), (245, 200, 20), (245, 245, 245)


def _backgrounds() -> list[Image.Image]:
    files = sorted((HERE / "backgrounds").glob("*.jpg"))
    if not files:
        raise SystemExit(f"{HERE / 'backgrounds'}: the background photographs are missing")
    return [Image.open(f).convert("RGB") for f in files]


def _polygon(n: int, r: float, c: float, rot: float) -> list[tuple[float, float]]:
    return [(c + r * math.cos(rot + 2 * math.pi * k / n), c + r * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]


def _draw_sign(label: str, r: float, jitter) -> Image.Image:
    """The symbol on a transparent canvas, centred, radius ``r`` pixels of CANVAS."""
    im = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    c = CANVAS / 2
    red, blue, yellow, white = (jitter(col) for col in (RED, BLUE, YELLOW, WHITE))
    box = (c - r, c - r, c + r, c + r)
    inner = (c - r * 0.78, c - r * 0.78, c + r * 0.78, c + r * 0.78)
    bar = (c - r * 0.62, c - r * 0.16, c + r * 0.62, c + r * 0.16)
    if label == "stop":
        d.polygon(_polygon(8, r, c, math.pi / 8), fill=white)
        d.polygon(_polygon(8, r * 0.88, c, math.pi / 8), fill=red)
    elif label in ("yield", "warning"):
        up = label == "warning"
        rot = -math.pi / 2 if up else math.pi / 2
        d.polygon(_polygon(3, r, c, rot), fill=red)
        d.polygon(_polygon(3, r * 0.55, c, rot), fill=white)
    elif label == "no_entry":
        d.ellipse(box, fill=red)
        d.rectangle(bar, fill=white)
    elif label == "mandatory":
        d.ellipse(box, fill=blue)
        d.rectangle(bar, fill=white)
    elif label == "speed_limit":
        d.ellipse(box, fill=red)
        d.ellipse(inner, fill=white)
    elif label == "priority":
        d.polygon(_polygon(4, r, c, 0), fill=white)
        d.polygon(_polygon(4, r * 0.75, c, 0), fill=yellow)
    elif label == "info":
        s = r * 0.85
        d.rectangle((c - s, c - s, c + s, c + s), fill=blue)
        d.rectangle((c - s * 0.3, c - s * 0.55, c + s * 0.3, c + s * 0.55), fill=white)
    else:
        raise ValueError(label)
    return im


def _background(rng: np.random.Generator, photos: list[Image.Image]) -> Image.Image:
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(24, min(photo.size)))
    x0, y0 = int(rng.integers(0, photo.width - side + 1)), int(rng.integers(0, photo.height - side + 1))
    bg = photo.crop((x0, y0, x0 + side, y0 + side)).resize((CANVAS, CANVAS), Image.BILINEAR)
    if rng.random() < 0.5:
        bg = bg.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:  # tint: the grey textures (brick, grass, gravel) get a colour now and then
        tint = Image.new("RGB", bg.size, tuple(int(v) for v in rng.integers(0, 256, 3)))
        bg = Image.blend(bg, tint, float(rng.uniform(0.1, 0.4)))
    return bg


def render(label: str, rng: np.random.Generator, photos: list[Image.Image]) -> Image.Image:
    """One 32x32 RGB image of ``label``."""
    def jitter(col):
        k = rng.uniform(0.75, 1.15)
        return tuple(int(np.clip(v * k + rng.normal(0, 18), 0, 255)) for v in col) + (255,)

    r = CANVAS / 2 * rng.uniform(0.45, 0.95)
    sign = _draw_sign(label, r, jitter).rotate(float(rng.uniform(-35, 35)), resample=Image.BICUBIC,
                                               translate=tuple(float(v) for v in rng.normal(0, CANVAS * 0.07, 2)))
    im = _background(rng, photos)
    im.paste(sign, (0, 0), sign)
    if rng.random() < 0.25:  # something in front of the sign: a patch of another photograph
        w, h = (int(v) for v in rng.integers(CANVAS // 6, CANVAS // 2.2, 2))
        x, y = (int(v) for v in rng.integers(0, CANVAS - max(w, h), 2))
        im.paste(_background(rng, photos).resize((w, h)), (x, y))
    if rng.random() < 0.2:  # haze
        im = Image.blend(im, Image.new("RGB", im.size, (200, 200, 205)), float(rng.uniform(0.3, 0.6)))
    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.45, 1.3)))
    im = ImageEnhance.Color(im).enhance(float(rng.uniform(0.5, 1.3)))
    if rng.random() < 0.4:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5))))
    im = im.resize((SIZE, SIZE), Image.BOX)
    a = np.asarray(im, dtype=np.float32) + rng.normal(0, rng.uniform(2, 14), (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def generate(split: str, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [N, 32, 32, 3] RGB, int64 [N] class indices)``, balanced, in a seeded order."""
    count = DEFAULT_COUNTS[split] if count is None else count
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    photos = _backgrounds()
    labels = np.arange(count) % len(LABELS)
    rng.shuffle(labels)
    images = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i] = np.asarray(render(LABELS[y], rng, photos))
    return images, labels.astype(np.int64)


def write_split(out: Path, split: str, count: int | None = None) -> Path:
    images, labels = generate(split, count)
    root = Path(out) / split
    for name in LABELS:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (im, y) in enumerate(zip(images, labels)):
        Image.fromarray(im, "RGB").save(root / LABELS[y] / f"{split}-{i:05d}.png", optimize=False)
    return root


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder to write OUT/<split>/<label>/*.png into")
    p.add_argument("--split", choices=sorted(SPLIT_SEEDS), action="append",
                   help="which split(s) (default: calibration and test)")
    p.add_argument("--count", type=int, help="images per split (default: train 20000, calibration 1000, test 2000)")
    args = p.parse_args(argv)
    for split in args.split or ["calibration", "test"]:
        root = write_split(Path(args.out), split, args.count)
        print(f"wrote {args.count or DEFAULT_COUNTS[split]} images to {root}/<label>/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
