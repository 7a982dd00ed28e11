"""The shipped cloud model on a real Triton Inference Server (``nvidia-pytriton``), on loopback.

This is the "foreign v2 server" of the interoperability story: NVIDIA's own ``tritonserver``
binary (bundled by pytriton) speaks the Open Inference Protocol v2 and does the HTTP parsing,
validation, dynamic batching and queueing; only the batched model call runs our Python
(``OnnxClassifier.predict_proba``, i.e. the same ONNX file and manifest temperature as our
FastAPI service). A v2 client sees the same model name, tensor names, datatypes and shapes.

API (used by ``tests/test_triton_interop.py`` and ``bench/cloud_throughput.py``)::

    from cloud_service.triton import TritonModelServer

    with TritonModelServer(max_batch_size=32, max_queue_delay_us=1000) as srv:
        srv.url            # "http://127.0.0.1:<port>"  -> /v2/models/fashion-mnist/infer
        srv.metrics_url    # Prometheus text (nv_inference_count, nv_inference_exec_count, ...)
        srv.classifier     # the OnnxClassifier behind it (for reference answers)

Every port defaults to 0 = a free port on ``host`` (127.0.0.1). Entering waits at most
``startup_timeout_s`` for the model to be ready, else raises :class:`TritonStartError` with the
tail of Triton's log; leaving stops tritonserver (and its python-backend stub) and removes the
workspace. From a shell: ``python -m cloud_service.triton --port 8001``.

Differences a v2 client can observe (by design of Triton, not ours):

* ``GET /v2`` names ``triton``; model metadata says ``platform: "python"`` and the model version
  is ``"1"`` (Triton versions are integers; the manifest version is in ``srv.model_version``).
* One datatype per input: FP32 by default; ``input_datatype="UINT8"`` declares raw pixels
  instead (normalised here with the manifest's mean/std). Sending the other type is a 400, so a
  client must follow the model metadata. Triton does not range-check UINT8 JSON values
  (300 wraps to 44).
* Error statuses: malformed JSON and a wrong element count are 500 (we answer 400); a full
  queue (``max_queue_size``) is 503 without ``Retry-After``.
* ``parameters.timeout`` (µs) is honoured as the queue timeout (``allow_timeout_override``).

Making it run on this machine: the python-backend stub is linked against ``libpython3.X.so``
and the dynamic loader would pick the distribution's copy (Debian's 3.11.2) while the stub's
``sys.path`` is this interpreter's stdlib (pyenv 3.11.7) -- model load then dies inside
``multiprocessing``. We therefore put this interpreter's own ``LIBDIR`` first on the
stub's ``LD_LIBRARY_PATH`` while tritonserver is spawned.
"""

from __future__ import annotations

from cloud_service.launch import free_port, url_host

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np

from edge_model.calibration import calibrated_softmax
from edge_model.errors import ArtifactError
from edge_model.preprocess import normalise
from edge_model.runtime import OnnxClassifier, SessionOptions

DEFAULT_MANIFEST = Path(__file__).resolve().parent / "artifacts" / "cloud-fp32.json"
MODEL_NAME = "fashion-mnist"
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
LOGITS_NAME = "logits"  # our service offers the raw logits too; so does this one

log = logging.getLogger(__name__)


class TritonError(RuntimeError):
    """Base of this module's errors."""


class TritonUnavailable(TritonError):
    """``nvidia-pytriton`` is not installed or cannot run here."""


class TritonStartError(TritonError):
    """tritonserver did not become ready in time (the message carries its log tail)."""


