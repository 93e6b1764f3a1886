"""Flask + onnxruntime behind gunicorn: the model server people write by hand.

gunicorn imports this module in each worker; configuration comes from the environment:
BENCH_MODEL (path), BENCH_NAME (model name in the path), BENCH_ORT_THREADS (default 1),
BENCH_LABELS (class names, for the JPEG endpoint).

- POST /v2/models/<name>/infer: a V2 JSON request (peers/tensors.py) -> V2 JSON outputs;
- POST /v1/models/<name>:predict: a JPEG body -> {"label", "index", "score"} (peers/imaging.py);
- POST /models/<name>/raw: raw float32 bytes of one [1, 3, 224, 224] row -> raw float32 logits."""

import os

import numpy as np
from flask import Flask, Response, request

from imaging import answer_json, load_labels, preprocess, raw_row
from tensors import decode, encode, session

MODEL = os.environ["BENCH_MODEL"]
NAME = os.environ["BENCH_NAME"]
SESSION = session(MODEL, int(os.environ.get("BENCH_ORT_THREADS", "1")))
INPUT = SESSION.get_inputs()[0].name
OUTPUTS = [o.name for o in SESSION.get_outputs()]
LABELS = load_labels() if os.environ.get("BENCH_LABELS") else None

app = Flask(__name__)


def unknown() -> Response:
    return Response('{"error":"unknown model"}', status=404, mimetype="application/json")


@app.post("/v2/models/<name>/infer")
def infer(name: str):
    if name != NAME:
        return unknown()
    x = decode(request.get_data())
    out = SESSION.run(None, {INPUT: x})
    return Response(encode(NAME, OUTPUTS, out), mimetype="application/json")


@app.post("/v1/models/<name>:predict")
def predict(name: str):
    if name != NAME:
        return unknown()
    logits = SESSION.run(None, {INPUT: preprocess(request.get_data())})[0]
    return Response(answer_json(logits, LABELS), mimetype="application/json")


@app.post("/models/<name>/raw")
def raw(name: str):
    if name != NAME:
        return unknown()
    logits = SESSION.run(None, {INPUT: raw_row(request.get_data())})[0]
    return Response(logits.astype(np.float32).tobytes(), mimetype="application/octet-stream")
