"""The manifest shipped next to every ONNX artifact, and its integrity check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
