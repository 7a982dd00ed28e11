"""Shared preprocessing: any image a client may hold -> the model's normalised input.

One module used by the edge runtime, the router and the cloud service, so both sides see
exactly what training saw: ``x = (pixel * scale - mean) / std`` (scalar or per-channel mean/std)
on an image of the model's size, colour (L, RGB or BGR) and layout (NCHW or NHWC), resized by
the manifest's policy (letterbox, stretch, or shorter side + centre crop). The defaults are the
shipped Fashion-MNIST model's: 28x28 grayscale, ``scale`` 1/255, letterbox with Lanczos, and
bright-border images inverted (``invert="auto"``); a manifest's contract (``from_input_spec``)
leaves inversion off unless it asks. ``uint8``-input models take the pixels as they are; a
``codec="tensor"`` model (text, tabular) takes an array of its declared shape and dtype, passed
straight through.

Colour images keep their colour for RGB/BGR models; transparency is composited onto white there
(onto black for grayscale models, the Fashion-MNIST background). Raw pixels (the UINT8 wire
format, :func:`to_pixels`) are ``[H, W]`` for one-channel models and in the model's own layout
(``[3, H, W]`` or ``[H, W, 3]``) and channel order otherwise.

Accepted inputs (``Image`` below):

* a path (``str`` / ``os.PathLike``), ``bytes`` / ``bytearray`` / ``memoryview``, a binary file
  object, or a ``PIL.Image.Image`` -- decoded with Pillow (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM);
* a ``uint8`` numpy array of raw pixels, ``(H, W)`` or ``(H, W, 1|3|4)``; ``(28, 28)`` goes
  straight through without Pillow; ``uint16`` arrays are scaled to 8 bits;
* a floating-point array that is *already model input* -- normalised, shape ``(28, 28)``,
  ``(1, 28, 28)`` or ``(1, 1, 28, 28)`` -- passed through after a finiteness check, but only
  when the caller says so with ``normalised=True``. Without it a float array is refused
  (:class:`ArrayInputError`): ``img / 255`` or float pixels in [0, 255] would otherwise be fed
  to the model silently un-normalised.

Decoding is bounded by memory, not only by pixel count: the decoded size (width x height x
bytes per pixel, from the header) is checked against a per-image cap and reserved from a
process-wide :class:`DecodeBudget` shared by concurrent decodes (the service decodes on several
threads). Large images are shrunk in their integer mode (JPEG ``draft``, ``Image.reduce``)
before any mode conversion, so no full-size float copy is ever made.

Hostile input raises a subclass of :class:`edge_model.errors.InputError` with a message that
says what was wrong; the pixel limit is checked from the header before any pixel is decoded,
so a decompression bomb is refused in milliseconds without a large allocation.
"""

from __future__ import annotations

import collections
import io
import numbers
import os
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Literal, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from edge_model import heap
from edge_model.errors import ArrayInputError, DecodeBusy, ImageDecodeError, ImageTooLarge

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], Image.Image, np.ndarray]

# Formats Pillow may try; anything else is refused before a decoder plugin runs.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")


def preload_decoders() -> None:
    """Import Pillow's decoders for :data:`ALLOWED_FORMATS` now.

    Pillow imports its format plugins on the first ``Image.open`` of a process (25-45 ms here);
    a router calls this at construction so that cost never lands inside a request's deadline.
    """
    Image.preinit()  # BMP, GIF, JPEG, PPM, PNG
    from PIL import TiffImagePlugin, WebPImagePlugin  # noqa: F401  (the two preinit leaves out)


def _values(v) -> tuple[float, ...]:
    return tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else (float(v),)


INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
}
RESIZE_POLICIES = ("letterbox", "stretch", "shorter_side_center_crop")


