"""Write a Triton / KServe model repository for the shipped cloud model, calibrated in the graph.

The shipped ONNX file outputs raw ``logits``; our service applies the manifest temperature and
softmax in Python. A stock Triton (``onnxruntime`` backend) or KServe (whose ``onnx`` format
runs on Triton) serves the graph as is, so this script appends
``probabilities = Softmax(logits * (1 / T), axis=1)`` to the graph and writes::

    <out>/fashion-mnist/config.pbtxt      # onnxruntime backend, dynamic batching, queue policy
    <out>/fashion-mnist/labels.txt        # class names (Triton's classification extension)
    <out>/fashion-mnist/1/model.onnx      # input FP32 [-1,1,28,28] -> probabilities, logits FP32 [-1,10]

so any v2 client sees the same model name, tensors and answers as from our service. The result
is checked with onnxruntime against ``OnnxClassifier.predict_proba`` before the script returns.

``python -m cloud_service.export_triton --out model_repository`` (needs the ``onnx`` package,
which the ``train`` extra installs; nothing imports it at serving time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from edge_model.errors import ArtifactError
from edge_model.runtime import OnnxClassifier, SessionOptions

DEFAULT_MANIFEST = Path(__file__).resolve().parent / "artifacts" / "cloud-fp32.json"
MODEL_NAME = "fashion-mnist"
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
LOGITS_NAME = "logits"


class ExportError(RuntimeError):
    """The repository could not be written or the exported graph disagrees with the reference."""


def export_model_repository(
    out_dir: str | Path,
    manifest_path: str | Path | None = None,
    *,
    model_name: str = MODEL_NAME,
    version: int = 1,
    max_batch_size: int = 32,
    max_queue_delay_us: int = 1000,
    max_queue_size: int = 64,
    intra_op_threads: int = 1,
    instances: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write the repository under ``out_dir``; returns the path of the exported ``model.onnx``."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as exc:
        raise ExportError(f"the onnx package is needed to export ({exc}); pip install 'hybrid-edge-router-server[export]'") from exc
    if version < 1:
        raise ExportError(f"Triton model versions are positive integers; got {version}")
    if max_batch_size < 1 or max_queue_delay_us < 0 or max_queue_size < 0 or intra_op_threads < 1 or instances < 1:
        raise ExportError("max_batch_size, intra_op_threads and instances must be >= 1; delays and sizes >= 0")

    classifier = OnnxClassifier(manifest_path or DEFAULT_MANIFEST, SessionOptions(warmup_runs=0))
    manifest = classifier.manifest
    if manifest.input.name != INPUT_NAME:
        raise ExportError(f"{classifier.manifest_path}: input is named {manifest.input.name!r}, expected {INPUT_NAME!r}")

    model = onnx.load(str(classifier.model_path))
    graph = model.graph
    if any(o.name == OUTPUT_NAME for o in graph.output) or any(OUTPUT_NAME in n.output for n in graph.node):
        raise ExportError(f"{classifier.model_path}: graph already has a tensor named {OUTPUT_NAME!r}")
    logits = manifest.output_name
    if logits != LOGITS_NAME:
        raise ExportError(f"{classifier.model_path}: output is named {logits!r}, expected {LOGITS_NAME!r}")
    inv_t = np.float32(1.0 / manifest.temperature)  # the same float32 factor predict_proba multiplies by
    graph.initializer.append(helper.make_tensor("inv_temperature", TensorProto.FLOAT, [], [float(inv_t)]))
    graph.node.append(helper.make_node("Mul", [logits, "inv_temperature"], ["scaled_logits"], name="temperature"))
    graph.node.append(helper.make_node("Softmax", ["scaled_logits"], [OUTPUT_NAME], name="calibrated_softmax", axis=1))
    # probabilities first, then the raw logits (as our service offers both)
    graph.output.insert(0, helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", len(classifier.labels)]))
    model.doc_string = (
        f"{manifest.name} {manifest.version}: temperature-calibrated probabilities (T={manifest.temperature})"
    )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph is invalid: {exc}") from exc

    model_dir = Path(out_dir) / model_name
    version_dir = model_dir / str(version)
    onnx_path = version_dir / "model.onnx"
    if onnx_path.exists() and not overwrite:
        raise ExportError(f"{onnx_path} exists; pass overwrite=True (--overwrite) to replace it")
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(onnx_path))
    (model_dir / "labels.txt").write_text("\n".join(classifier.labels) + "\n")
    h, w = classifier.input_shape
    (model_dir / "config.pbtxt").write_text(_config_pbtxt(
        model_name=model_name, h=h, w=w, classes=len(classifier.labels), max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us, max_queue_size=max_queue_size,
        intra_op_threads=intra_op_threads, instances=instances,
    ))
    _verify(onnx_path, classifier)
    return onnx_path


def _config_pbtxt(*, model_name, h, w, classes, max_batch_size, max_queue_delay_us, max_queue_size,
                  intra_op_threads, instances) -> str:
    return f"""\
# Generated by cloud_service.export_triton: the shipped cloud model with temperature + softmax in the graph.
name: "{model_name}"
backend: "onnxruntime"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ 1, {h}, {w} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {classes} ]
    label_filename: "labels.txt"
  }},
  {{
    name: "{LOGITS_NAME}"
    data_type: TYPE_FP32
    dims: [ {classes} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
  default_queue_policy {{
    timeout_action: REJECT
    allow_timeout_override: true  # a request's parameters.timeout (microseconds) bounds its queue time
    max_queue_size: {max_queue_size}  # full queue -> 503; 0 = unbounded
  }}
}}
instance_group [
  {{
    count: {instances}
    kind: KIND_CPU
  }}
]
parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{intra_op_threads}" }} }}
parameters {{ key: "inter_op_thread_count" value: {{ string_value: "1" }} }}
"""


def _verify(onnx_path: Path, classifier: OnnxClassifier) -> None:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise ExportError(f"{onnx_path}: onnxruntime cannot load the exported model: {exc}") from exc
    h, w = classifier.input_shape
    x = np.random.default_rng(0).normal(size=(5, 1, h, w)).astype(np.float32)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    want = classifier.predict_proba(x)
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
        raise ExportError(f"{onnx_path}: exported probabilities differ from the reference (max |d| "
                          f"{np.abs(got - want).max() if got.shape == want.shape else 'shape ' + str(got.shape)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloud_service.export_triton",
        description="Write a Triton/KServe model repository serving calibrated probabilities of the cloud model.",
    )
    parser.add_argument("--out", type=Path, required=True, help="model repository directory")
    parser.add_argument("--manifest", type=Path, default=None, help=f"model manifest (default {DEFAULT_MANIFEST})")
    parser.add_argument("--model-name", default=MODEL_NAME)
    parser.add_argument("--version", type=int, default=1, help="Triton version directory (integer)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-us", type=int, default=1000)
    parser.add_argument("--max-queue-size", type=int, default=64, help="0 = unbounded")
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = export_model_repository(
            args.out, args.manifest, model_name=args.model_name, version=args.version,
            max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
            max_queue_size=args.max_queue_size, intra_op_threads=args.intra_op_threads,
            instances=args.instances, overwrite=args.overwrite,
        )
    except (ExportError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path.parent.parent} (verified against onnxruntime); serve with: "
          f"tritonserver --model-repository={args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
