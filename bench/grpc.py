#!/usr/bin/env python3
"""gRPC against REST (issue 22): the same model server, the same input, three encodings.

For the digits MLP (one row of 64 floats) and a MobileNetV2-architecture CNN (one image,
150,528 floats; generated into $SERVAL_CACHE/models by `make -C models mobilenet`), one
serval-sidecar each, called directly, in one run:

- REST JSON: an Open Inference Protocol JSON request;
- REST binary: the binary tensor extension (a JSON header, then the raw little-endian floats);
- REST binary over HTTP/2 (h2c prior knowledge, `--http2`): the protocol's cost alone;
- gRPC: `inference.GRPCInferenceService/ModelInfer` with `raw_input_contents`, over HTTP/2, on
  the same port.

serval-loadgen runs a closed loop at c = 1 and c = 8 for each (`--grpc` for the last);
req/s and p50 are reported, with gRPC's ratio to each REST encoding. Standard library only:
the gRPC message is encoded here by hand (a few protobuf fields). Writes grpc.{json,txt}.

    grpc.py [--out bench/results] [--quick]
"""

import argparse
import json
import struct
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overload import CACHE, RELEASE, free_port, loadgen, log, spawn, stop, values  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "digits": (REPO / "models/digits.onnx", "X", [1, 64]),
    "mobilenetv2": (CACHE / "models/mobilenetv2.onnx", "input", [1, 3, 224, 224]),
}
SERVICE = "/inference.GRPCInferenceService/ModelInfer"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def grpc_body(model: str, name: str, shape: list, raw: bytes) -> bytes:
    """A framed ModelInferRequest: model_name (1), one input (5: name 1, datatype 2, shape 3
    packed) and its raw_input_contents (7)."""
    tensor = (field(1, name.encode()) + field(2, b"FP32")
              + field(3, b"".join(varint(d) for d in shape)))
    message = field(1, model.encode()) + field(5, tensor) + field(7, raw)
    return b"\0" + struct.pack(">I", len(message)) + message


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--quick", action="store_true", help="short windows, to check the harness")
    args = ap.parse_args()
    window = ["--warmup", "1", "--duration", "3"] if args.quick else ["--warmup", "2",
                                                                      "--duration", "8"]
    scratch = Path(tempfile.mkdtemp(prefix="serval-bench-grpc-"))
    results: dict = {}
    for model, (path, input_name, shape) in MODELS.items():
        if not path.exists():
            raise RuntimeError(f"{path} is missing: make -C models mobilenet")
        port = free_port()
        server = spawn([RELEASE / "serval-sidecar", "--model", path, "--name", model, "--port",
                        port, "--host", "127.0.0.1"], scratch, model)
        try:
            data = values(shape)
            json_body = json.dumps({"inputs": [{"name": input_name, "shape": shape,
                                                "datatype": "FP32",
                                                "data": [round(v, 3) for v in data]}]}).encode()
            header = json.dumps({"inputs": [{"name": input_name, "shape": shape,
                                             "datatype": "FP32", "parameters":
                                                 {"binary_data_size": len(data) * 4}}]}).encode()
            files = {}
            for kind, body in (("rest_json", json_body), ("rest_binary", header + data.tobytes()),
                               ("grpc", grpc_body(model, input_name, shape, data.tobytes()))):
                files[kind] = scratch / f"{model}-{kind}.bin"
                files[kind].write_bytes(body)
            url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
            deadline = time.time() + 120
            while True:
                try:
                    req = urllib.request.Request(url, json_body,
                                                 {"content-type": "application/json"})
                    with urllib.request.urlopen(req, timeout=30) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"{model}'s sidecar is not ready; see {scratch}")
                time.sleep(0.3)
            runs = {
                "rest_json": (url, ["content-type: application/json"], []),
                "rest_binary": (url, ["content-type: application/octet-stream",
                                      f"inference-header-content-length: {len(header)}"], []),
                # The same REST binary request over HTTP/2 (h2c): what the protocol costs,
                # apart from gRPC's own framing and decoding.
                "rest_binary_h2": (url, ["content-type: application/octet-stream",
                                         f"inference-header-content-length: {len(header)}"],
                                   ["--http2"]),
                "grpc": (f"http://127.0.0.1:{port}{SERVICE}", [], ["--grpc"]),
            }
            results[model] = {"body_bytes": {k: f.stat().st_size for k, f in files.items()}}
            for c in (1, 8):
                for kind, (u, headers, extra) in runs.items():
                    log(f"{model} {kind} c = {c}")
                    body_file = files["rest_binary" if kind == "rest_binary_h2" else kind]
                    rep, _, _ = loadgen(u, body_file, headers,
                                        ["--concurrency", c] + extra + window, 300)
                    results[model][f"{kind}@c{c}"] = {
                        "rps": rep["rps"], "p50_us": rep["p50_us"], "p99_us": rep["p99_us"],
                        "errors": rep["error_count"]}
        finally:
            stop(server)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpc.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["gRPC against REST on one serval-sidecar, called directly (bench/grpc.py)", ""]
    for model, r in results.items():
        b = r["body_bytes"]
        lines.append(f"{model}: request bytes JSON {b['rest_json']:,}, binary "
                     f"{b['rest_binary']:,}, gRPC {b['grpc']:,}")
        for c in (1, 8):
            for kind in ("rest_json", "rest_binary", "rest_binary_h2", "grpc"):
                v = r[f"{kind}@c{c}"]
                lines.append(f"  c = {c}  {kind:14} {v['rps']:9.0f} req/s  p50 "
                             f"{v['p50_us'] / 1000:8.3f} ms  p99 {v['p99_us'] / 1000:8.3f} ms  "
                             f"errors {v['errors']}")
            g = r[f"grpc@c{c}"]["rps"]
            lines.append(f"  c = {c}  gRPC / REST binary {g / r[f'rest_binary@c{c}']['rps']:.2f}x,"
                         f" gRPC / REST JSON {g / r[f'rest_json@c{c}']['rps']:.2f}x,"
                         f" gRPC / REST binary over HTTP/2 "
                         f"{g / r[f'rest_binary_h2@c{c}']['rps']:.2f}x req/s")
        lines.append("")
    (out / "grpc.txt").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