@dataclass(frozen=True)
class PreprocessConfig:
    height: int = 28
    width: int = 28
    mean: Union[float, tuple[float, ...]] = 0.2860  # scalar, or one per channel
    std: Union[float, tuple[float, ...]] = 0.3530
    max_pixels: int = 25_000_000  # width x height from the header; refused before decoding
    max_bytes: int = 32 * 1024 * 1024  # encoded size read from a path or file object
    # Fashion-MNIST shows light objects on black. "auto" inverts decoded images whose border is
    # bright (a product photo on white); arrays are never inverted.
    invert: Literal["auto", "never", "always"] = "auto"
    color: Literal["L", "RGB", "BGR"] = "L"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "float16", "uint8", "int64", "int32"] = "float32"
    scale: float = 1 / 255
    resize: Literal["letterbox", "stretch", "shorter_side_center_crop"] = "letterbox"
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = "lanczos"
    crop_fraction: float = 0.875
    codec: Literal["image", "tensor"] = "image"
    tensor_shape: Optional[tuple[int, ...]] = None  # codec "tensor": one sample's shape, -1 = dynamic

    def __post_init__(self) -> None:
        for name in ("height", "width", "max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"PreprocessConfig.{name} must be a positive integer; got {value!r}")
        means, stds = _values(self.mean), _values(self.std)
        if not all(s > 0 and np.isfinite(s) for s in stds) or not all(np.isfinite(m) for m in means):
            raise ValueError(f"PreprocessConfig.std must be finite and > 0 and mean finite; got mean={self.mean!r} std={self.std!r}")
        if self.invert not in ("auto", "never", "always"):
            raise ValueError(f"PreprocessConfig.invert must be 'auto', 'never' or 'always'; got {self.invert!r}")
        if self.color not in ("L", "RGB", "BGR") or self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"PreprocessConfig: color must be L, RGB or BGR and layout NCHW or NHWC; "
                             f"got {self.color!r}, {self.layout!r}")
        if self.resize not in RESIZE_POLICIES or self.interpolation not in INTERPOLATION:
            raise ValueError(f"PreprocessConfig: resize must be one of {RESIZE_POLICIES} and interpolation one of "
                             f"{tuple(INTERPOLATION)}; got {self.resize!r}, {self.interpolation!r}")
        if not (0 < self.crop_fraction <= 1) or not (self.scale > 0 and np.isfinite(self.scale)):
            raise ValueError(f"PreprocessConfig: crop_fraction must be in (0, 1] and scale > 0; "
                             f"got {self.crop_fraction!r}, {self.scale!r}")
        for name, vals in (("mean", means), ("std", stds)):
            if len(vals) not in (1, self.channels):
                raise ValueError(f"PreprocessConfig.{name} must be one value or one per channel ({self.channels}); got {vals}")
        if self.codec == "tensor" and not self.tensor_shape:
            raise ValueError("PreprocessConfig: codec 'tensor' needs tensor_shape (one sample's shape)")

    @classmethod
    def from_input_spec(cls, spec, **overrides) -> "PreprocessConfig":
        """The preprocessing a manifest's :class:`~edge_model.manifest.InputSpec` declares."""
        def scalar_or_tuple(v):
            return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)

        if spec.codec == "tensor":
            fields = dict(codec="tensor", dtype=spec.dtype, tensor_shape=tuple(spec.shape[1:]), invert="never")
        else:
            fields = dict(
                height=spec.height, width=spec.width, mean=scalar_or_tuple(spec.mean), std=scalar_or_tuple(spec.std),
                invert=spec.invert, color=spec.color, layout=spec.layout, dtype=spec.dtype, scale=spec.scale,
                resize=spec.resize, interpolation=spec.interpolation, crop_fraction=spec.crop_fraction,
            )
        return cls(**{**fields, **overrides})

    # -- derived shapes (properties, not fields: ``PreprocessConfig(**cfg.__dict__)`` must keep working)
    @property
    def channels(self) -> int:
        return 1 if self.color == "L" else 3

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample of model input (no batch dimension): ``(C, H, W)``, ``(H, W, C)`` or the tensor's."""
        if self.codec == "tensor":
            return tuple(self.tensor_shape or ())
        c, h, w = self.channels, self.height, self.width
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """One image as raw ``uint8`` pixels: ``(H, W)`` for one channel, else the model's layout."""
        return (self.height, self.width) if self.channels == 1 else self.sample_shape

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


