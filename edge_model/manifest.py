"""The manifest shipped next to every ONNX artifact: the model contract, and its integrity check.

The contract both sides read (the edge runtime, the cloud service, the router's v2 client and the
tools); fields left out take the defaults of the first (Fashion-MNIST) format, so manifests of that
format load unchanged:

=================  =============================================  ======================================
field              values                                         default
=================  =============================================  ======================================
``input.name``     the graph's input name                         ``input``
``input.codec``    ``image`` (decode + preprocess) | ``tensor``   ``image``
                   (an array of ``shape``/``dtype`` passed through:
                   text / tabular models whose app encodes)
``input.shape``    ``[N, ...]``, ``-1`` = dynamic                  ``[-1, 1, 28, 28]``
``input.layout``   ``NCHW`` | ``NHWC``                             ``NCHW``
``input.dtype``    ``float32`` | ``float16`` | ``uint8``           ``float32``
                   (tensor codec also ``int64`` | ``int32``)
``input.color``    ``L`` | ``RGB`` | ``BGR``                       ``L``
``input.scale``    pixel multiplier before mean/std               ``1/255``
``input.mean``     scalar or one per channel                      ``0``
``input.std``      scalar or one per channel                      ``1``
``input.resize``   ``letterbox`` | ``stretch`` |                  ``letterbox``
                   ``shorter_side_center_crop``
``input.crop_fraction``  centre-crop share (``224/256``)          ``0.875``
``input.interpolation``  ``nearest|bilinear|bicubic|lanczos|box``  ``lanczos``
``input.invert``   ``never`` | ``auto`` (bright border ->          ``never``; ``auto`` for a manifest
                   inverted) | ``always``                         of the first format (``background``)
``output_name``    the graph's output name                        ``logits``
``output_kind``    ``logits`` | ``probabilities`` |               ``logits``
                   ``log_probabilities``
``labels`` /       inline list, or a file next to the manifest    (one of the two is required)
``labels_file``    (one label per line, or a JSON list)
``calibration``    ``threshold`` and the ``expected_escalation``   none: the policy's threshold and
                   it gave on ``split`` (a release's travels      ``drift.expected_escalation``
                   with it: router/updates.py)
``name``, ``version``, ``file``, ``sha256``, ``temperature``, ``twin`` (FP32 twin of an INT8 model)
=================  =============================================  ======================================

Model input is ``((pixel * scale) - mean) / std`` in float32 (cast to float16 for float16 models);
``uint8`` models take the pixels as they are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_model.errors import ArtifactError

IMAGE_DTYPES = ("float32", "float16", "uint8")
CHANNELS = {"L": 1, "RGB": 3, "BGR": 3}


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "input"
    codec: Literal["image", "tensor"] = "image"
    shape: list[int] = Field(default_factory=lambda: [-1, 1, 28, 28], description="-1 = dynamic")
    dtype: Literal["float32", "float16", "uint8", "int64", "int32"] = "float32"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["L", "RGB", "BGR"] = "L"
    # x_model = (pixel * scale - mean) / std, exactly as in training.
    scale: float = Field(1 / 255, gt=0)
    mean: Union[float, list[float]] = 0.0
    std: Union[float, list[float]] = 1.0
    resize: Literal["letterbox", "stretch", "shorter_side_center_crop"] = "letterbox"
    crop_fraction: float = Field(0.875, gt=0, le=1, description="shorter_side_center_crop: crop / resized side")
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = "lanczos"
    invert: Optional[Literal["never", "auto", "always"]] = None
    # First format: Fashion-MNIST draws light objects on a black background. Stating it keeps that
    # format's automatic inversion of bright-border images (``invert: auto``).
    background: Optional[Literal["dark", "light"]] = None

    @field_validator("invert", mode="before")
    @classmethod
    def _invert_bool(cls, v: Any) -> Any:
        return {False: "never", True: "always"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check(self) -> "InputSpec":
        s = self.shape
        if self.invert is None:
            self.invert = "auto" if self.background is not None else "never"
        if not s or (s[0] != -1 and s[0] <= 0) or any(d == 0 or d < -1 for d in s):
            raise ValueError(f"shape must be [N or -1, ...] with dimensions > 0 or -1; got {s}")
        if self.codec == "tensor":
            return self
        if self.dtype not in IMAGE_DTYPES:
            raise ValueError(f"an image model's dtype must be one of {IMAGE_DTYPES}; got {self.dtype} "
                             "(use codec: tensor for token ids or other integer inputs)")
        c = CHANNELS[self.color]
        if len(s) != 4 or min(s[1:]) <= 0:
            raise ValueError(f"an image model's shape must be [N or -1, C, H, W] (NCHW) or [N or -1, H, W, C] (NHWC) "
                             f"with fixed C, H, W; got {s}")
        got = s[1] if self.layout == "NCHW" else s[3]
        if got != c:
            raise ValueError(f"shape {s} in layout {self.layout} has {got} channels but color {self.color} needs {c}")
        for field in ("mean", "std"):
            v = getattr(self, field)
            vals = v if isinstance(v, list) else [v]
            if len(vals) not in (1, c):
                raise ValueError(f"{field} must be one value or {c} (one per channel); got {len(vals)}")
        stds = self.std if isinstance(self.std, list) else [self.std]
        if not all(x > 0 for x in stds):
            raise ValueError(f"std must be > 0; got {self.std}")
        if self.dtype == "uint8" and (self.mean_values != (0.0,) * len(self.mean_values) or
                                      self.std_values != (1.0,) * len(self.std_values)):
            raise ValueError("a uint8-input model takes pixels 0-255 as they are: leave mean at 0 and std at 1")
        return self

    @property
    def channels(self) -> int:
        return CHANNELS[self.color]

    @property
    def height(self) -> int:
        return self.shape[2] if self.layout == "NCHW" else self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[3] if self.layout == "NCHW" else self.shape[2]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape (the batch dimension dropped)."""
        return tuple(self.shape[1:])

    @property
    def mean_values(self) -> tuple[float, ...]:
        return tuple(self.mean) if isinstance(self.mean, list) else (float(self.mean),)

    @property
    def std_values(self) -> tuple[float, ...]:
        return tuple(self.std) if isinstance(self.std, list) else (float(self.std),)


