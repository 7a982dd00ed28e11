"""The cloud model behind KServe's ModelServer: the custom ``kserve.Model`` a user would write.

Run by ``bench/cloud_throughput.py`` with the interpreter of its own KServe environment
(``bench/.venvs/kserve``; never a dependency of this project), so it imports nothing of ours:

    bench/.venvs/kserve/bin/python bench/kserve_model.py --onnx cloud_service/artifacts/cloud-fp32.onnx \
        --mean 0.286 --std 0.353 --temperature 0.89013 --http_port 8080 --workers 1

Same model file, one ONNX Runtime thread, same v2 request as the service (``UINT8 [1, 1, 28, 28]``
JSON; FP32 is taken as already normalised), same answer (temperature-calibrated softmax as
``probabilities``). ``predict`` is synchronous, as in KServe's custom-model examples: KServe then
runs it on the event loop. No batching (KServe's adaptive batcher is a separate agent container).
Request logging is off (access log, latency and timing logs), as in our service.
"""

import argparse

import numpy as np
import onnxruntime as ort
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve.utils.utils import generate_uuid


class FashionMnist(Model):
    def __init__(self, name: str, onnx: str, mean: float, std: float, temperature: float) -> None:
        super().__init__(name)
        self.onnx, self.mean, self.std, self.inv_t = onnx, mean, std, 1.0 / temperature
        self.session = None
        self.load()

    def load(self) -> bool:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.onnx, sess_options=so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True
        return True

    # workers > 1: KServe pickles the model into spawned worker processes; a session does not pickle.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "session"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.load()

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        t = payload.inputs[0]
        x = t.as_numpy().astype(np.float32)
        if t.datatype == "UINT8":
            x = (x / 255.0 - self.mean) / self.std
        x = np.ascontiguousarray(x.reshape(-1, 1, 28, 28), dtype=np.float32)
        logits = self.session.run(None, {self.input_name: x})[0]
        z = np.exp((logits - logits.max(axis=1, keepdims=True)) * self.inv_t)
        probs = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
        out = InferOutput(name="probabilities", shape=list(probs.shape), datatype="FP32")
        out.set_data_from_numpy(probs, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or generate_uuid())


def _loopback_only() -> None:
    """KServe binds 0.0.0.0; a benchmark listens on loopback only (the parent binds for every worker)."""
    init = uvicorn.Config.__init__

    def loopback_init(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "host": "127.0.0.1"})

    uvicorn.Config.__init__ = loopback_init


if __name__ == "__main__":
    _loopback_only()
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--mean", type=float, required=True)
    parser.add_argument("--std", type=float, required=True)
    parser.add_argument("--temperature", type=float, required=True)
    args, _ = parser.parse_known_args()
    model = FashionMnist(args.model_name, args.onnx, args.mean, args.std, args.temperature)
    ModelServer(enable_grpc=False, enable_latency_logging=False).start([model])