DEFAULT_CONFIG = PreprocessConfig()


@lru_cache(maxsize=64)
def _channel_stats(mean, std, channels: int, layout: str):
    """mean and std as float32 scalars, or arrays that broadcast along the channel axis of pixels
    in the model's layout (``[..., C, H, W]`` or ``[..., H, W, C]``)."""
    out = []
    for v in (mean, std):
        vals = _values(v)
        if len(vals) == 1 or len(set(vals)) == 1:
            out.append(np.float32(vals[0]))
        else:
            arr = np.asarray(vals, dtype=np.float32)
            out.append(arr.reshape(channels, 1, 1) if layout == "NCHW" else arr)
    return tuple(out)


# --------------------------------------------------------------------------- decode memory budget

class DecodeBudget:
    """Bytes of decoded pixels that concurrent decodes may hold at once (a byte-counting semaphore).

    Written by hand because ``threading.BoundedSemaphore`` counts permits, not sizes: one 100 MB
    image must wait for room while many 3 KB thumbnails pass. ``per_image`` refuses a single image
    outright (:class:`ImageTooLarge`); an image that fits but finds the budget in use waits up to
    ``wait_s`` and then raises :class:`DecodeBusy`. Waiters are served in arrival order, so a
    large image is not starved by a stream of small ones (nor one large image by the others).
    """

    def __init__(self, total_bytes: int = 320 * 1024 * 1024, per_image_bytes: int = 160 * 1024 * 1024,
                 wait_s: float = 15.0) -> None:
        self._cond = threading.Condition()
        self.configure(total_bytes, per_image_bytes, wait_s)
        self.in_use = 0
        self.peak = 0
        self._queue: collections.deque[object] = collections.deque()

    def configure(self, total_bytes: int, per_image_bytes: int, wait_s: float) -> None:
        if not (0 < per_image_bytes <= total_bytes) or not (wait_s >= 0 and np.isfinite(wait_s)):
            raise ValueError(f"DecodeBudget needs 0 < per_image_bytes <= total_bytes and a finite wait_s >= 0; "
                             f"got total={total_bytes!r} per_image={per_image_bytes!r} wait_s={wait_s!r}")
        with getattr(self, "_cond", threading.Condition()):
            self.total, self.per_image, self.wait_s = int(total_bytes), int(per_image_bytes), float(wait_s)

    @contextmanager
    def reserve(self, nbytes: int, what: str = "image"):
        if nbytes > self.per_image:
            raise ImageTooLarge(f"{what} decodes to {nbytes} bytes, over the limit of {self.per_image} bytes per image")
        deadline = time.monotonic() + self.wait_s
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self.in_use + nbytes > self.total:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DecodeBusy(f"too many large images are being decoded at once ({self.in_use} of "
                                         f"{self.total} bytes in use); retry shortly")
                    self._cond.wait(remaining)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now (or the head left)
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            if nbytes >= _TRIM_AFTER_BYTES:
                # Before the budget is handed on, so that what it stood for is really free again:
                # Pillow's 16 MB image blocks come from malloc, and glibc keeps freed memory in
                # per-thread arenas (decodes on several threads would each keep hundreds of MB).
                heap.trim()
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()


DECODE_BUDGET = DecodeBudget()
_TRIM_AFTER_BYTES = 8 * 1024 * 1024


def configure_decode_budget(total_bytes: int, per_image_bytes: int, wait_s: float = 15.0) -> None:
    """Size the process-wide :data:`DECODE_BUDGET` (the cloud service does this from its settings)."""
    DECODE_BUDGET.configure(total_bytes, per_image_bytes, wait_s)


