"""KServe's Python model server (`kserve.ModelServer`) with a `kserve.Model` running
onnxruntime.

Usage: kserve_server.py --model_path PATH --model_name NAME --http_port PORT --workers 2
       [--ort_threads 1] [--labels labels.json]   (other flags are KServe's own, e.g.
       --enable_grpc false)

- POST /v2/models/<name>/infer, Open Inference Protocol V2 REST: JSON tensors, or with the
  binary tensor extension (`inference-header-content-length`), which KServe decodes itself
  (`InferRequest.from_bytes`) and answers in binary when the request asks for it;
- POST /v1/models/<name>:predict with a non-JSON body (`image/jpeg`): KServe's V1 endpoint hands
  the raw body to `predict` (`DataPlane.decode` passes bodies of other content types through),
  which decodes and resizes it with Pillow (peers/imaging.py) -> {"label", "index", "score"}."""

import argparse
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kserve  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse  # noqa: E402
from kserve import model_server  # noqa: E402

from imaging import load_labels, preprocess, top1  # noqa: E402
from tensors import NUMPY_TO_V2, session  # noqa: E402


class OnnxModel(kserve.Model):
    def __init__(self, name: str, path: str, threads: int, labels: str | None = None):
        super().__init__(name)
        self.path = path
        self.threads = threads
        self.labels_path = labels
        self.load()

    def load(self) -> bool:
        self.session = session(self.path, self.threads)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.labels = load_labels(self.labels_path) if self.labels_path else None
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

    def predict(self, payload: InferRequest | bytes, headers=None) -> InferResponse | dict:
        if isinstance(payload, bytes):  # a JPEG on the V1 endpoint
            logits = self.session.run(None, {self.input: preprocess(payload)})[0]
            return top1(logits, self.labels)[0]
        x = payload.inputs[0].as_numpy()
        outs = self.session.run(None, {self.input: x})
        binary = payload.use_binary_outputs or any(
            r.binary_data for r in payload.request_outputs or [])
        return InferResponse(
            response_id=payload.id or str(uuid.uuid4()),
            model_name=self.name,
            infer_outputs=[
                InferOutput(name=n, shape=list(o.shape), datatype=NUMPY_TO_V2.get(o.dtype, "FP32"),
                            data=o if binary else o.ravel().tolist())
                for n, o in zip(self.outputs, outs)
            ],
            requested_outputs=payload.request_outputs,
            use_binary_outputs=payload.use_binary_outputs,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser], conflict_handler="resolve")
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--ort_threads", type=int, default=1)
    parser.add_argument("--labels", default=None, help="class names of the JPEG endpoint")
    args, _ = parser.parse_known_args()
    model = OnnxModel(args.model_name, args.model_path, args.ort_threads, args.labels)
    kserve.ModelServer().start([model])
