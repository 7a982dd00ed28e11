"""The local model: data, preprocessing, ONNX runtime, quantization and training.

Knows nothing of networks. ``train`` (torch) is never imported at run time.
"""

from edge_model.data import LABELS
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
    "LABELS", "ArrayInputError", "ArtifactError", "DatasetError", "EdgeModel", "EdgeModelError",
    "ImageDecodeError", "ImageTooLarge", "InferenceError", "InputError", "OnnxClassifier",
    "PreprocessConfig", "SessionOptions", "preprocess_batch", "to_pixels",
]
