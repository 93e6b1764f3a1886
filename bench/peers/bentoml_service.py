"""BentoML: one `@bentoml.service` running onnxruntime, served by `bentoml serve
bentoml_service:Bench` (bench/run.py starts it from this folder). Configuration from the
environment: BENCH_MODEL (path), BENCH_NAME (model name in the paths), BENCH_WORKERS (default
2), BENCH_ORT_THREADS (default 1), BENCH_MAX_BATCH (default 32), BENCH_MAX_LATENCY_MS
(default BentoML's own, 60000), BENCH_LABELS (class names, for the JPEG endpoint).

Endpoints:
- POST /v2/models/<name>/infer: the same V2 JSON request body as every system's (one input
  tensor of one row), through an adaptive-batching API (`batchable=True`): BentoML parses the
  body's `inputs` field into a list, its dispatcher concatenates the lists of concurrent
  requests into one batch, and each request gets its own list back (a JSON list holding one
  V2-style response).
- POST /v1/models/<name>:predict: a JPEG as the raw body (`Content-Type: image/jpeg`), BentoML's
  documented "root input" of type `PIL.Image.Image`, answered {"label", "index", "score"}.
- POST /models/<name>/raw: raw float32 bytes of one [1, 3, 224, 224] row as the body (a root
  input of type `bytes`), answered with the raw float32 logits.

The two root-input endpoints are not batchable: BentoML batches only list or array inputs
parsed from JSON or multipart fields, and its batching containers refuse PIL images and raw
bytes. See bench/README.md for why that costs the CNN nothing here."""

import os
import sys
from typing import Annotated

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bentoml  # noqa: E402
import numpy as np  # noqa: E402
from PIL.Image import Image  # noqa: E402
from bentoml.validators import ContentType  # noqa: E402

from imaging import load_labels, preprocess_image, raw_row, top1  # noqa: E402
from tensors import NUMPY_TO_V2, V2_TO_NUMPY, session  # noqa: E402

NAME = os.environ.get("BENCH_NAME", "model")
MAX_BATCH = int(os.environ.get("BENCH_MAX_BATCH", "32"))
# BentoML's own default; a lower value makes the dispatcher answer 503 to requests it predicts
# would exceed it, rather than shortening a wait (the batch window is adaptive, not a knob).
MAX_LATENCY_MS = int(os.environ.get("BENCH_MAX_LATENCY_MS", "60000"))
# 0: the V2 endpoint without adaptive batching (for comparison only; run.py batches).
BATCHABLE = os.environ.get("BENCH_BATCHABLE", "1") != "0"


@bentoml.service(
    name="bench",
    workers=int(os.environ.get("BENCH_WORKERS", "2")),
    # One request (or batch) at a time per worker: each worker has one onnxruntime thread.
    threads=1,
    logging={"access": {"enabled": False}},
)
class Bench:
    def __init__(self) -> None:
        self.session = session(os.environ["BENCH_MODEL"],
                               int(os.environ.get("BENCH_ORT_THREADS", "1")))
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        labels = os.environ.get("BENCH_LABELS")
        self.labels = load_labels(labels) if labels else None

    @bentoml.api(route=f"/v2/models/{NAME}/infer", batchable=BATCHABLE,
                 max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, inputs: list[dict]) -> list[dict]:
        rows = [np.asarray(t["data"], dtype=V2_TO_NUMPY[t["datatype"]]).reshape(t["shape"])
                for t in inputs]
        outs = self.session.run(None, {self.input: np.concatenate(rows)})
        answers, start = [], 0
        for r in rows:
            n = r.shape[0]
            answers.append({"model_name": NAME, "outputs": [
                {"name": name, "datatype": NUMPY_TO_V2.get(o.dtype, "FP32"),
                 "shape": [n, *o.shape[1:]], "data": o[start:start + n].ravel().tolist()}
                for name, o in zip(self.outputs, outs)]})
            start += n
        return answers

    @bentoml.api(route=f"/v1/models/{NAME}:predict")
    def predict(self, image: Image, /) -> dict:
        logits = self.session.run(None, {self.input: preprocess_image(image)})[0]
        return top1(logits, self.labels)[0]

    @bentoml.api(route=f"/models/{NAME}/raw")
    def raw(self, body: bytes, /) -> Annotated[bytes, ContentType("application/octet-stream")]:
        logits = self.session.run(None, {self.input: raw_row(body)})[0]
        return logits.astype(np.float32).tobytes()