def to_pixels(image: ImageInput, config: PreprocessConfig = DEFAULT_CONFIG, *, normalised: bool = False) -> np.ndarray:
    """Decode/convert/resize ``image`` to raw ``uint8 [H, W]`` pixels (the UINT8 wire format).

    A float array has no pixel form: with ``normalised=True`` it is model input (use
    :func:`preprocess`), without it the float-pixel error of :func:`preprocess` is raised.
    Colour models get ``uint8`` pixels in their own layout and channel order (``config.pixel_shape``).
    """
    if config.codec == "tensor":
        raise ArrayInputError("this model takes a tensor, not an image: pass a numpy array of shape "
                              f"{list(config.sample_shape)} ({config.dtype})")
    if isinstance(image, np.ndarray):
        if np.issubdtype(image.dtype, np.floating):
            if normalised:
                raise ArrayInputError("a normalised float array is model input and has no pixel form; "
                                      "use preprocess(..., normalised=True), or pass uint8 pixels")
            raise ArrayInputError(_float_pixels_message(image))
        return _array_pixels(image, config)
    # A caller's PIL image is never draft()-ed: that would shrink the caller's own object.
    return _image_pixels(_open(image, config), config, reduce=not isinstance(image, Image.Image))


def normalise(pixels: np.ndarray, config: PreprocessConfig = DEFAULT_CONFIG) -> np.ndarray:
    """``uint8`` pixels (``[..., *pixel_shape]``) -> model input of the same shape, exactly as training did.

    The same float32 operations in the same order as ``router_tools.train.normalise``
    (``pixel / (1/scale) - mean) / std``; 1/scale is exactly 255.0 in float32 for the default
    scale), so the result is bit-identical to what the model was trained and measured on.
    Per-channel mean/std broadcast along the channel axis of the model's layout; float16 models
    get the float32 result rounded once; ``uint8`` models take the pixels unchanged.
    """
    if config.dtype == "uint8":
        return np.asarray(pixels, dtype=np.uint8)
    mean, std = _channel_stats(config.mean, config.std, config.channels, config.layout)
    x = (pixels.astype(np.float32) / np.float32(1.0 / config.scale) - mean) / std
    return x if config.dtype == "float32" else x.astype(config.np_dtype)


def preprocess(image: ImageInput, config: PreprocessConfig = DEFAULT_CONFIG, *, normalised: bool = False) -> np.ndarray:
    """One image -> ``float32 [1, H, W]`` model input.

    ``normalised=True`` declares a float array to be model-ready already (shape and finiteness
    are still checked); without it float arrays are refused. It does not affect other inputs.
    Returns one sample of ``config.sample_shape`` (``[1, H, W]`` for the shipped model).
    A ``codec="tensor"`` model takes an array of its declared shape and dtype (checked, copied).
    """
    if config.codec == "tensor":
        return _tensor_input(image, config)
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        if not normalised:
            raise ArrayInputError(_float_pixels_message(image))
        return _float_input(image, config)
    return normalise(to_pixels(image, config), config).reshape(config.sample_shape)


def preprocess_batch(images, config: PreprocessConfig = DEFAULT_CONFIG, *, normalised: bool = False) -> np.ndarray:
    """A sequence of images -> model input ``[N, *sample_shape]``; errors name the failing index."""
    dynamic = any(d < 0 for d in config.sample_shape)
    out = None if dynamic else np.empty((len(images), *config.sample_shape), dtype=config.np_dtype)
    rows = []
    for i, image in enumerate(images):
        try:
            row = preprocess(image, config, normalised=normalised)
        except (ArrayInputError, ImageDecodeError, ImageTooLarge) as exc:
            raise type(exc)(f"image {i}: {exc}") from exc
        if out is None:
            rows.append(row)
        else:
            out[i] = row
    if out is None:
        try:
            return np.stack(rows) if rows else np.empty((0,), dtype=config.np_dtype)
        except ValueError:
            raise ArrayInputError(f"tensors of a batch must share one shape; got {sorted({r.shape for r in rows})}") from None
    return out


