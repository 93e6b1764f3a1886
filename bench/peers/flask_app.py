"""Flask + onnxruntime behind gunicorn: the model server people write by hand.

gunicorn imports this module in each worker; configuration comes from the environment:
BENCH_MODEL (path), BENCH_NAME (model name in the path), BENCH_ORT_THREADS (default 1)."""

import os

from flask import Flask, Response, request

from tensors import decode, encode, session

MODEL = os.environ["BENCH_MODEL"]
NAME = os.environ["BENCH_NAME"]
SESSION = session(MODEL, int(os.environ.get("BENCH_ORT_THREADS", "1")))
INPUT = SESSION.get_inputs()[0].name
OUTPUTS = [o.name for o in SESSION.get_outputs()]

app = Flask(__name__)


@app.post("/v2/models/<name>/infer")
def infer(name: str):
    if name != NAME:
        return Response('{"error":"unknown model"}', status=404, mimetype="application/json")
    x = decode(request.get_data())
    out = SESSION.run(None, {INPUT: x})
    return Response(encode(NAME, OUTPUTS, out), mimetype="application/json")
