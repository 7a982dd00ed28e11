"""Shared preprocessing: any image a client may hold -> the model's normalised input.

One module used by the edge runtime, the router and the cloud service, so both sides see
exactly what training saw: ``x = (pixel / 255 - mean) / std`` on a 28x28 grayscale image with
a dark background.

Accepted inputs (``Image`` below):

* a path (``str`` / ``os.PathLike``), ``bytes`` / ``bytearray`` / ``memoryview``, a binary file
  object, or a ``PIL.Image.Image`` -- decoded with Pillow (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM);
* a ``uint8`` numpy array of raw pixels, ``(H, W)`` or ``(H, W, 1|3|4)``; ``(28, 28)`` goes
  straight through without Pillow; ``uint16`` arrays are scaled to 8 bits;
* a floating-point array that is *already model input* -- normalised, shape ``(28, 28)``,
  ``(1, 28, 28)`` or ``(1, 1, 28, 28)`` -- passed through after a finiteness check.

Hostile input raises a subclass of :class:`edge_model.errors.InputError` with a message that
says what was wrong; the pixel limit is checked from the header before any pixel is decoded,
so a decompression bomb is refused in milliseconds without a large allocation.
"""

from __future__ import annotations

import io
import numbers
import os
import struct
from dataclasses import dataclass
from typing import IO, Literal, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_model.errors import ArrayInputError, ImageDecodeError, ImageTooLarge

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], Image.Image, np.ndarray]

# Formats Pillow may try; anything else is refused before a decoder plugin runs.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


