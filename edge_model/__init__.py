"""The local model: preprocessing, manifests, calibration math and the ONNX runtime.

Knows nothing of networks. Runs on the device; training, datasets and quantization tools live in
``router_tools`` (the tools distribution).
"""

from edge_model.errors import (
    ArrayInputError,
    ArtifactError,
    DatasetError,
    EdgeModelError,
    ImageDecodeError,
    ImageTooLarge,
    InferenceError,
    InputError,
)
# (``preprocess`` the function is not re-exported: it would shadow the submodule of that name.)
from edge_model.preprocess import PreprocessConfig, preprocess_batch, to_pixels
from edge_model.runtime import EdgeModel, OnnxClassifier, SessionOptions

__all__ = [
    "ArrayInputError", "ArtifactError", "DatasetError", "EdgeModel", "EdgeModelError",
    "ImageDecodeError", "ImageTooLarge", "InferenceError", "InputError", "OnnxClassifier",
    "PreprocessConfig", "SessionOptions", "preprocess_batch", "to_pixels",
]
