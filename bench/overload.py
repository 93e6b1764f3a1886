#!/usr/bin/env python3
"""Overload (issue 18): Serval at 10x capacity on a slow model, directly and through the router.

For each path (the sidecar called directly; a serval-router in front of it) a fresh release
`serval-sidecar` serves MobileNetV2 (the 14 MB model of `make -C models mobilenet`) with its
defaults, and `serval-loadgen` measures, in order:

1. unloaded latency: closed loop, one connection;
2. capacity: closed loop at a concurrency that saturates the 2 inference workers (2xx req/s);
3. overload: open loop at FACTOR x the direct capacity (the same rate on both paths), a fixed
   schedule whatever the answers, latency from each request's scheduled time; 2xx (admitted)
   and 429 (rejected) answers in separate histograms.

Around the overload it reads the processes' RSS from /proc: idle before, peak during (VmHWM,
reset just before through /proc/PID/clear_refs), and a few seconds after; and their CPU time,
and the load generator's. It writes overload.json (everything, with the raw load generator
lines) and overload.txt (the table and the goals of issue 18) into --out.

Only the standard library: runs under any python3 >= 3.10.

    overload.py [--out bench/results] [--quick] [--factor 10] [--window 20] [--paths direct,router]
"""

import argparse
import array
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("SERVAL_CACHE", Path.home() / ".cache/serval"))
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target"))
RELEASE = TARGET / "release"
MODEL = CACHE / "models/mobilenetv2.onnx"
NAME = "mobilenetv2"
SHAPE = [1, 3, 224, 224]

