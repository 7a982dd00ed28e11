"""The manifest shipped next to every ONNX artifact, and its integrity check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_model.errors import ArtifactError


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "input"
    shape: list[int] = Field(default_factory=lambda: [-1, 1, 28, 28], description="-1 = dynamic batch")
    dtype: Literal["float32"] = "float32"
    layout: Literal["NCHW"] = "NCHW"
    # x_model = (pixel / 255 - mean) / std, exactly as in training.
    mean: float = 0.0
    std: float = 1.0
    # Fashion-MNIST draws light objects on a black background.
    background: Literal["dark", "light"] = "dark"

    @model_validator(mode="after")
    def _check(self) -> "InputSpec":
        s = self.shape
        if len(s) != 4 or s[1] != 1 or s[2] <= 0 or s[3] <= 0 or (s[0] != -1 and s[0] <= 0):
            raise ValueError(f"shape must be [N or -1, 1, H, W] with H, W > 0; got {s}")
        if not self.std > 0:
            raise ValueError(f"std must be > 0; got {self.std}")
        return self

    @property
    def height(self) -> int:
        return self.shape[2]

    @property
    def width(self) -> int:
        return self.shape[3]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    version: str
    file: str = Field(description="ONNX file name, relative to the manifest")
    sha256: str
    precision: Literal["fp32", "int8"] = "fp32"
    labels: list[str]
    input: InputSpec
    output_name: str = "logits"
    temperature: float = Field(1.0, gt=0)
    flops: int = Field(0, description="multiply-accumulates x2 for one image")
    params: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)
    recipe: dict[str, Any] = Field(default_factory=dict)
    twin: str | None = Field(None, description="FP32 twin of a quantized model, relative file name")

    @field_validator("file", "twin")
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

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{path}: manifest not found") from None
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: unreadable manifest ({exc})") from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ArtifactError(f"{path}: invalid manifest: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


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
