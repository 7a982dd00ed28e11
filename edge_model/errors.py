"""Errors raised by the local model package.

::

    EdgeModelError                 base of everything raised here
     ├── DatasetError              missing / corrupt IDX files or labeled folders
     ├── ArtifactError             model file or manifest missing, unreadable, sha256 mismatch
     ├── InferenceError            onnxruntime failed while running a loaded model
     └── InputError (ValueError)   an input the preprocessing refuses
          ├── ImageDecodeError     not an image, empty, truncated, undecodable
          ├── ImageTooLarge        pixel count or decoded bytes over the configured limit (from the header)
          └── ArrayInputError      wrong rank / shape / dtype, NaN or inf, float pixels without normalised=True
     DecodeBusy                    the shared decode-memory budget stayed exhausted for the allowed wait

The router and the cloud service translate these at their own edges
(router: ``RouterError`` subclasses; service: HTTP 4xx/5xx).
"""

from __future__ import annotations


class EdgeModelError(Exception):
    """Base class of this package's errors."""


class DatasetError(EdgeModelError):
    pass


class ArtifactError(EdgeModelError):
    pass


class InferenceError(EdgeModelError):
    pass


class InputError(EdgeModelError, ValueError):
    pass


class ImageDecodeError(InputError):
    pass


class ImageTooLarge(InputError):
    pass


class ArrayInputError(InputError):
    pass


class DecodeBusy(EdgeModelError):
    """Not an input fault: other decodes hold the shared memory budget; retry shortly (service: 503)."""
