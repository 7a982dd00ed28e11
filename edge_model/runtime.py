"""ONNX Runtime wrapper for a shipped classifier artifact (edge INT8 or cloud FP32).

``OnnxClassifier`` loads a manifest, reads the ONNX file once, verifies its sha256 and builds one shared
``onnxruntime.InferenceSession`` (thread-safe for concurrent ``run`` calls), warms it up, and
returns temperature-calibrated probabilities. onnxruntime's exceptions are translated here,
where they enter: :class:`ArtifactError` at load, :class:`InferenceError` at run.

No network code lives in this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_model.calibration import calibrated_softmax
from edge_model.errors import ArrayInputError, ArtifactError, InferenceError
from edge_model.manifest import Manifest, read_verified
from edge_model.preprocess import ImageInput, PreprocessConfig, preprocess, preprocess_batch

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
DEFAULT_EDGE_MANIFEST = ARTIFACTS_DIR / "edge-int8.json"


@dataclass(frozen=True)
class SessionOptions:
    intra_op_threads: int = 1  # batch-1 latency: one thread avoids pool wake-up cost
    inter_op_threads: int = 1
    warmup_runs: int = 3
    verify_sha256: bool = True


class OnnxClassifier:
    """A calibrated classifier over one ONNX file described by a manifest."""

    def __init__(
        self,
        manifest_path: str | Path,
        options: SessionOptions = SessionOptions(),
        preprocess_config: PreprocessConfig | None = None,
    ) -> None:
        self.manifest_path = Path(manifest_path)
        self.manifest = Manifest.load(self.manifest_path)
        self.model_path = self.manifest_path.parent / self.manifest.file
        if not self.model_path.is_file():
            raise ArtifactError(f"{self.model_path}: model file named by {self.manifest_path.name} not found")
        # Verify-then-load on one read: the session is built from the very bytes that were hashed.
        model_bytes = read_verified(self.model_path, self.manifest.sha256 if options.verify_sha256 else None)
        self.labels: tuple[str, ...] = tuple(self.manifest.labels)
        self.temperature = float(self.manifest.temperature)
        self.input_name = self.manifest.input.name
        self.preprocess_config = preprocess_config or PreprocessConfig.from_input_spec(self.manifest.input)
        self._session = _make_session(model_bytes, self.model_path, options)
        inputs = {i.name: i for i in self._session.get_inputs()}
        if self.input_name not in inputs:
            raise ArtifactError(f"{self.model_path}: manifest input {self.input_name!r} not among the graph's inputs {list(inputs)}")
        graph_input = inputs[self.input_name]
        expected = [1, *self.input_shape]
        if graph_input.type != "tensor(float)" or len(graph_input.shape) != 4 or list(graph_input.shape[1:]) != expected:
            raise ArtifactError(
                f"{self.model_path}: graph input is {graph_input.type} {graph_input.shape} but the manifest "
                f"declares float32 [N, {expected[0]}, {expected[1]}, {expected[2]}]"
            )
        outputs = [o.name for o in self._session.get_outputs()]
        if self.manifest.output_name not in outputs:
            raise ArtifactError(f"{self.model_path}: manifest output {self.manifest.output_name!r} not among {outputs}")
        self._outputs = [self.manifest.output_name]
        zero = np.zeros((1, 1, self.input_shape[0], self.input_shape[1]), dtype=np.float32)
        for _ in range(options.warmup_runs):
            self._probe(zero)
        out = self._probe(zero)
        if out.ndim != 2 or out.shape[1] != len(self.labels):
            raise ArtifactError(
                f"{self.model_path}: model emits logits of shape {out.shape} but the manifest lists {len(self.labels)} labels"
            )

    def _probe(self, x: np.ndarray) -> np.ndarray:
        # A graph that loads but cannot run is a broken artifact, not an inference-time failure.
        try:
            return self.logits(x)
        except InferenceError as exc:
            raise ArtifactError(f"{self.model_path}: warm-up inference failed: {exc}") from exc

    # -- properties -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.manifest.input.height, self.manifest.input.width

    @property
    def session(self):
        """The underlying ``onnxruntime.InferenceSession`` (for benchmarks and tooling)."""
        return self._session

    # -- inference ----------------------------------------------------------------------
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw logits for a normalised ``float32 [N, 1, H, W]`` batch."""
        try:
            return self._session.run(self._outputs, {self.input_name: x})[0]
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise InferenceError(f"{self.name}: onnxruntime failed: {exc}") from exc

    def predict_proba(self, x: np.ndarray, *, validate: bool = True) -> np.ndarray:
        """Calibrated probabilities ``float32 [N, C]`` for a normalised batch.

        ``validate=False`` skips the input checks, for callers whose ``x`` came out of
        :mod:`edge_model.preprocess` (already shaped, float32 and finite) -- the router's hot path.
        """
        if validate:
            self._check_input(x)
            if x.shape[0] == 0:
                return np.empty((0, len(self.labels)), dtype=np.float32)
        return calibrated_softmax(self.logits(x), self.temperature, inplace=True)

    def _check_input(self, x: np.ndarray) -> None:
        if not isinstance(x, np.ndarray):
            raise ArrayInputError(f"model input must be a numpy array; got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1:] != (1, *self.input_shape) or x.dtype != np.float32:
            raise ArrayInputError(f"model input must be float32 [N, 1, {self.input_shape[0]}, {self.input_shape[1]}]; got {x.dtype} {x.shape}")
        if not np.isfinite(x).all():
            raise ArrayInputError("model input contains NaN or infinite values")

    def preprocess(self, image: ImageInput) -> np.ndarray:
        return preprocess(image, self.preprocess_config)

    def preprocess_batch(self, images) -> np.ndarray:
        return preprocess_batch(images, self.preprocess_config)

    def classify(self, images) -> np.ndarray:
        """Images (anything the preprocessing accepts) -> calibrated probabilities."""
        return self.predict_proba(self.preprocess_batch(images))


def _make_session(model: bytes, path: Path, options: SessionOptions):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ArtifactError(f"{path}: onnxruntime cannot load the model: {exc}") from exc


class EdgeModel(OnnxClassifier):
    """The on-device triage classifier (INT8 by default)."""

    def __init__(self, manifest_path: str | Path = DEFAULT_EDGE_MANIFEST, **kwargs) -> None:
        super().__init__(manifest_path, **kwargs)