# Issue 18's goals.
GOAL_GOODPUT_SHARE = 0.90  # goodput at least this share of capacity
GOAL_REJECT_P99_MS = 5.0  # 429s answered within this, p99
# Closed-loop concurrencies tried for capacity, in order, keeping the best 2xx req/s. Too few
# leave a worker idle during each round trip; too many make a sidecar that admits by expected
# queue wait answer 429 (a closed loop then spins on rejections, which steal CPU from the
# model), so the sweep stops at the first point with non-2xx answers or without a 2 % gain.
CAPACITY_CONCURRENCY = "2,4,8,16"
CAPACITY_MIN_GAIN = 1.02
# A request of the overload gives up this long after its scheduled time: past the sidecar's
# default deadline and the router's default route timeout (30 s each), so their answers count.
OVERLOAD_TIMEOUT_MS = 60_000
# Seconds to let the processes settle before reading idle RSS, and after the overload before
# reading RSS again (allocators return memory lazily).
SETTLE_S = 3.0
AFTER_S = 5.0
# /proc sampling interval of RSS during the overload.
SAMPLE_S = 0.2
READY_TIMEOUT_S = 60
QUIET_RUST = {"RUST_LOG": "warn"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The request: one image as a binary tensor (V2's binary extension), so the server's work is
# the model and not parsing 150,528 floats of JSON.


def values(shape: list) -> array.array:
    """Deterministic FP32 values in [0, 1) for a tensor of `shape`, little-endian: the same
    bytes every run."""
    n = 1
    for d in shape:
        n *= d
    data = array.array("f", (((i * 2654435761) % 1000) / 1000.0 for i in range(n)))
    if sys.byteorder != "little":
        data.byteswap()
    return data


def binary_request() -> tuple:
    """(body bytes, JSON header length): a V2 header naming one FP32 input whose raw
    little-endian bytes follow, as tritonclient sends it."""
    data = values(SHAPE)
    n = len(data)
    header = json.dumps({"inputs": [{"name": "input", "shape": SHAPE, "datatype": "FP32",
                                     "parameters": {"binary_data_size": n * 4}}]}).encode()
    return header + data.tobytes(), len(header)


# ---------------------------------------------------------------------------------------------
# Processes and /proc


def spawn(cmd: list, workdir: Path, name: str) -> subprocess.Popen:
    logf = open(workdir / f"{name}.log", "ab")
    return subprocess.Popen([str(c) for c in cmd], stdout=logf, stderr=subprocess.STDOUT,
                            env=dict(os.environ, **QUIET_RUST), start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def status_kb(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0, the process's owner)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class RssSampler(threading.Thread):
    """Peak VmRSS of some processes, sampled every SAMPLE_S: a cross-check of VmHWM."""

    def __init__(self, pids: dict):
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = {name: 0 for name in pids}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], status_kb(pid, "VmRSS") or 0)
            self.halt.wait(SAMPLE_S)

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        return self.peak


def post(url: str, body: bytes, headers: dict, timeout: float = 10) -> tuple:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def wait_ready(url: str, body: bytes, headers: dict, procs: list, workdir: Path) -> None:
    t0 = time.time()
    while time.time() - t0 < READY_TIMEOUT_S:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a server exited during start-up; see {workdir}")
        status, resp = post(url, body, headers)
        if status == 200 and b'"outputs"' in resp:
            return
        time.sleep(0.25)
    raise RuntimeError(f"not ready after {READY_TIMEOUT_S} s; see {workdir}")


# ---------------------------------------------------------------------------------------------
# The sidecar's admission budget, if it has one


BUDGET_FLAG = "--max-queue-delay-millis"


def default_budget_ms(servers: Path) -> float | None:
    """The default of the sidecar's queue-delay budget from its --help; None if it has none."""
    out = subprocess.run([str(servers / "serval-sidecar"), "--help"], capture_output=True,
                         text=True).stdout
    at = out.find(BUDGET_FLAG)
    if at < 0:
        return None
    # The flag's own help block: up to the next option.
    block = out[at:]
    nxt = block.find("\n      --", 1)
    m = re.search(r"\[default: ([\d.]+)\]", block if nxt < 0 else block[:nxt])
    return float(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# Load


def loadgen(url: str, body_file: Path, headers: list, extra: list, timeout_s: float) -> tuple:
    """(the load generator's JSON line, its CPU seconds, its wall seconds)."""
    cmd = [str(RELEASE / "serval-loadgen"), "--url", url, "--body", str(body_file)]
    for h in headers:
        cmd += ["-H", h]
    cmd += [str(a) for a in extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed: {out.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(out.stdout.strip().splitlines()[-1]), cpu, wall


METRIC_LINE = re.compile(r"^(serval_\w+)(\{[^}]*\})? ([\d.eE+-]+)$")


def counters(text: str | None) -> dict:
    """The sidecar's or router's counters and gauges (no histogram buckets) from /metrics."""
    out = {}
    for line in (text or "").splitlines():
        m = METRIC_LINE.match(line)
        if m and not m.group(1).endswith(("_bucket", "_sum", "_count")):
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def measure_path(path: str, args, body_file: Path, body: bytes, headers: dict,
                 rate: float | None, scratch: Path) -> dict:
    """One path from a fresh start: unloaded, capacity, overload. With `rate` None (the direct
    path, first) the overload's rate is FACTOR x the capacity just measured."""
    wd = Path(tempfile.mkdtemp(prefix=f"overload-{path}-", dir=scratch))
    sc_port, sc_admin = free_port(), free_port()
    sidecar_cmd = [args.servers / "serval-sidecar", "--model", MODEL, "--name", NAME,
                   "--host", "127.0.0.1", "--port", sc_port, "--admin-port", sc_admin]
    if args.queue_delay_ms is not None:
        sidecar_cmd += [BUDGET_FLAG, args.queue_delay_ms]
    procs = {"sidecar": spawn(sidecar_cmd, wd, "sidecar")}
    infer = f"/v2/models/{NAME}/infer"
    url = f"http://127.0.0.1:{sc_port}{infer}"
    metrics_urls = {"sidecar": f"http://127.0.0.1:{sc_admin}/metrics"}
    if path == "router":
        # The operator's defaults for an Endpoint: 30 s timeout, 1 retry within a 20 % budget.
        table = {
            "apiVersion": "serval.dev/routing/v1",
            "routes": [{"endpoint": NAME, "pathPrefix": f"/{NAME}",
                        "traffic": [{"backend": "a", "weight": 100}],
                        "timeoutMs": 30000, "retries": {"attempts": 1, "budgetPercent": 20}}],
            "backends": {"a": {"model": NAME, "addresses": [f"127.0.0.1:{sc_port}"],
                               "ready": True}},
        }
        (wd / "routing.json").write_text(json.dumps(table))
        rt_port, rt_admin = free_port(), free_port()
        procs["router"] = spawn([args.servers / "serval-router", "--table", wd / "routing.json",
                                 "--host", "127.0.0.1", "--port", rt_port,
                                 "--admin-port", rt_admin], wd, "router")
        url = f"http://127.0.0.1:{rt_port}{infer}"
        metrics_urls["router"] = f"http://127.0.0.1:{rt_admin}/-/metrics"
    pids = {name: p.pid for name, p in procs.items()}
    hdr_list = [f"{k}: {v}" for k, v in headers.items()]
    try:
        wait_ready(url, body, headers, list(procs.values()), wd)
        log(f"{path}: ready; unloaded (c=1)")
        unloaded, _, _ = loadgen(url, body_file, hdr_list,
                                 ["--concurrency", 1, "--warmup", args.closed_warmup,
                                  "--duration", args.closed_window], 120)
        log(f"{path}: p50 {unloaded['p50_us'] / 1000:.1f} ms, p99 "
            f"{unloaded['p99_us'] / 1000:.1f} ms; capacity (c={args.capacity_concurrency})")
        sweep = []
        for c in args.capacity_concurrency:
            point, _, _ = loadgen(url, body_file, hdr_list,
                                  ["--concurrency", c, "--warmup", args.closed_warmup,
                                   "--duration", args.closed_window], 120)
            best = max((p["rps"] for p in sweep), default=0.0)
            sweep.append(point)
            log(f"{path}:   c={c}: {point['rps']:.1f} req/s, errors {point['errors']}")
            if point["error_count"] or point["rps"] < best * CAPACITY_MIN_GAIN:
                break
        capacity = max(sweep, key=lambda p: p["rps"])
        if rate is None:
            rate = args.factor * capacity["rps"]
        log(f"{path}: capacity {capacity['rps']:.1f} req/s; overload at {rate:.0f} req/s "
            f"for {args.warmup:g} + {args.window:g} s")
        time.sleep(SETTLE_S)
        idle_rss = {n: status_kb(pid, "VmRSS") for n, pid in pids.items()}
        peak_reset = {n: reset_peak(pid) for n, pid in pids.items()}
        cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        sampler = RssSampler(pids)
        sampler.start()
        burst, lg_cpu, lg_wall = loadgen(
            url, body_file, hdr_list,
            ["--rate", f"{rate:.3f}", "--warmup", args.warmup, "--duration", args.window,
             "--timeout-ms", OVERLOAD_TIMEOUT_MS, "--max-connections", args.max_connections],
            args.warmup + args.window + OVERLOAD_TIMEOUT_MS / 1000 + 60)
        cpu1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        sampled_peak = sampler.stop()
        hwm = {n: status_kb(pid, "VmHWM") for n, pid in pids.items()}
        time.sleep(AFTER_S)
        after_rss = {n: status_kb(pid, "VmRSS") for n, pid in pids.items()}
        metrics = {n: counters(get(u)) for n, u in metrics_urls.items()}
        alive = {n: p.poll() is None for n, p in procs.items()}
    finally:
        for p in reversed(list(procs.values())):
            stop(p)
    cpu = {n: (cpu1[n] - cpu0[n]) if cpu0[n] is not None and cpu1[n] is not None else None
           for n in pids}
    cpu["loadgen"] = lg_cpu
    return {
        "path": path,
        "unloaded": unloaded,
        "capacity": capacity,
        "capacity_sweep": sweep,
        "overload": burst,
        "overload_wall_s": lg_wall,
        "cpu_seconds": cpu,
        "cpu_cores": {n: (c / lg_wall if c is not None else None) for n, c in cpu.items()},
        "rss_kb": {n: {"idle": idle_rss[n], "peak_hwm": hwm[n], "peak_hwm_reset": peak_reset[n],
                       "peak_sampled": sampled_peak[n], "after": after_rss[n]}
                   for n in pids},
        "alive_after": alive,
        "metrics": metrics,
    }


# ---------------------------------------------------------------------------------------------
# Goals and the report


def goals(r: dict, capacity_rps: float, budget_ms: float | None) -> list:
    o = r["overload"]
    unloaded_p99 = r["unloaded"]["p99_us"] / 1000
    bound = 2 * unloaded_p99 + (budget_ms or 0.0)
    admitted_p99 = o["admitted"]["p99_us"] / 1000 if o["admitted"]["count"] else None
    goodput_share = o["goodput_rps"] / capacity_rps if capacity_rps else None
    reject_p99 = o["rejected"]["p99_us"] / 1000 if o["rejected"]["count"] else None
    budget = f"{budget_ms:g} ms budget" if budget_ms is not None else "no budget flag: 0 ms"
    return [
        {"name": "admitted p99", "value_ms": admitted_p99, "bound_ms": bound,
         "met": admitted_p99 is not None and admitted_p99 <= bound,
         "text": f"admitted p99 {fmt_ms(admitted_p99)} <= 2 x unloaded p99 "
                 f"{unloaded_p99:.1f} ms + {budget} = {bound:.1f} ms"},
        {"name": "goodput", "value_share": goodput_share, "bound_share": GOAL_GOODPUT_SHARE,
         "met": goodput_share is not None and goodput_share >= GOAL_GOODPUT_SHARE,
         "text": f"goodput {o['goodput_rps']:.1f} req/s = {pct(goodput_share)} of capacity "
                 f"{capacity_rps:.1f} req/s >= {GOAL_GOODPUT_SHARE:.0%}"},
        {"name": "rejection p99", "value_ms": reject_p99, "bound_ms": GOAL_REJECT_P99_MS,
         "met": reject_p99 is not None and reject_p99 <= GOAL_REJECT_P99_MS,
         "text": f"rejection (429) p99 {fmt_ms(reject_p99)} <= {GOAL_REJECT_P99_MS:g} ms"
                 + ("" if reject_p99 is not None else " (no 429 answered)")},
    ]


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.0f} ms" if v >= 100 else f"{v:.1f} ms"


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def mb(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:,.0f}"


def table(meta: dict, results: list) -> str:
    cap = meta["capacity_rps"]
    cols = [r["path"] for r in results]
    rows = []

    def row(label: str, fn) -> None:
        rows.append([label] + [fn(r) for r in results])

    def lat(h: dict) -> str:
        if not h["count"]:
            return "n/a"
        return f"{fmt_ms(h['p50_us'] / 1000)} / {fmt_ms(h['p99_us'] / 1000)}"

    row("unloaded p50 / p99 (c=1)", lambda r: lat({"count": 1, **r["unloaded"]}))
    row("capacity, req/s (best closed loop)",
        lambda r: f"{r['capacity']['rps']:.1f} (c={r['capacity']['concurrency']})")
    row("offered, req/s", lambda r: f"{r['overload']['offered_rps']:.0f}")
    row("admitted (2xx)", lambda r: f"{r['overload']['admitted']['count']:,} "
        f"({pct(r['overload']['admitted']['count'] / max(1, r['overload']['offered']))})")
    row("admitted p50 / p99", lambda r: lat(r["overload"]["admitted"]))
    row("goodput, req/s (% capacity)", lambda r: f"{r['overload']['goodput_rps']:.1f} "
        f"({pct(r['overload']['goodput_rps'] / cap if cap else None)})")
    def rejected(r: dict) -> str:
        o = r["overload"]
        n = o["rejected"]["count"]
        return f"{n:,} ({pct(o['rejected_with_retry_after'] / n if n else None)})"

    row("rejected (429), share with Retry-After", rejected)
    row("rejection p50 / p99", lambda r: lat(r["overload"]["rejected"]))
    row("  from first write p50 / p99", lambda r: lat(r["overload"]["rejected_from_send"]))
    row("other answers / failures", lambda r: ", ".join(
        f"{k}: {v:,}" for k, v in r["overload"]["errors"].items()) or "none")
    row("generator send lag p99", lambda r: fmt_ms(r["overload"]["send_lag"]["p99_us"] / 1000))
    row("waited for a connection", lambda r: f"{r['overload']['waited_for_connection']:,} "
        f"(peak {r['overload']['peak_in_flight']:,} in flight)")
    for proc in ("sidecar", "router"):
        if not any(proc in r["rss_kb"] for r in results):
            continue

        def rss(r, proc=proc):
            m = r["rss_kb"].get(proc)
            return "-" if m is None else (f"{mb(m['idle'])} -> {mb(m['peak_hwm'])} -> "
                                          f"{mb(m['after'])}")
        row(f"{proc} RSS MB: idle -> peak -> {AFTER_S:g} s after", rss)
    row("CPU cores: sidecar / router / loadgen", lambda r: " / ".join(
        "-" if r["cpu_cores"].get(n) is None else f"{r['cpu_cores'][n]:.2f}"
        for n in ("sidecar", "router", "loadgen")))
    widths = [max(len(x[i]) for x in rows + [["", *cols]]) for i in range(len(cols) + 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(["", *cols], widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in rows]
    budget = meta["queue_delay_budget_ms"]
    budget_text = (f"none (the sidecar has no {BUDGET_FLAG})" if budget is None
                   else f"{budget:g} ms")
    head = [
        f"Overload, issue 18: {meta['model']} ({meta['body']}), serval-sidecar defaults"
        + (f" + {BUDGET_FLAG} {budget:g}" if meta["queue_delay_flag_given"] else ""),
        f"{meta['when']} on {meta['cpus']} CPUs, serval {meta['serval']}; load average "
        f"{meta['loadavg_before']} before, {meta['loadavg_after']} after",
        f"queue-delay budget: {budget_text}; overload {meta['factor']:g} x direct capacity "
        f"{cap:.1f} req/s = {meta['rate']:.0f} req/s, "
        f"open loop, {meta['warmup_s']:g} s unrecorded + {meta['window_s']:g} s recorded; "
        f"latency from each request's scheduled time",
        "",
    ]
    tail = ["", "Goals (issue 18):"]
    for r in results:
        for g in r["goals"]:
            tail.append(f"  {r['path']:<7} {'MET    ' if g['met'] else 'NOT MET'} {g['text']}")
    return "\n".join(head + lines + tail) + "\n"


def versions() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "sidecar", "router"], capture_output=True, text=True).stdout
        return rev + (" (sidecar/router modified)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite overload.txt from the overload.json in --out, measuring nothing")
    ap.add_argument("--quick", action="store_true",
                    help="short windows, for checking the harness (not for publishing)")
    ap.add_argument("--paths", default="direct,router")
    ap.add_argument("--servers", type=Path, default=RELEASE,
                    help="folder of the serval-sidecar and serval-router to measure, e.g. a "
                         "build of an older commit for a before/after (default: the release "
                         "build; the load generator always comes from there)")
    ap.add_argument("--label", default=None,
                    help="what the servers are, for the report (default: the git revision)")
    ap.add_argument("--factor", type=float, default=10.0, help="overload rate / capacity")
    ap.add_argument("--window", type=float, default=20.0, help="recorded overload, seconds")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="unrecorded overload before the window, seconds")
    ap.add_argument("--closed-window", type=float, default=10.0)
    ap.add_argument("--closed-warmup", type=float, default=2.0)
    ap.add_argument("--capacity-concurrency", default=CAPACITY_CONCURRENCY,
                    type=lambda v: [int(c) for c in v.split(",") if c],
                    help="closed-loop concurrencies tried for capacity, in order "
                         f"(default {CAPACITY_CONCURRENCY})")
    ap.add_argument("--max-connections", type=int, default=4096,
                    help="the load generator's bound (the sidecar's default bound too)")
    ap.add_argument("--deadline-ms", type=int, default=None,
                    help="send serval-deadline-ms with every request (default: none)")
    ap.add_argument("--queue-delay-ms", type=float, default=None,
                    help=f"pass {BUDGET_FLAG} to the sidecar (default: its own default)")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads((args.out / "overload.json").read_text())
        text = table(saved["meta"], saved["paths"])
        (args.out / "overload.txt").write_text(text)
        print(text, end="")
        return 0
    if args.quick:
        args.window, args.warmup = min(args.window, 5.0), min(args.warmup, 2.0)
        args.closed_window, args.closed_warmup = 3.0, 1.0
    for exe in (args.servers / "serval-sidecar", args.servers / "serval-router",
                RELEASE / "serval-loadgen"):
        if not exe.exists():
            log(f"{exe} missing: cargo build --release -p serval-sidecar "
                "-p serval-router -p serval-loadgen --bins")
            return 2
    if not MODEL.exists():
        log(f"{MODEL} missing: make -C models mobilenet")
        return 2
    paths = [p for p in args.paths.split(",") if p]
    if not set(paths) <= {"direct", "router"}:
        log("--paths takes direct and/or router")
        return 2
    default_budget = default_budget_ms(args.servers)
    budget = args.queue_delay_ms if args.queue_delay_ms is not None else default_budget
    if args.queue_delay_ms is not None and default_budget is None:
        log(f"the sidecar has no {BUDGET_FLAG}; it would refuse to start")
        return 2
    body, header_len = binary_request()
    headers = {"content-type": "application/octet-stream",
               "inference-header-content-length": str(header_len)}
    if args.deadline_ms is not None:
        headers["serval-deadline-ms"] = str(args.deadline_ms)
    scratch = Path(tempfile.mkdtemp(prefix="serval-overload-"))
    body_file = scratch / "body.bin"
    body_file.write_bytes(body)
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": f"{NAME} ({MODEL.name}, input {'x'.join(map(str, SHAPE))} FP32)",
        "body": f"V2 binary tensor, {len(body):,} bytes",
        "serval": args.label or (versions() if args.servers == RELEASE
                                 else f"binaries of {args.servers}"),
        "cpus": os.cpu_count(),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "queue_delay_budget_ms": budget,
        "queue_delay_flag_given": args.queue_delay_ms is not None,
        "deadline_header_ms": args.deadline_ms,
        "factor": args.factor, "window_s": args.window, "warmup_s": args.warmup,
        "closed_window_s": args.closed_window, "closed_warmup_s": args.closed_warmup,
        "capacity_concurrency": args.capacity_concurrency,
        "max_connections": args.max_connections,
        "overload_timeout_ms": OVERLOAD_TIMEOUT_MS,
        "quick": args.quick,
    }
    log(f"queue-delay budget: {budget if budget is not None else 'none'}; "
        f"load average {meta['loadavg_before']}; servers' logs in {scratch}")
    results, rate, capacity = [], None, None
    # The direct path first: its capacity sets the overload's rate for both paths.
    for path in sorted(paths, key=lambda p: p != "direct"):
        r = measure_path(path, args, body_file, body, headers, rate, scratch)
        if rate is None:
            rate = r["overload"]["rate"]
            capacity = r["capacity"]["rps"] if path == "direct" else rate / args.factor
        r["goals"] = goals(r, capacity, budget)
        o = r["overload"]
        log(f"{path}: admitted {o['admitted']['count']} p99 {o['admitted']['p99_us'] / 1000:.1f} "
            f"ms, goodput {o['goodput_rps']:.1f} req/s, rejected {o['rejected']['count']} p99 "
            f"{o['rejected']['p99_us'] / 1000:.1f} ms, other {o['errors']}")
        results.append(r)
    meta.update(capacity_rps=capacity, rate=rate,
                loadavg_after=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps({"meta": meta, "paths": results},
                                                       indent=1) + "\n")
    text = table(meta, results)
    (args.out / "overload.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
