"""KServe's Python model server (`kserve.ModelServer`) with a `kserve.Model` running
onnxruntime, served over KServe's Open Inference Protocol V2 REST endpoint.

Usage: kserve_server.py --model_path PATH --model_name NAME --http_port PORT --workers 2
       [--ort_threads 1]   (other flags are KServe's own, e.g. --enable_grpc false)"""

import argparse
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kserve  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse  # noqa: E402
from kserve import model_server  # noqa: E402

from tensors import NUMPY_TO_V2, session  # noqa: E402


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str, threads: int):
        super().__init__(name)
        self.path = path
        self.threads = threads
        self.load()

    def load(self) -> bool:
        self.session = session(self.path, self.threads)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    # With --workers > 1 KServe pickles the model into spawned worker processes: each loads its
    # own session there (onnxruntime sessions cannot be pickled).
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.load()

    def predict(self, payload: InferRequest, headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        outs = self.session.run(None, {self.input: x})
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=[
                InferOutput(name=n, shape=list(o.shape), datatype=NUMPY_TO_V2.get(o.dtype, "FP32"),
                            data=o.ravel().tolist())
                for n, o in zip(self.outputs, outs)
            ],
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser], conflict_handler="resolve")
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--ort_threads", type=int, default=1)
    args, _ = parser.parse_known_args()
    model = OnnxModel(args.model_name, args.model_path, args.ort_threads)
    kserve.ModelServer().start([model])
