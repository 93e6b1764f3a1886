"""Ray Serve with onnxruntime and Serve's documented dynamic batching (`@serve.batch`).

Usage: ray_server.py --model PATH --name NAME --port PORT [--replicas 2] [--max-batch-size 32]
       [--batch-wait-s 0.002] [--ort-threads 1] [--labels labels.json]
Starts a local Ray instance limited to 2 CPUs, deploys the model at route prefix `/`, and serves
until SIGTERM. One deployment answers every workload, by path:
- POST /v2/models/<name>/infer: a V2 JSON request (peers/tensors.py) -> V2 JSON outputs;
- POST /v1/models/<name>:predict: a JPEG body -> {"label", "index", "score"} (peers/imaging.py);
- POST /models/<name>/raw: raw float32 bytes of one [1, 3, 224, 224] row -> raw float32 logits.
Each request is decoded in the replica, then its row joins a batch (`infer`)."""

import argparse
import json
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402

from imaging import load_labels, preprocess, raw_row, top1  # noqa: E402
from tensors import decode, encode, session  # noqa: E402


@serve.deployment
class OnnxModel:
    def __init__(self, path: str, name: str, threads: int, max_batch: int, wait_s: float,
                 labels: str | None):
        self.name = name
        self.labels = load_labels(labels) if labels else None
        self.session = session(path, threads)
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        # Serve's batch settings are per instance, set through the documented setters.
        self.infer.set_max_batch_size(max_batch)
        self.infer.set_batch_wait_timeout_s(wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def infer(self, rows: list) -> list:
        counts = [r.shape[0] for r in rows]
        outs = self.session.run(None, {self.input: np.concatenate(rows)})
        answers, start = [], 0
        for n in counts:
            answers.append([o[start:start + n] for o in outs])
            start += n
        return answers

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path.endswith(":predict"):
            outs = await self.infer(preprocess(await request.body()))
            return Response(json.dumps(top1(outs[0], self.labels)[0]),
                            media_type="application/json")
        if path.endswith("/raw"):
            outs = await self.infer(raw_row(await request.body()))
            return Response(outs[0].astype(np.float32).tobytes(),
                            media_type="application/octet-stream")
        x = decode(await request.body())
        outs = await self.infer(x)
        return Response(encode(self.name, self.outputs, outs), media_type="application/json")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-s", type=float, default=0.002)
    p.add_argument("--ort-threads", type=int, default=1)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--labels", default=None, help="class names of the JPEG endpoint")
    a = p.parse_args()

    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    app = OnnxModel.options(
        num_replicas=a.replicas,
        ray_actor_options={"num_cpus": a.cpus / a.replicas},
        # Serve's docs: max_ongoing_requests must be at least max_batch_size or batches never fill.
        max_ongoing_requests=max(64, a.max_batch_size),
    ).bind(os.path.abspath(a.model), a.name, a.ort_threads, a.max_batch_size, a.batch_wait_s,
           a.labels)
    serve.run(app, name="bench", route_prefix="/", blocking=False)
    print("ray serve ready", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