def _tensor_input(arr, config: PreprocessConfig) -> np.ndarray:
    """Codec ``tensor``: one sample of the declared shape (``-1`` dims free) and dtype kind, copied."""
    want = config.sample_shape
    if not isinstance(arr, np.ndarray):
        raise ArrayInputError(f"this model takes a numpy array of shape {list(want)} ({config.dtype}); "
                              f"got {type(arr).__name__}")
    shape = arr.shape[1:] if arr.ndim == len(want) + 1 and arr.shape[0] == 1 else arr.shape
    if len(shape) != len(want) or any(w >= 0 and s != w for s, w in zip(shape, want)) or 0 in shape:
        raise ArrayInputError(f"tensor must have shape {list(want)} (-1: any size); got {list(arr.shape)}")
    target = config.np_dtype
    if target.kind == "f":
        if arr.dtype.kind not in "fiub":
            raise ArrayInputError(f"tensor must be numeric ({config.dtype}); got {arr.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.reshape(shape).astype(target)
        if not np.isfinite(out).all():
            raise ArrayInputError(f"tensor contains NaN or infinite values (or overflows {config.dtype})")
        return out
    if arr.dtype.kind not in "iub":
        raise ArrayInputError(f"tensor must hold integers ({config.dtype}); got {arr.dtype}")
    info = np.iinfo(target)
    if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
        raise ArrayInputError(f"tensor values do not fit {config.dtype}")
    return arr.reshape(shape).astype(target)


# --------------------------------------------------------------------------- arrays

def _float_pixels_message(arr: np.ndarray) -> str:
    lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if arr.size and not np.isnan(arr).all() else (0.0, 0.0)
    if lo >= 0 and hi <= 1:
        seen = "values in [0, 1] look like pixels scaled by 1/255, not normalised model input"
    elif lo >= 0 and hi <= 255:
        seen = "values in [0, 255] look like float pixels, not normalised model input"
    else:
        seen = "a float array is only taken as normalised model input when the caller says so"
    return (f"{seen}: pass uint8 pixels (e.g. (img*255).astype(np.uint8)) "
            f"or normalised=True for model-ready input")


def _float_input(arr: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    sample = config.sample_shape
    accepted = [sample, (1, *sample)] + ([(config.height, config.width)] if config.channels == 1 else [])
    if config.dtype == "uint8":
        raise ArrayInputError("this model takes uint8 pixels, not normalised float input: pass a uint8 array")
    if arr.shape not in accepted:
        raise ArrayInputError(
            f"float array must be normalised model input of shape {' or '.join(str(s) for s in accepted)}; "
            f"got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ArrayInputError("array contains NaN or infinite values")
    target = config.np_dtype
    if arr.dtype == target:  # the common case: no conversion, nothing can overflow
        return arr.reshape(sample).copy()  # a copy: the caller's array is never aliased
    with np.errstate(over="ignore"):
        out = arr.reshape(sample).astype(target)  # a copy: the caller's array is never aliased
    if not np.isfinite(out).all():  # e.g. float64 1e300 overflows float32
        raise ArrayInputError(f"array values overflow {config.dtype}")
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
    if config.channels == 3:
        # Arrays are RGB(A) in numpy's (H, W, C) order, as Pillow and most image libraries give them.
        if arr.ndim == 3 and arr.shape == (config.height, config.width, 3) and config.resize != "shorter_side_center_crop":
            return _arrange(np.ascontiguousarray(arr), config)  # already model-sized: straight through
        mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[2] == 3 else "RGBA")
        return _colour_pixels(Image.fromarray(np.ascontiguousarray(arr), mode), config, invert="never")
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


_REDUCING_GAP = 3.0  # shrink in integer mode down to >= 3x the target, as Pillow's resize(reducing_gap=3) does
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_SPLIT_ABOVE_PIXELS = 1_000_000  # alpha images larger than this are composited channel by channel


def decoded_bytes(mode: str, size: tuple[int, int]) -> int:
    """Peak bytes Pillow holds to turn an image of ``mode`` and ``size`` into a small grayscale one.

    Pillow stores 1 byte per pixel for L/P/1, 2 for I;16*, and 4 for every multi-band and 32-bit
    mode (RGB and RGBA included). On top of the decoded image: alpha images need their luminance
    and alpha planes (1 + 1; La/RGBa are first converted, + 4), P with transparency becomes RGBA,
    I;16 becomes I before ``reduce()``, and I/F may be read as 8-byte arrays when too thin to shrink.
    """
    w, h = size
    per = {"L": 1, "1": 2, "P": 6, "I": 12, "F": 12, "LA": 6, "PA": 6, "RGBA": 6, "La": 10, "RGBa": 10}.get(mode)
    if per is None:
        per = 14 if mode.startswith("I;16") else 4
    return w * h * per


def _shrink(im: Image.Image, target: tuple[int, int], own: bool) -> Image.Image:
    """Shrink a large image by an integer factor before any full-size conversion or float copy.

    ``Image.reduce()`` averages boxes in the image's own integer mode. Alpha images are not
    reduced as RGBA (Pillow would premultiply into a second full-size copy): they are split into
    luminance and alpha planes (1 byte per pixel each), composited onto black at full size in
    uint8, and the planes reduced; :func:`_to_gray` finishes the compositing on the small image.
    Images we decoded ourselves (``own``) are closed as soon as they are no longer needed, which
    frees their pixels at once; a caller's image is never altered.
    """
    w, h = im.size
    factor = int(min(w / target[0], h / target[1]) / _REDUCING_GAP)
    mode = im.mode
    alpha_image = mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info)
    if alpha_image and w * h > _SPLIT_ABOVE_PIXELS:
        return _split_alpha(im, max(1, factor), own)
    if factor < 2:
        return im
    if mode == "P":
        small_source = im.convert("L")  # palette -> luminance directly: 1 byte per pixel, not RGB's 4
    elif mode == "1":
        small_source = im.convert("L")
    elif mode.startswith("I;16"):
        small_source = im.convert("I")  # reduce() does not take I;16
    else:
        small_source = im
    if small_source is not im and own:
        im.close()
    small = small_source.reduce(factor)
    if own or small_source is not im:
        small_source.close()
    return small


def _split_alpha(im: Image.Image, factor: int, own: bool) -> Image.Image:
    from PIL import ImageChops

    if im.mode not in ("LA", "RGBA"):
        rgba = im.convert("RGBA")  # P with transparency, PA, La, RGBa
        if own:
            im.close()
        im, own = rgba, True
    lum = im.convert("L")  # ignores alpha: luminance of the colour channels
    alpha = im.getchannel("A")
    if own:
        im.close()
    on_black = ImageChops.multiply(lum, alpha)  # lum * a / 255 in uint8: composited onto black
    lum.close()
    if factor >= 2:
        small_black, small_alpha = on_black.reduce(factor), alpha.reduce(factor)
        on_black.close()
        alpha.close()
    else:
        small_black, small_alpha = on_black, alpha
    out = Image.merge("LA", (small_black, small_alpha))
    out.info["composited"] = True
    return out


def _to_gray(im: Image.Image, source_mode: str | None = None) -> Image.Image:
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
    if mode == "LA" and im.info.get("composited"):
        # From _split_alpha: L holds lum * a / 255 already (on black); only the background is left.
        la = np.asarray(im)
        black, alpha = la[..., 0].astype(np.uint16), la[..., 1].astype(np.uint16)
        cover = int(alpha.sum(dtype=np.uint64))
        dark_object = cover > 0 and int(black.sum(dtype=np.uint64)) * 255 < _VANISHING_LUMINANCE * cover
        if dark_object:
            black += np.uint16(255) - alpha  # onto white: lum*a/255 + 255*(1 - a/255)
        return Image.fromarray(np.minimum(black, 255).astype(np.uint8), "L")
    if mode in _ALPHA_MODES:
        # uint8/uint16 integer compositing: exact rounding, and 2 bytes per value instead of float32's 4.
        la = np.asarray(im.convert("LA" if mode in ("LA", "La") else "RGBA").convert("LA"))
        lum, alpha = la[..., 0].astype(np.uint16), la[..., 1].astype(np.uint16)
        cover = int(alpha.sum(dtype=np.uint64))
        weighted = lum * alpha  # <= 255 * 255: fits uint16
        dark_object = cover > 0 and int(weighted.sum(dtype=np.uint64)) < _VANISHING_LUMINANCE * cover
        if dark_object:
            weighted += np.uint16(255) * (np.uint16(255) - alpha)
        weighted += np.uint16(127)
        return Image.fromarray((weighted // np.uint16(255)).astype(np.uint8), "L")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im, dtype=np.int64)
        sixteen = mode.startswith("I;16") or (source_mode or "").startswith("I;16")
        top = 65535 if sixteen or arr.max(initial=0) > 255 else 255
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
    if config.channels == 3:
        return _colour_pixels(im, config, invert, reduce)
    target = (config.width, config.height)
    try:
        if reduce and im.format == "JPEG":
            # Let libjpeg decode at a reduced scale: a 6000x4000 photo costs ~1/64 of the work.
            im.draft("L" if im.mode == "L" else "RGB", (target[0] * 4, target[1] * 4))
        source_mode = im.mode
        # Only images decoded here count against the shared budget: arrays and a caller's PIL
        # image are already in memory. The reservation lasts until the full-size image is dropped.
        cost = decoded_bytes(im.mode, im.size) if reduce else 0
        with DECODE_BUDGET.reserve(cost) if reduce else _nothing():
            im.load()
            orientation = im.getexif().get(0x0112)
            im = _shrink(im, target, own=reduce)
        if orientation in _EXIF_TRANSPOSE:
            im = im.transpose(_EXIF_TRANSPOSE[orientation])
        gray = _to_gray(im, source_mode)
    except Exception as exc:
        raise _decode_error(exc) from None
    if gray.size != target or config.resize == "shorter_side_center_crop":
        gray = _fit(gray, target, config)
    pixels = np.asarray(gray, dtype=np.uint8)
    mode = invert or config.invert
    if mode == "always" or (mode == "auto" and _bright_border(pixels)):
        pixels = 255 - pixels
    return pixels


@contextmanager
def _nothing():
    yield


def _decode_error(exc: Exception) -> Exception:
    """What a failure while decoding/converting an image becomes: the project's own typed errors
    pass through; Pillow's (and its plugins') errors become ImageTooLarge / ImageDecodeError.
    Anything else is a bug here and is re-raised as it is."""
    if isinstance(exc, (ImageDecodeError, ImageTooLarge, DecodeBusy)):
        return exc
    if isinstance(exc, Image.DecompressionBombError):
        return ImageTooLarge(f"image refused as a decompression bomb: {exc}")
    if isinstance(exc, MemoryError):
        return ImageTooLarge("not enough memory to decode the image")
    # Pillow reports truncation as OSError("image file is truncated ..."); its plugins raise the
    # others on malformed chunks / IFDs / EXIF.
    if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, ZeroDivisionError)):
        return ImageDecodeError(f"cannot decode image (truncated or corrupt): {exc}")
    return exc


def _fit(img: Image.Image, target: tuple[int, int], config: PreprocessConfig = DEFAULT_CONFIG) -> Image.Image:
    """Resize by the config's policy (an "L" or "RGB" image):

    * ``letterbox``: keep the aspect ratio and centre on a background of the border's colour;
    * ``stretch``: to the target size, aspect ratio not kept;
    * ``shorter_side_center_crop``: scale so the target is ``crop_fraction`` of the image (224 of
      256, as torchvision's Resize + CenterCrop), then crop the centre.
    """
    w, h = img.size
    resample = INTERPOLATION[config.interpolation]
    if config.resize == "stretch":
        return img.resize(target, resample, reducing_gap=3.0)
    if config.resize == "shorter_side_center_crop":
        scale = max(target[0] / w, target[1] / h) / config.crop_fraction
        nw, nh = max(target[0], round(w * scale)), max(target[1], round(h * scale))
        resized = img.resize((nw, nh), resample, reducing_gap=3.0)
        left, top = (nw - target[0]) // 2, (nh - target[1]) // 2
        return resized.crop((left, top, left + target[0], top + target[1]))
    scale = min(target[0] / w, target[1] / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((nw, nh), resample, reducing_gap=3.0)
    if (nw, nh) == target:
        return resized
    arr = np.asarray(resized)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    fill = int(np.median(border)) if arr.ndim == 2 else tuple(int(v) for v in np.median(border, axis=0))
    canvas = Image.new(img.mode, target, fill)
    canvas.paste(resized, ((target[0] - nw) // 2, (target[1] - nh) // 2))
    return canvas


def _arrange(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB -> the model's channel order and layout (``pixel_shape``)."""
    if config.color == "BGR":
        rgb = rgb[..., ::-1]
    if config.layout == "NCHW":
        rgb = rgb.transpose(2, 0, 1)
    return np.ascontiguousarray(rgb)


# Modes Pillow's reduce() shrinks in place of a conversion (RGBA premultiplies into a second copy).
_REDUCIBLE = ("L", "RGB", "RGBA", "LA", "RGBX")


def _colour_pixels(im: Image.Image, config: PreprocessConfig, invert: str | None = None,
                   reduce: bool = False) -> np.ndarray:
    """Any Pillow image -> ``uint8`` pixels of a 3-channel model (``config.pixel_shape``).

    Memory: an image decoded here reserves its decoded size plus, for modes that must be converted
    or premultiplied before shrinking (anything but L/RGB), a full-size RGBA copy (4 bytes per pixel)
    from the shared :data:`DECODE_BUDGET`; it is shrunk by an integer factor (JPEG ``draft``,
    ``reduce``) before the final resize, so no full-size float copy is ever made.
    Transparency is composited onto white (a cut-out product shown as on a page).
    """
    target = (config.width, config.height)
    try:
        if reduce and im.format == "JPEG":
            im.draft("RGB", (target[0] * 4, target[1] * 4))
        source_mode = im.mode
        w, h = im.size
        cost = (decoded_bytes(im.mode, im.size) + (0 if im.mode in ("L", "RGB") else 4 * w * h)) if reduce else 0
        with DECODE_BUDGET.reserve(cost) if reduce else _nothing():
            im.load()
            orientation = im.getexif().get(0x0112)
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode == "PA":
                im = im.convert("RGBA")
            elif im.mode not in _REDUCIBLE:
                # 16-bit, 32-bit and float grey via the grayscale rules; CMYK, YCbCr, LAB, HSV to RGB.
                im = _to_gray(im, source_mode) if im.mode.startswith(("I", "F")) else im.convert("RGB")
            factor = int(min(im.size[0] / target[0], im.size[1] / target[1]) / _REDUCING_GAP)
            if factor >= 2:
                im = im.reduce(factor)
        if orientation in _EXIF_TRANSPOSE:
            im = im.transpose(_EXIF_TRANSPOSE[orientation])
        if im.mode in ("RGBA", "LA"):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba).convert("RGB")
        elif im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != target or config.resize == "shorter_side_center_crop":
            im = _fit(im, target, config)
    except Exception as exc:
        raise _decode_error(exc) from None
    pixels = np.asarray(im, dtype=np.uint8)
    mode = invert or config.invert
    if mode == "always" or (mode == "auto" and _bright_border(pixels)):
        pixels = 255 - pixels
    return _arrange(pixels, config)


def _bright_border(pixels: np.ndarray) -> bool:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # ([4k] or [4k, 3])
    return float(border.mean()) > 127.0
