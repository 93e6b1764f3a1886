#!/usr/bin/env python3
"""Serval against the systems people use today, on one machine, in one run.

Each system under test is started as its own process tree on 127.0.0.1, serving the same ONNX
model, and driven by `serval-loadgen` (closed loop, keep-alive HTTP/1.1, HDR histograms) at
several concurrencies. CPU time and peak RSS of the server's whole process tree are sampled
with psutil. Repetitions interleave the systems (repetition r starts at the r-th system), and
the report gives medians with min-max spread and ratios against Serval.

    run.py [--quick] [--reps N] [--concurrency 1,8,32,64] [--systems a,b] [--models a,b]

Writes results/results.json, results/README.md and results/<model>.png.
See bench/README.md for every system's configuration and why.
"""

import argparse
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

# The CPU budget every system gets: two inference workers (threads or processes) on a 2-core
# machine. See README.md.
WORKERS = 2
# Serval's defaults, mirrored in the peers that batch (Ray Serve).
MAX_BATCH = 32
BATCH_WAIT_S = 0.002
# Longest wait for a system to answer its first request (Ray's start-up is the slowest, ~15 s).
READY_TIMEOUT_S = 180
# Resource sampling interval of the server's process tree (PSS reads smaps: not too often).
SAMPLE_S = 0.2


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


# ---------------------------------------------------------------------------------------------
# Systems under test


@dataclass
class Running:
    """A started system: its processes (each the root of a tree) and the URL to load."""
    procs: list
    url: str
    workdir: Path
    # For proxies: one backend called directly, the baseline of the proxy's added latency.
    direct_url: str | None = None
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


def sidecar_cmd(model: Model, port: int, workers: int, max_batch: int) -> list:
    return [RELEASE / "serval-sidecar", "--model", model.path, "--name", model.name,
            "--host", "127.0.0.1", "--port", port, "--workers", workers,
            "--max-batch-size", max_batch]


QUIET_RUST = {"RUST_LOG": "warn"}


def start_serval(model: Model, wd: Path, batched: bool = True) -> Running:
    port = free_port()
    cmd = sidecar_cmd(model, port, WORKERS, model.max_batch if batched else 1)
    p = spawn(cmd, wd, "sidecar", QUIET_RUST)
    return Running([p], f"http://127.0.0.1:{port}/v2/models/{model.name}/infer", wd)


def start_pair(model: Model, wd: Path) -> tuple:
    """Two sidecars with one inference worker each: the same 2-worker budget, split 90/10."""
    procs, ports = [], []
    for i in range(2):
        port = free_port()
        ports.append(port)
        procs.append(spawn(sidecar_cmd(model, port, 1, model.max_batch), wd, f"sidecar-{i}",
                           QUIET_RUST))
    return procs, ports


def start_router(model: Model, wd: Path) -> Running:
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
    return Running(procs, f"http://127.0.0.1:{port}/v2/models/{model.name}/infer", wd,
                   f"http://127.0.0.1:{pa}/v2/models/{model.name}/infer")


def nginx_bin() -> str | None:
    for c in ("/usr/sbin/nginx", shutil.which("nginx")):
        if c and os.path.exists(c):
            return c
    return None


def start_nginx(model: Model, wd: Path) -> Running:
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
    return Running(procs, f"http://127.0.0.1:{port}/v2/models/{model.name}/infer", wd,
                   f"http://127.0.0.1:{pa}/v2/models/{model.name}/infer")


def start_ray(model: Model, wd: Path) -> Running:
    port = free_port()
    cmd = [PY, HERE / "peers/ray_server.py", "--model", model.path, "--name", model.name,
           "--port", port, "--replicas", WORKERS, "--cpus", WORKERS,
           "--max-batch-size", model.max_batch, "--batch-wait-s", BATCH_WAIT_S,
           "--ort-threads", 1]
    # Ray's session directory holds unix sockets, whose paths must stay under 108 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="sbray-", dir="/tmp")
    (wd / "ray-tmp").symlink_to(ray_tmp)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    return Running([spawn(cmd, wd, "ray", env)],
                   f"http://127.0.0.1:{port}/v2/models/{model.name}/infer", wd)