@dataclass(frozen=True)
class PreprocessConfig:
    height: int = 28
    width: int = 28
    mean: float = 0.2860
    std: float = 0.3530
    max_pixels: int = 25_000_000  # width x height from the header; refused before decoding
    max_bytes: int = 32 * 1024 * 1024  # encoded size read from a path or file object
    # Fashion-MNIST shows light objects on black. "auto" inverts decoded images whose border is
    # bright (a product photo on white); arrays are never inverted.
    invert: Literal["auto", "never", "always"] = "auto"

    def __post_init__(self) -> None:
        for name in ("height", "width", "max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"PreprocessConfig.{name} must be a positive integer; got {value!r}")
        if not (self.std > 0 and np.isfinite(self.std)) or not np.isfinite(self.mean):
            raise ValueError(f"PreprocessConfig.std must be finite and > 0 and mean finite; got mean={self.mean!r} std={self.std!r}")
        if self.invert not in ("auto", "never", "always"):
            raise ValueError(f"PreprocessConfig.invert must be 'auto', 'never' or 'always'; got {self.invert!r}")

    @classmethod
    def from_input_spec(cls, spec, **overrides) -> "PreprocessConfig":
        return cls(height=spec.height, width=spec.width, mean=spec.mean, std=spec.std, **overrides)


DEFAULT_CONFIG = PreprocessConfig()


def to_pixels(image: ImageInput, config: PreprocessConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Decode/convert/resize ``image`` to raw ``uint8 [H, W]`` pixels (the UINT8 wire format)."""
    if isinstance(image, np.ndarray):
        if np.issubdtype(image.dtype, np.floating):
            raise ArrayInputError("a float array is taken as normalised model input, not as pixels; pass uint8 pixels")
        return _array_pixels(image, config)
    # A caller's PIL image is never draft()-ed: that would shrink the caller's own object.
    return _image_pixels(_open(image, config), config, reduce=not isinstance(image, Image.Image))


def normalise(pixels: np.ndarray, config: PreprocessConfig = DEFAULT_CONFIG) -> np.ndarray:
    """``uint8 [..., H, W]`` -> ``float32`` model input, exactly as training did.

    The same float32 operations in the same order as ``router_tools.train.normalise``, so the
    result is bit-identical to what the model was trained and measured on.
    """
    return (pixels.astype(np.float32) / np.float32(255.0) - np.float32(config.mean)) / np.float32(config.std)


def preprocess(image: ImageInput, config: PreprocessConfig = DEFAULT_CONFIG) -> np.ndarray:
    """One image -> ``float32 [1, H, W]`` model input."""
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        return _float_input(image, config)
    return normalise(to_pixels(image, config), config)[None]


def preprocess_batch(images, config: PreprocessConfig = DEFAULT_CONFIG) -> np.ndarray:
    """A sequence of images -> ``float32 [N, 1, H, W]``; errors name the failing index."""
    out = np.empty((len(images), 1, config.height, config.width), dtype=np.float32)
    for i, image in enumerate(images):
        try:
            out[i] = preprocess(image, config)
        except (ArrayInputError, ImageDecodeError, ImageTooLarge) as exc:
            raise type(exc)(f"image {i}: {exc}") from exc
    return out


# --------------------------------------------------------------------------- arrays

def _float_input(arr: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    h, w = config.height, config.width
    if arr.shape not in ((h, w), (1, h, w), (1, 1, h, w)):
        raise ArrayInputError(
            f"float array must be normalised model input of shape ({h}, {w}), (1, {h}, {w}) or (1, 1, {h}, {w}); "
            f"got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ArrayInputError("array contains NaN or infinite values")
    if arr.dtype == np.float32:  # the common case: no conversion, nothing can overflow
        return arr.reshape(1, h, w).copy()  # a copy: the caller's array is never aliased
    with np.errstate(over="ignore"):
        out = arr.reshape(1, h, w).astype(np.float32)  # a copy: the caller's array is never aliased
    if not np.isfinite(out).all():  # e.g. float64 1e300 overflows float32
        raise ArrayInputError("array values overflow float32 (|x| > 3.4e38)")
    return out


def _array_pixels(arr: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # uint16 of either byte order
        arr = (arr // 257).astype(np.uint8)
    elif arr.dtype.kind != "u" or arr.dtype.itemsize != 1:
        raise ArrayInputError(f"pixel arrays must be uint8 (or uint16); got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ArrayInputError(f"pixel arrays must be (H, W) or (H, W, 1|3|4); got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ArrayInputError(f"empty array of shape {arr.shape}")
    if arr.shape[0] * arr.shape[1] > config.max_pixels:
        raise ImageTooLarge(f"array has {arr.shape[0] * arr.shape[1]} pixels, over the limit of {config.max_pixels}")
    if arr.ndim == 3:
        mode = "RGB" if arr.shape[2] == 3 else "RGBA"
        return _image_pixels(Image.fromarray(np.ascontiguousarray(arr), mode), config, invert="never")
    if arr.shape == (config.height, config.width):
        return arr  # already model-sized: straight through
    return _image_pixels(Image.fromarray(np.ascontiguousarray(arr), "L"), config, invert="never")


# --------------------------------------------------------------------------- encoded images

def _read_limited(fh: IO[bytes], limit: int, what: str) -> bytes:
    if isinstance(fh, io.TextIOBase):
        raise ImageDecodeError(f"{what} is opened in text mode; open images in binary mode ('rb')")
    try:
        data = fh.read(limit + 1)
    except UnicodeDecodeError:  # a text-mode object that is not an io.TextIOBase
        raise ImageDecodeError(f"{what} is opened in text mode; open images in binary mode ('rb')") from None
    except (OSError, ValueError) as exc:  # ValueError: read of a closed file
        raise ImageDecodeError(f"cannot read {what}: {exc}") from None
    if not isinstance(data, (bytes, bytearray)):
        raise ImageDecodeError(f"{what} did not return bytes (opened in text mode?)")
    if len(data) > limit:
        raise ImageTooLarge(f"{what} is larger than the limit of {limit} bytes")
    return bytes(data)


def _open(image, config: PreprocessConfig) -> Image.Image:
    if isinstance(image, Image.Image):
        _check_size(image.size, config)
        return image
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as fh:
                data = _read_limited(fh, config.max_bytes, f"file {os.fspath(image)!r}")
        except FileNotFoundError:
            raise ImageDecodeError(f"image file not found: {os.fspath(image)!r}") from None
        except IsADirectoryError:
            raise ImageDecodeError(f"{os.fspath(image)!r} is a directory, not an image") from None
        except OSError as exc:
            raise ImageDecodeError(f"cannot read {os.fspath(image)!r}: {exc.strerror or exc}") from exc
    elif isinstance(image, (bytes, bytearray, memoryview)):
        size = memoryview(image).nbytes  # checked before any copy is made
        if size > config.max_bytes:
            raise ImageTooLarge(f"encoded image is {size} bytes, over the limit of {config.max_bytes} bytes")
        data = image if isinstance(image, bytes) else memoryview(image).cast("B").tobytes()
    elif hasattr(image, "read"):
        data = _read_limited(image, config.max_bytes, "file object")
    else:
        raise ImageDecodeError(f"unsupported input type {type(image).__name__}; pass a path, bytes, file, PIL image or array")
    if not data:
        raise ImageDecodeError("empty input (0 bytes)")
    try:
        # open() parses the header only; no pixel is decoded yet.
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a recognised image ({len(data)} bytes; accepted: {', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image dimensions refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt image header: {exc}") from None
    _check_size(im.size, config)
    return im


def _check_size(size: tuple[int, int], config: PreprocessConfig) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(f"image has empty dimensions {w}x{h}")
    if w * h > config.max_pixels:
        raise ImageTooLarge(f"image is {w}x{h} = {w * h} pixels, over the limit of {config.max_pixels}")


# Mean luminance of the opaque pixels below which an object is lost on a black background.
_VANISHING_LUMINANCE = 40.0


def _to_gray(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> "L".

    Transparency is composited onto black, the training background -- unless the opaque content
    is so dark that it would vanish there (a black icon cut out on transparency): then onto
    white, which the "auto" inversion turns into light-on-dark. The threshold sits below the
    darkest 1 % of Fashion-MNIST objects, so a Fashion-MNIST image with a transparent
    background keeps its look.
    """
    mode = im.mode
    if mode == "L":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        la = np.asarray(im.convert("LA" if mode in ("LA", "La") else "RGBA").convert("LA"), dtype=np.float32)
        lum, alpha = la[..., 0], la[..., 1] / np.float32(255.0)
        cover = float(alpha.sum())
        dark_object = cover > 0 and float((lum * alpha).sum()) / cover < _VANISHING_LUMINANCE
        bg = np.float32(255.0 if dark_object else 0.0)
        return Image.fromarray(np.rint(lum * alpha + bg * (1 - alpha)).astype(np.uint8), "L")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im, dtype=np.int64)
        top = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        return Image.fromarray((np.clip(arr, 0, top) * (255.0 / top)).round().astype(np.uint8), "L")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageDecodeError("floating-point image contains NaN or infinite values")
        top = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        return Image.fromarray((np.clip(arr, 0, top) * (255.0 / top)).round().astype(np.uint8), "L")
    if mode in ("1", "RGB", "RGBX"):
        return im.convert("L")
    return im.convert("RGB").convert("L")  # CMYK, YCbCr, LAB, HSV


def _image_pixels(im: Image.Image, config: PreprocessConfig, invert: str | None = None, reduce: bool = False) -> np.ndarray:
    target = (config.width, config.height)
    try:
        if reduce and im.format == "JPEG":
            # Let libjpeg decode at a reduced scale: a 6000x4000 photo costs ~1/64 of the work.
            im.draft("L" if im.mode == "L" else "RGB", (target[0] * 4, target[1] * 4))
        im.load()
        im = ImageOps.exif_transpose(im)
        gray = _to_gray(im)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image refused as a decompression bomb: {exc}") from None
    except MemoryError:
        raise ImageTooLarge("not enough memory to decode the image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, ZeroDivisionError) as exc:
        # Pillow reports truncation as OSError("image file is truncated ..."); its plugins raise
        # the others on malformed chunks / IFDs / EXIF.
        raise ImageDecodeError(f"cannot decode image (truncated or corrupt): {exc}") from None
    if gray.size != target:
        gray = _fit(gray, target)
    pixels = np.asarray(gray, dtype=np.uint8)
    mode = invert or config.invert
    if mode == "always" or (mode == "auto" and _bright_border(pixels)):
        pixels = 255 - pixels
    return pixels


def _fit(gray: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio and centre on a background of the border's colour."""
    w, h = gray.size
    scale = min(target[0] / w, target[1] / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = gray.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if (nw, nh) == target:
        return resized
    arr = np.asarray(resized)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    canvas = Image.new("L", target, int(np.median(border)))
    canvas.paste(resized, ((target[0] - nw) // 2, (target[1] - nh) // 2))
    return canvas


def _bright_border(pixels: np.ndarray) -> bool:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return float(border.mean()) > 127.0
