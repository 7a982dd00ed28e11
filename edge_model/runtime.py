"""ONNX Runtime wrapper for a shipped classifier artifact (edge INT8 or cloud FP32).

``OnnxClassifier`` loads a manifest, reads the ONNX file once, verifies its sha256 and builds one shared
``onnxruntime.InferenceSession`` (thread-safe for concurrent ``run`` calls), warms it up, and
returns temperature-calibrated probabilities. The manifest's contract says what the graph takes
(shape, layout, dtype) and what it emits: ``logits`` go through the one calibrated softmax,
``probabilities`` are only renormalised (a graph ending in Softmax is never softmaxed twice), and
``log_probabilities`` are exponentiated and renormalised; a temperature other than 1 scales the
log-probabilities in the last two cases. onnxruntime's exceptions are translated here,
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
    # With more than one intra-op thread, ONNX Runtime's pool threads spin between ops and for a
    # while after a run: after one they take cores from anything else on the machine. True puts
    # them to sleep when a run ends (sleeping between ops too costs more wake-ups than a second
    # thread gains on small batches).
    spin_only_in_run: bool = False


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
        spec = self.manifest.input
        self.sample_shape: tuple[int, ...] = self.preprocess_config.sample_shape
        self.input_dtype = np.dtype(spec.dtype)
        if not _same_shape(graph_input.shape, spec.shape) or graph_input.type != ORT_TYPES[spec.dtype]:
            raise ArtifactError(
                f"{self.model_path}: graph input is {graph_input.type} {graph_input.shape} but the manifest "
                f"declares {spec.dtype} {spec.shape} ({spec.layout if spec.codec == 'image' else 'tensor'}); "
                "fix the manifest's input shape/layout/dtype"
            )
        outputs = [o.name for o in self._session.get_outputs()]
        if self.manifest.output_name not in outputs:
            raise ArtifactError(f"{self.model_path}: manifest output {self.manifest.output_name!r} not among {outputs}")
        self._outputs = [self.manifest.output_name]
        self.output_kind = self.manifest.output_kind
        self._run = _direct_run(self._session, self.input_name)
        zero = np.zeros((1, *(d if d > 0 else 1 for d in self.sample_shape)), dtype=self.input_dtype)
        for _ in range(options.warmup_runs):
            self._probe(zero)
        out = self._probe(zero)
        if out.ndim != 2 or out.shape[1] != len(self.labels):
            raise ArtifactError(
                f"{self.model_path}: model emits {self.output_kind} of shape {out.shape} but the manifest lists "
                f"{len(self.labels)} labels"
            )
        if self.output_kind == "logits" and _looks_like_probabilities(out):
            # A softmax over probabilities squashes them toward uniform: every request would look unsure.
            raise ArtifactError(
                f"{self.model_path}: output {self.manifest.output_name!r} already sums to 1 per row (the graph ends "
                "in a softmax) but the manifest says logits; set output_kind: probabilities"
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
        """``(H, W)`` of an image model (the first format's API; see ``sample_shape`` for the full one)."""
        spec = self.manifest.input
        if spec.codec != "image":
            raise AttributeError(f"{self.name} takes a tensor {list(self.sample_shape)}, not an image")
        return spec.height, spec.width

    @property
    def session(self):
        """The underlying ``onnxruntime.InferenceSession`` (for benchmarks and tooling)."""
        return self._session

    # -- inference ----------------------------------------------------------------------
    def logits(self, x: np.ndarray) -> np.ndarray:
        """The graph's raw output (logits, or probabilities / log-probabilities as ``output_kind``
        says) for a model-input batch ``[N, *sample_shape]``."""
        try:
            return self._run(self._outputs, {self.input_name: x}, None)[0]
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
        if self.output_kind == "logits":  # to_probabilities' first case, without its call layer (hot path)
            return calibrated_softmax(self.logits(x), self.temperature, inplace=True)
        return self.to_probabilities(self.logits(x))

    def to_probabilities(self, out: np.ndarray) -> np.ndarray:
        """The graph's raw output -> calibrated probabilities ``float32 [N, C]`` by ``output_kind``."""
        if self.output_kind == "logits":
            # The output is this call's own buffer: softmaxed in place when float32 (a copy otherwise).
            return calibrated_softmax(out, self.temperature, inplace=True)
        return probabilities_from(out, self.output_kind, self.temperature)

    def _check_input(self, x: np.ndarray) -> None:
        if not isinstance(x, np.ndarray):
            raise ArrayInputError(f"model input must be a numpy array; got {type(x).__name__}")
        want = self.sample_shape
        if (x.ndim != len(want) + 1 or any(w > 0 and d != w for d, w in zip(x.shape[1:], want))
                or x.dtype != self.input_dtype):
            shown = ", ".join(str(d) if d > 0 else "?" for d in want)
            raise ArrayInputError(f"model input must be {self.input_dtype} [N, {shown}]; got {x.dtype} {x.shape}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ArrayInputError("model input contains NaN or infinite values")

    def preprocess(self, image: ImageInput) -> np.ndarray:
        return preprocess(image, self.preprocess_config)

    def preprocess_batch(self, images) -> np.ndarray:
        return preprocess_batch(images, self.preprocess_config)

    def classify(self, images) -> np.ndarray:
        """Images (anything the preprocessing accepts) -> calibrated probabilities."""
        return self.predict_proba(self.preprocess_batch(images))


ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "uint8": "tensor(uint8)",
             "int64": "tensor(int64)", "int32": "tensor(int32)"}


def _same_shape(graph: list, declared: list[int]) -> bool:
    """The graph's input shape (ints, symbolic names or None for dynamic dims) agrees with the
    manifest's (-1 for dynamic): same rank, equal where both are fixed; the manifest may fix a
    dimension the graph leaves dynamic (e.g. an image size), but not free one the graph fixes
    (except the batch)."""
    if len(graph) != len(declared):
        return False
    for i, (g, d) in enumerate(zip(graph, declared)):
        fixed = isinstance(g, int) and g > 0
        if fixed and d > 0 and g != d:
            return False
        if fixed and d < 0 and i > 0:
            return False
    return True


def _looks_like_probabilities(out: np.ndarray) -> bool:
    arr = np.asarray(out, dtype=np.float64)
    return bool(np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1
                and np.abs(arr.sum(axis=1) - 1).max() < 1e-4)


def probabilities_from(out: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """Probabilities or log-probabilities a graph emitted -> rows that sum to 1 (float32).

    Never a second softmax over probabilities (that flattens them toward uniform: every request
    would look unsure). Temperature ``T`` acts on log-probabilities, as on logits: ``p**(1/T)``.
    """
    arr = np.asarray(out, dtype=np.float32)
    if kind == "log_probabilities":
        arr = np.exp(arr * np.float32(1.0 / temperature) if temperature != 1.0 else arr)
    else:
        arr = np.clip(arr, 0.0, None)
        if temperature != 1.0:
            arr = arr ** np.float32(1.0 / temperature)
    sums = arr.sum(axis=-1, keepdims=True)
    return arr / np.where(sums > 0, sums, np.float32(1.0))


def _direct_run(session, input_name: str):
    """The session's run as the bindings expose it, when what onnxruntime's Python ``run`` checks
    on every call is known here once: the feed names the graph's one required input, no OrtValue
    of another session is passed, CPU only (no graph capture, no provider fallback). Those checks
    were ~2 us of a ~30 us batch-1 inference. Any other session, or another onnxruntime layout:
    the public ``run`` (same arguments)."""
    inner = getattr(session, "_sess", None)
    required = [i.name for i in session.get_inputs() if not i.type.startswith("optional")]
    if (inner is None or not callable(getattr(inner, "run", None)) or required != [input_name]
            or session.get_providers() != ["CPUExecutionProvider"]):
        return session.run
    return inner.run


def _make_session(model: bytes, path: Path, options: SessionOptions):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if options.spin_only_in_run:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ArtifactError(f"{path}: onnxruntime cannot load the model: {exc}") from exc


class EdgeModel(OnnxClassifier):
    """The on-device triage classifier (INT8 by default)."""

    def __init__(self, manifest_path: str | Path = DEFAULT_EDGE_MANIFEST, **kwargs) -> None:
        super().__init__(manifest_path, **kwargs)