class Calibration(BaseModel):
    """The routing calibration of this model: the confidence threshold chosen for it and the
    escalation share that threshold gave on ``split`` (what the drift alarm's band is centred
    on). Optional; a manifest without it loads as before."""

    model_config = ConfigDict(extra="forbid")

    threshold: Optional[float] = Field(None, ge=0, le=1)
    expected_escalation: Optional[float] = Field(None, ge=0, le=1)
    split: Optional[str] = Field(None, description="where it was measured, e.g. validation")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    version: str
    file: str = Field(description="ONNX file name, relative to the manifest")
    sha256: str
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    labels: list[str]
    labels_file: Optional[str] = Field(None, description="where the labels were read from (next to the manifest)")
    input: InputSpec
    output_name: str = "logits"
    output_kind: Literal["logits", "probabilities", "log_probabilities"] = "logits"
    temperature: float = Field(1.0, gt=0)
    flops: int = Field(0, description="multiply-accumulates x2 for one image")
    params: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)
    recipe: dict[str, Any] = Field(default_factory=dict)
    twin: str | None = Field(None, description="FP32 twin of a quantized model, relative file name")
    calibration: Optional[Calibration] = Field(None, description="threshold and expected escalation chosen for it")

    @field_validator("file", "twin", "labels_file")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        # Artifacts sit next to their manifest; a path here could point anywhere on disk.
        if v is not None and (not v or Path(v).name != v or v in (".", "..") or "\\" in v):
            raise ValueError(f"must be a plain file name next to the manifest; got {v!r}")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("must be 64 lowercase hex digits")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        if len(v) < 2 or len(set(v)) != len(v) or not all(v):
            raise ValueError(f"need at least two distinct, non-empty labels; got {v}")
        return v

    @property
    def labels_sha256(self) -> str:
        return labels_digest(self.labels)

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{path}: manifest not found") from None
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: unreadable manifest ({exc})") from exc
        if isinstance(raw, dict) and raw.get("labels_file") and "labels" not in raw:
            name = raw["labels_file"]
            if isinstance(name, str) and Path(name).name == name and name not in (".", ".."):
                raw["labels"] = read_labels(path.parent / name)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:  # one line: the field and what is wrong with it
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                                 for e in exc.errors()[:3])
            raise ArtifactError(f"{path}: invalid manifest: {problems}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


def read_labels(path: str | Path) -> list[str]:
    """Labels from a file: a JSON list, or one label per line (blank lines skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the labels file ({exc.strerror or exc})") from None
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except ValueError as exc:
            raise ArtifactError(f"{path}: labels file is not a valid JSON list ({exc})") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ArtifactError(f"{path}: a JSON labels file must be a list of strings")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


def labels_digest(labels) -> str:
    """sha256 of the labels as a JSON list: what a service may publish instead of the list."""
    return hashlib.sha256(json.dumps(list(labels), ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return h.hexdigest()


def read_verified(path: str | Path, sha256: str | None) -> bytes:
    """The file's bytes, read once and checked against ``sha256`` (None: not checked).

    Callers build from these bytes, never by reopening the path: a file swapped between a
    check and a later open would otherwise be loaded unchecked.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ArtifactError(
                f"{path}: sha256 {actual[:12]}... does not match the manifest's {sha256[:12]}... (file changed or corrupt)"
            )
    return data