class TritonModelServer:
    """The cloud ONNX model on a pytriton-managed ``tritonserver``; a context manager."""

    def __init__(
        self,
        manifest_path: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        model_name: str = MODEL_NAME,
        input_datatype: Literal["FP32", "UINT8"] = "FP32",
        max_batch_size: int = 32,
        max_queue_delay_us: int = 1000,
        max_queue_size: int = 0,
        instances: int = 1,
        intra_op_threads: int = 1,
        startup_timeout_s: float = 60.0,
    ) -> None:
        if input_datatype not in ("FP32", "UINT8"):
            raise ValueError(f"input_datatype must be 'FP32' or 'UINT8', not {input_datatype!r}")
        for name, value, low in (("max_batch_size", max_batch_size, 1), ("instances", instances, 1),
                                 ("intra_op_threads", intra_op_threads, 1), ("max_queue_delay_us", max_queue_delay_us, 0),
                                 ("max_queue_size", max_queue_size, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, not {value}")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, not {startup_timeout_s}")
        self.manifest_path = Path(manifest_path) if manifest_path is not None else DEFAULT_MANIFEST
        self.host = host
        self._ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.model_name = model_name
        self.input_datatype = input_datatype
        self.max_batch_size = max_batch_size
        self.max_queue_delay_us = max_queue_delay_us
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.intra_op_threads = intra_op_threads
        self.startup_timeout_s = startup_timeout_s
        self.classifier: OnnxClassifier | None = None
        self._triton = None
        self._keeper: threading.Thread | None = None
        self._release = threading.Event()
        self._workdir: Path | None = None

    # -- endpoints ----------------------------------------------------------------------
    @property
    def http_port(self) -> int:
        return self._ports["http"]

    @property
    def grpc_port(self) -> int:
        return self._ports["grpc"]

    @property
    def metrics_port(self) -> int:
        return self._ports["metrics"]

    @property
    def url(self) -> str:
        """Base URL of the v2 REST API (``{url}/v2/models/{model_name}/infer``)."""
        return f"http://{url_host(self.host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def model_version(self) -> str:
        """The manifest's version (Triton itself reports version ``"1"``)."""
        if self.classifier is None:
            raise TritonError("server not started")
        return self.classifier.version

    def logs(self) -> str:
        """tritonserver's log so far (empty before start)."""
        if self._workdir is None:
            return ""
        try:
            return (self._workdir / "tritonserver.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "TritonModelServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self._triton is not None:
            raise TritonError("server already started")
        try:
            from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction
            from pytriton.triton import Triton, TritonConfig
        except ImportError as exc:
            raise TritonUnavailable(f"nvidia-pytriton is not installed ({exc}); pip install nvidia-pytriton") from exc

        self.classifier = OnnxClassifier(
            self.manifest_path, SessionOptions(intra_op_threads=self.intra_op_threads)
        )
        for key, port in self._ports.items():
            if port == 0:
                self._ports[key] = free_port(self.host)
        self._workdir = Path(tempfile.mkdtemp(prefix="triton-"))
        config = TritonConfig(
            http_address=self.host, http_port=self.http_port,
            grpc_address=self.host, grpc_port=self.grpc_port,
            metrics_address=self.host, metrics_port=self.metrics_port,
            allow_metrics=True, allow_gpu_metrics=False, allow_cpu_metrics=False,
            log_file=self._workdir / "tritonserver.log", log_verbose=0,
            exit_timeout_secs=5,
        )
        dtype = np.float32 if self.input_datatype == "FP32" else np.uint8
        h, w = self.classifier.input_shape
        model_config = ModelConfig(
            max_batch_size=self.max_batch_size,
            batcher=DynamicBatcher(
                max_queue_delay_microseconds=self.max_queue_delay_us,
                default_queue_policy=QueuePolicy(
                    timeout_action=TimeoutAction.REJECT,
                    allow_timeout_override=True,  # per-request parameters.timeout (µs)
                    max_queue_size=self.max_queue_size,
                ),
            ),
        )
        triton = Triton(config=config, workspace=self._workdir / "workspace")
        self._triton = triton
        try:
            infer = _make_infer_fn(self.classifier, self.input_datatype)
            triton.bind(
                model_name=self.model_name,
                infer_func=[infer] * self.instances,
                inputs=[Tensor(name=INPUT_NAME, dtype=dtype, shape=(1, h, w))],
                outputs=[
                    Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(len(self.classifier.labels),)),
                    Tensor(name=LOGITS_NAME, dtype=np.float32, shape=(len(self.classifier.labels),)),
                ],
                config=model_config,
                strict=True,
            )
            self._run_bounded(triton)
        except BaseException:
            self.stop()
            raise
        log.info("triton ready at %s (model %s, manifest version %s)", self.url, self.model_name, self.classifier.version)

    def _run_bounded(self, triton) -> None:
        # tritonserver is spawned with PR_SET_PDEATHSIG, i.e. it gets SIGTERM when the *thread*
        # that spawned it ends. A keeper thread spawns it and lives until stop(), so the caller's
        # thread may be anything; pytriton's own 120 s wait runs there too, so our bound holds.
        errors: list[BaseException] = []
        ready = threading.Event()
        self._release = threading.Event()

        def keep(release: threading.Event) -> None:
            try:
                triton.run()
            except BaseException as exc:  # surfaced below, with the server log
                errors.append(exc)
                return
            finally:
                ready.set()
            release.wait()

        self._keeper = threading.Thread(target=keep, args=(self._release,), name="pytriton-keeper", daemon=True)
        with _stub_libpython_env():
            self._keeper.start()
            ready.wait(self.startup_timeout_s)
        if errors or not ready.is_set():
            why = f"failed: {errors[0]}" if errors else f"not ready after {self.startup_timeout_s:.0f} s"
            tail = "\n".join(self.logs().splitlines()[-20:])
            raise TritonStartError(f"tritonserver on {self.url} {why}\n--- tritonserver log tail ---\n{tail}")

    def stop(self) -> None:
        """Stop tritonserver and remove the workspace; safe to call twice."""
        triton, self._triton = self._triton, None
        if triton is not None:
            try:
                triton.stop()  # SIGINT, waits for in-flight requests (exit_timeout_secs)
            except Exception as exc:  # shutting down anyway; keep the cleanup going
                log.warning("stopping tritonserver: %s", exc)
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            self._release.set()
            keeper.join(10.0)
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _make_infer_fn(classifier: OnnxClassifier, input_datatype: str):
    from pytriton.decorators import batch

    config = classifier.preprocess_config

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        x = inputs[INPUT_NAME]
        if input_datatype == "UINT8":
            x = normalise(x, config)
        logits = classifier.logits(np.ascontiguousarray(x, dtype=np.float32))
        # the one calibrated softmax (as OnnxClassifier.predict_proba), from one ONNX call
        return {OUTPUT_NAME: calibrated_softmax(logits, classifier.temperature), LOGITS_NAME: logits}

    return infer


@contextmanager
def _stub_libpython_env():
    """Point the python-backend stub at this interpreter's libpython (see module docstring)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and soname and Path(libdir, soname).exists()):
        yield  # static interpreter: the stub falls back to the system libpython
        return
    old = os.environ.get("LD_LIBRARY_PATH")
    os.environ["LD_LIBRARY_PATH"] = libdir if not old else f"{libdir}:{old}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = old



# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cloud_service.triton",
        description="Serve the shipped cloud model on a Triton Inference Server (nvidia-pytriton), v2 protocol.",
    )
    parser.add_argument("--manifest", type=Path, default=None, help=f"model manifest (default {DEFAULT_MANIFEST})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="HTTP port (0 = free port)")
    parser.add_argument("--grpc-port", type=int, default=0, help="0 = free port")
    parser.add_argument("--metrics-port", type=int, default=0, help="0 = free port")
    parser.add_argument("--input-datatype", choices=("FP32", "UINT8"), default="FP32")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-us", type=int, default=1000)
    parser.add_argument("--max-queue-size", type=int, default=0, help="0 = unbounded")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--intra-op-threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with TritonModelServer(
            args.manifest, host=args.host, http_port=args.port, grpc_port=args.grpc_port,
            metrics_port=args.metrics_port, input_datatype=args.input_datatype,
            max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
            max_queue_size=args.max_queue_size, instances=args.instances, intra_op_threads=args.intra_op_threads,
        ) as srv:
            print(f"ready: {srv.url}/v2/models/{srv.model_name} (grpc :{srv.grpc_port}, metrics {srv.metrics_url}); "
                  f"Ctrl-C stops", flush=True)
            while not stop.wait(1.0):
                pass
    except (TritonError, ArtifactError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