def start_kserve(model: Model, wd: Path) -> Running:
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
    return Running([spawn(cmd, wd, "kserve")],
                   f"http://127.0.0.1:{port}/v2/models/{model.name}/infer", wd)


def start_flask(model: Model, wd: Path) -> Running:
    port = free_port()
    gunicorn = Path(PY).with_name("gunicorn")
    cmd = [gunicorn, "--workers", WORKERS, "--worker-class", "gthread", "--threads", 1,
           "--bind", f"127.0.0.1:{port}", "--chdir", HERE / "peers", "--log-level", "warning",
           "--timeout", 60, "--keep-alive", 75, "flask_app:app"]
    env = {"BENCH_MODEL": str(model.path), "BENCH_NAME": model.name, "BENCH_ORT_THREADS": "1"}
    return Running([spawn(cmd, wd, "flask", env)],
                   f"http://127.0.0.1:{port}/v2/models/{model.name}/infer", wd)


@dataclass
class System:
    name: str
    start: object
    models: tuple
    describe: str


SYSTEMS = [
    System("serval", lambda m, wd: start_serval(m, wd, True), ("digits", "mobilenetv2"),
           f"serval-sidecar, {WORKERS} workers, adaptive batching (max batch 32, CNN 8; 2 ms)"),
    System("serval-unbatched", lambda m, wd: start_serval(m, wd, False),
           ("digits", "mobilenetv2"), f"serval-sidecar, {WORKERS} workers, --max-batch-size 1"),
    System("serval-router", start_router, ("digits",),
           "serval-router (2 threads) -> 2 sidecars (1 worker each), 90/10 split"),
    System("nginx", start_nginx, ("digits",),
           "nginx (2 worker processes) -> the same 2 sidecars, weights 9/1, keep-alive"),
    System("ray-serve", start_ray, ("digits", "mobilenetv2"),
           f"Ray Serve, {WORKERS} replicas x 1 ort thread, @serve.batch(32, 2 ms)"),
    System("kserve", start_kserve, ("digits", "mobilenetv2"),
           f"KServe ModelServer, {WORKERS} uvicorn workers x 1 ort thread, V2 REST"),
    System("flask-gunicorn", start_flask, ("digits", "mobilenetv2"),
           f"Flask + gunicorn gthread, {WORKERS} workers x 1 thread x 1 ort thread"),
]


def post(url: str, body: bytes, timeout: float = 10) -> tuple:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


KEPT_SIZE = re.compile(r'serval_calibration_rows_per_second\{[^}]*batch_size="(\d+)",kept="true"')


def kept_batch_sizes(url: str) -> list | None:
    """The batch sizes a sidecar's start-up calibration kept, from its /metrics; None if the
    system is not a sidecar or the page is unreadable."""
    base = url.split("/v2/")[0]
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None
    sizes = sorted({int(m) for m in KEPT_SIZE.findall(text)})
    return sizes or None


def answer(resp: bytes) -> str:
    """The answer's gist, to check every system computes the same thing: the first output's
    argmax (a label or a class)."""
    try:
        out = json.loads(resp)["outputs"]
        data = out[0]["data"] if len(out) == 1 else next(
            (o["data"] for o in out if o["name"] == "label"), out[0]["data"])
        return str(int(np.argmax(data)) if len(data) > 1 else data[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unreadable"


def wait_ready(run: Running, body: bytes, name: str) -> tuple:
    """(seconds until the system answered the real request with 200, the answer's gist)."""
    t0 = time.time()
    while time.time() - t0 < READY_TIMEOUT_S:
        if not run.alive():
            raise RuntimeError(f"{name} exited during start-up; see {run.workdir}")
        status, resp = post(run.url, body)
        if status == 200:
            return time.time() - t0, answer(resp)
        time.sleep(0.25)
    raise RuntimeError(f"{name} not ready after {READY_TIMEOUT_S} s; see {run.workdir}")


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


def loadgen(url: str, body_file: Path, concurrency: int, warmup: float, duration: float) -> dict:
    cmd = [str(RELEASE / "serval-loadgen"), "--url", url, "--body", str(body_file),
           "--concurrency", str(concurrency), "--warmup", str(warmup),
           "--duration", str(duration)]
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


def measure_system(system: System, model: Model, body_file: Path, body: bytes, rep: int,
                   args, scratch: Path) -> list:
    wd = Path(tempfile.mkdtemp(prefix=f"{system.name}-{model.name}-", dir=scratch))
    run = system.start(model, wd)
    rows = []
    try:
        ready_s, gist = wait_ready(run, body, system.name)
        kept = kept_batch_sizes(run.url) if system.name.startswith("serval") else None
        sampler = Sampler(run)
        sampler.start()
        # A longer unrecorded warm-up once per start (JITs, allocators, Ray's replicas).
        loadgen(run.url, body_file, max(args.concurrency), 0, args.start_warmup)
        for c in args.concurrency:
            t0 = time.time()
            r = loadgen(run.url, body_file, c, args.warmup, args.duration)
            t1 = time.time()
            # The loadgen's measured window is its last `duration` seconds.
            cpu, rss, pss = sampler.window(t1 - args.duration, t1)
            r.update(system=system.name, model=model.name, rep=rep, ready_s=round(ready_s, 2),
                     answer=gist, kept_batch_sizes=kept,
                     cpu_s=round(cpu, 3), cores=round(cpu / args.duration, 3),
                     # Requests per CPU-second of the server's tree: what each system gets out
                     # of the same CPU, independent of how busy the load generator kept it.
                     rps_per_cpu=round(r["rps"] * args.duration / cpu, 1) if cpu > 0 else None,
                     peak_rss_mb=round(rss / 2**20, 1), peak_pss_mb=round(pss / 2**20, 1),
                     wall_s=round(t1 - t0, 2))
            rows.append(r)
            log(f"  {model.name:<12} {system.name:<17} c={c:<3} {r['rps']:>9.0f} req/s "
                f"p50 {r['p50_us'] / 1000:8.2f} ms  p99 {r['p99_us'] / 1000:8.2f} ms  "
                f"err {r['error_count']:<5} cpu {r['cores']:.2f} cores  "
                f"rss {r['peak_rss_mb']:.0f} MB pss {r['peak_pss_mb']:.0f} MB")
            if run.direct_url and c == min(args.concurrency):
                d = loadgen(run.direct_url, body_file, c, args.warmup, args.duration)
                d.update(system=f"{system.name}:direct", model=model.name, rep=rep)
                rows.append(d)
                log(f"  {model.name:<12} {system.name + ':direct':<17} c={c:<3} "
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
    found = {"command": portable(" ".join(map(str, cmd))), "stdout": portable(out.stdout)}
    ratios = [float(m.group(2)) for m in RAW_RATIO.finditer(out.stdout)]
    if ratios:
        found["sidecar_over_raw"] = ratios[-1]
    rps = [float(m.group(2)) for m in RAW_RPS.finditer(out.stdout) if m.group(1) != "1"]
    if rps:
        found["raw_rps"] = rps[0]
    return found if len(found) > 2 else None


# ---------------------------------------------------------------------------------------------
# Summaries


METRICS = ("rps", "p50_us", "p90_us", "p99_us", "max_us", "cpu_s", "cores", "rps_per_cpu",
           "peak_rss_mb", "peak_pss_mb")


def summarize(rows: list) -> list:
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["system"], r["concurrency"]), []).append(r)
    out = []
    for (m, s, c), rs in groups.items():
        entry = {"model": m, "system": s, "concurrency": c, "runs": len(rs),
                 "errors": sum(r["error_count"] for r in rs)}
        for k in METRICS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if not vals:
                continue
            entry[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        kept = sorted({tuple(r["kept_batch_sizes"]) for r in rs if r.get("kept_batch_sizes")})
        if kept:
            entry["kept_batch_sizes"] = [list(k) for k in kept]
        out.append(entry)
    return out


def med(summary: list, model: str, system: str, c: int, key: str) -> float | None:
    for e in summary:
        if (e["model"], e["system"], e["concurrency"]) == (model, system, c):
            return e[key]["median"]
    return None


def ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def headline(summary: list, conc: list, raw: dict, floor_us: float | None = None) -> list:
    """The 'Must show' ratios of issue 8, one line each, computed from the medians.
    `floor_us`: median p50 of the bare TCP round trip measured in the same run."""
    lines = []

    def per_c(fn):
        return {c: fn(c) for c in conc}

    rps = lambda m, s, c: med(summary, m, s, c, "rps")  # noqa: E731
    p = lambda m, s, c, k: med(summary, m, s, c, k)  # noqa: E731
    top = max(conc)
    def series(d: dict) -> str:
        return ", ".join(f"c={c} {fmt_x(v)}" for c, v in d.items())

    # (peer, req/s goal, p99 goal): the goals; KServe has none but is reported alike.
    for peer, goal, p99_goal in (("ray-serve", 30, 30), ("flask-gunicorn", 10, None),
                                 ("kserve", None, None)):
        r = per_c(lambda c: ratio(rps("digits", "serval", c), rps("digits", peer, c)))
        q = per_c(lambda c: ratio(p("digits", peer, c, "p99_us"),
                                  p("digits", "serval", c, "p99_us")))
        goal_s = f" (goal >= {goal}x)" if goal else ""
        p99_s = f" (goal >= {p99_goal}x)" if p99_goal else ""
        # With one connection req/s is 1 / round trip, so a goal at c=1 asks for a round trip
        # of the peer's divided by the goal: say so when that is below the bare TCP one.
        c1, bound = min(conc), ""
        peer_p50 = p("digits", peer, c1, "p50_us")
        if goal and c1 == 1 and peer_p50 and floor_us and peer_p50 / goal < floor_us:
            bound = (f"; at c=1, {goal}x needs a whole round trip of at most "
                     f"{peer_p50 / goal:.0f} µs ({peer}'s p50 {peer_p50:.0f} µs ÷ {goal}), "
                     f"less than this machine's bare loopback TCP round trip (1 byte, no HTTP, "
                     f"p50 {floor_us:.0f} µs in this run)")
        lines.append({"name": f"digits: Serval / {peer} req/s", "goal": goal,
                      "by_concurrency": r,
                      "text": f"digits, Serval req/s ÷ {peer} req/s: {series(r)}{goal_s}; "
                              f"{peer} p99 ÷ Serval p99: {series(q)}{p99_s}{bound}"})
        lines.append({"name": f"digits: {peer} / Serval p99", "by_concurrency": q,
                      "goal": p99_goal, "text": None})
        e = per_c(lambda c: ratio(p("digits", "serval", c, "rps_per_cpu"),
                                  p("digits", peer, c, "rps_per_cpu")))
        lines.append({"name": f"digits: Serval / {peer} requests per CPU-second",
                      "by_concurrency": e, "goal": None,
                      "text": f"digits, Serval requests per CPU-second ÷ {peer}'s: {series(e)}"})
    found = raw.get("mobilenetv2") or {}
    if "sidecar_over_raw" in found:
        r = found["sidecar_over_raw"]
        how = f"the sidecar's own benchmark at c={top}, in-process client"
    elif "raw_rps" in found:
        r = max((rps("mobilenetv2", "serval", c) or 0) for c in conc) / found["raw_rps"]
        how = "best sidecar req/s here over the sidecar benchmark's raw engine req/s"
    else:
        r = None
    if r is not None:
        lines.append({"name": "mobilenetv2: sidecar / raw engine req/s", "value": r, "goal": 0.9,
                      "text": f"CNN, sidecar vs raw in-process engine req/s: {r:.2f} "
                      f"(goal >= 0.9; {how})"})
    for m in ("digits", "mobilenetv2"):
        r = per_c(lambda c: ratio(rps(m, "serval", c), rps(m, "serval-unbatched", c)))
        vals = [v for v in r.values() if v is not None]
        if vals:
            kept = sorted({tuple(k) for e in summary if (e["model"], e["system"]) == (m, "serval")
                           for k in e.get("kept_batch_sizes", [])})
            same = kept == [(1,)]
            note = (f"; calibration kept batch sizes {[list(k) for k in kept]}"
                    if kept else "")
            if same:
                note += (": every start kept only batch size 1 (larger batches ran slower per "
                         "row), so batched and unbatched were the same configuration and these "
                         "ratios read the machine's noise")
            lines.append({"name": f"{m}: batched / unbatched req/s", "by_concurrency": r,
                          "goal": 1.0, "kept_batch_sizes": [list(k) for k in kept],
                          "text": f"{m}, batched vs unbatched req/s: "
                          + ", ".join(f"c={c} {v:.2f}" for c, v in r.items() if v is not None)
                          + f" (min "
                          f"{min(vals):.2f}; goal never < 1.0){note}"})
    r = per_c(lambda c: ratio(rps("digits", "serval-router", c), rps("digits", "nginx", c)))
    vals = [v for v in r.values() if v is not None]
    if vals:
        c1 = min(conc)

        def added(proxy):
            # Each proxy against one of its own backends called directly, same start.
            via, direct = p("digits", proxy, c1, "p50_us"), p("digits", f"{proxy}:direct", c1,
                                                               "p50_us")
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


def fmt_x(v) -> str:
    return "n/a" if v is None else f"{v:.1f}x"


def spread(e: dict, key: str, scale: float = 1.0, digits: int = 0) -> str:
    m, lo, hi = (e[key][k] / scale for k in ("median", "min", "max"))
    if e["runs"] > 1:
        return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"
    return f"{m:.{digits}f}"


def markdown(meta: dict, summary: list, lines: list, conc: list, model_names: list) -> str:
    out = ["# Serval vs Ray Serve, KServe, Flask + onnxruntime and nginx", ""]
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
               "of that tree (efficiency, whatever the load generator's own share). Peak RSS and PSS are summed over the tree "
               "(RSS counts shared pages once per process, PSS splits them). "
               "Ratios are Serval's req/s over the system's (×) — above 1 means Serval is faster. "
               "Raw data: [results.json](results.json). Configuration of every system: "
               "[../README.md](../README.md).")
    out += ["", "## Headline (issue 8, 'Must show')", ""]
    for line in lines:
        if line.get("text"):
            out.append(f"- {line['text']}")
    for m in model_names:
        out += ["", f"## {m}", "", f"![p99 latency vs throughput, {m}]({m}.png)", ""]
        out.append("| system | conc | req/s | p50 ms | p99 ms | errors | CPU s | CPU cores "
                   "| req/CPU-s | peak RSS MB | peak PSS MB | Serval req/s ÷ this | this p99 ÷ Serval p99 |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in conc:
            for s in SYSTEMS:
                e = next((e for e in summary if (e["model"], e["system"], e["concurrency"])
                          == (m, s.name, c)), None)
                if e is None:
                    continue
                rr = ratio(med(summary, m, "serval", c, "rps"), e["rps"]["median"])
                pr = ratio(e["p99_us"]["median"], med(summary, m, "serval", c, "p99_us"))
                out.append(
                    f"| {s.name} | {c} | {spread(e, 'rps')} | {spread(e, 'p50_us', 1000, 2)} | "
                    f"{spread(e, 'p99_us', 1000, 2)} | {e['errors']} | "
                    f"{spread(e, 'cpu_s', 1, 2)} | {spread(e, 'cores', 1, 2)} | "
                    f"{spread(e, 'rps_per_cpu') if 'rps_per_cpu' in e else '–'} | "
                    f"{spread(e, 'peak_rss_mb')} | {spread(e, 'peak_pss_mb')} | "
                    f"{'–' if rr is None else f'{rr:.2f}'} | {'–' if pr is None else f'{pr:.2f}'} |")
    out += ["", "## Versions", ""]
    for k, v in meta["versions"].items():
        out.append(f"- {k}: {v}")
    return "\n".join(out) + "\n"


def plot(summary: list, model: str, conc: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for s in SYSTEMS:
        pts = [e for e in summary if e["model"] == model and e["system"] == s.name]
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
    ax.set_title(f"{model}: p99 latency vs throughput (closed loop, c={','.join(map(str, conc))})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("ray", "kserve", "onnxruntime", "flask", "gunicorn", "numpy", "psutil"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[pkg] = "missing"
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
    ap.add_argument("--models", default="digits,mobilenetv2")
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
        names = list(dict.fromkeys(r["model"] for r in data["runs"]))
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
    systems = [s for s in SYSTEMS if s.name in wanted]
    if not nginx_bin() and any(s.name == "nginx" for s in systems):
        log("nginx not installed (apt-get install -y nginx): skipped")
        systems = [s for s in systems if s.name != "nginx"]
    all_models = models()
    chosen = [all_models[m] for m in args.models.split(",") if m in all_models]

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="serval-bench-"))
    bodies = {}
    for m in chosen:
        body = m.body()
        # Every system reads the input by position; the name is the graph's own.
        body = body.replace(b'"name": "input"', f'"name": "{input_name(m.path)}"'.encode())
        bodies[m.name] = (scratch / f"{m.name}.json", body)
        bodies[m.name][0].write_bytes(body)

    points = sum(len(args.concurrency) for m in chosen for s in systems if m.name in s.models)
    est = args.reps * points * (args.warmup + args.duration + 0.3) + args.reps * sum(
        args.start_warmup + (18 if s.name == "ray-serve" else 4)
        for m in chosen for s in systems if m.name in s.models)
    log(f"{len(systems)} systems x {len(chosen)} models x {args.concurrency} x {args.reps} "
        f"repetitions = {points * args.reps} points; estimated {est / 60:.1f} min")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "reps": args.reps, "concurrency": args.concurrency, "warmup_s": args.warmup,
        "duration_s": args.duration, "start_warmup_s": args.start_warmup, "quick": args.quick,
        "workers": WORKERS, "versions": versions(),
        "systems": {s.name: s.describe for s in systems},
        "bodies_bytes": {k: len(v[1]) for k, v in bodies.items()},
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
            for m in chosen:
                body_file, body = bodies[m.name]
                for s in order:
                    if m.name not in s.models:
                        continue
                    try:
                        rows += measure_system(s, m, body_file, body, rep, args, scratch)
                    except Exception as e:  # noqa: BLE001 - one failing system must not end the run
                        log(f"  {m.name} {s.name}: FAILED: {e}")
                        failures.append({"rep": rep, "model": m.name, "system": s.name,
                                         "error": str(e)})
            elapsed = time.time() - t_start
            left = elapsed / (rep + 1) * (args.reps - rep - 1)
            log(f"repetition {rep + 1} done, {elapsed / 60:.1f} min elapsed, "
                f"~{left / 60:.1f} min to go")
        if "mobilenetv2" in bodies and any(s.name == "serval" for s in systems):
            log("raw engine (sidecar's bench example, in-process) on mobilenetv2")
            found = raw_engine(all_models["mobilenetv2"], max(args.concurrency), args.duration)
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
    return write_report(out_dir, meta, rows, raw, floors, failures, [m.name for m in chosen])


def write_report(out_dir: Path, meta: dict, rows: list, raw: dict, floors: list, failures: list,
                 names: list) -> int:
    """results.json, README.md and one plot per model, all from the measured rows."""
    summary = summarize(rows)
    floor_p50 = [f["p50_us"] for f in floors]
    if floor_p50:
        meta["tcp_floor_p50_us"] = {"median": statistics.median(floor_p50),
                                    "min": min(floor_p50), "max": max(floor_p50)}
    conc = meta["concurrency"]
    lines = headline(summary, conc, raw,
                     statistics.median(floor_p50) if floor_p50 else None)
    (out_dir / "results.json").write_text(json.dumps(
        {"meta": meta, "runs": rows, "medians": summary, "raw_engine_rps": raw,
         "tcp_floor": floors,
         "headline": lines, "failures": failures}, indent=1) + "\n")
    for m in names:
        plot(summary, m, conc, out_dir / f"{m}.png")
    (out_dir / "README.md").write_text(markdown(meta, summary, lines, conc, names))
    log(f"wrote {out_dir}/results.json, README.md and {', '.join(n + '.png' for n in names)} "
        f"in {meta['total_min']} min")
    for line in lines:
        if line.get("text"):
            log(line["text"])
    for f in failures:
        log(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
