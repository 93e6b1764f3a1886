#!/usr/bin/env python3
"""Autoscaling (issue 19): a load step on a slow model in `serval local`, and a scale from zero.

A Backend serves MobileNetV2 (`make -C models mobilenet`, ~20 ms a run) with one worker and one
row per batch, so one replica keeps one core busy; an Endpoint routes to it through the router
of `serval local`. The runs, each in a fresh `serval local`:

1. baseline: `replicas: 1`, no autoscaling. A closed loop of 1 client for --pre s, a step to
   --step-clients (16) clients for --step s, back to 1 client for --post s.
2. autoscaling: the same load on the same Backend with `spec.autoscaling`. The router's
   `/-/signals` is polled every 250 ms for the replicas over time, and `serval local`'s log for
   its decisions (`serval: backend X: 1 -> 2 replicas (Reason)`).
3. from zero: `minReplicas: 0`. After a first warm request, wait until the router reports the
   Backend scaled to zero, then time one request (held by the router while a replica starts),
   --zero-trials times. Against it: the sidecar's own `load_ms` of that replica (from its log)
   and the start-to-ready time of a fresh `serval-sidecar` on the same model (process start to
   the first 200 of /v2/health/ready).

Latencies are grouped into 5 s windows by each request's start time. Every request that is not
a 200 counts as failed, in every phase. Writes autoscale.{json,txt} into --out.

The clients are Python threads (one keep-alive connection each), not serval-loadgen: the step
needs one continuous closed loop whose clients join and leave at set times and whose every
request keeps its own timestamps. The body is a V2 binary tensor (overload.py's), so a client
thread mostly waits in the kernel; their CPU share is printed.

Only the standard library: runs under any python3 >= 3.10.

    autoscale.py [--out bench/results] [--quick] [--max-replicas 2] [--zero-trials 3]
"""

import argparse
import http.client
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overload import (CACHE, MODEL, NAME, RELEASE, binary_request, free_port,  # noqa: E402
                      log, stop, versions)

HERE = Path(__file__).resolve().parent
WINDOW_S = 5.0
SIGNALS_EVERY_S = 0.25
# A request not answered within this counts as failed (the Endpoint's timeout is longer).
REQUEST_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 90.0
# Recovered: a 5 s window whose p99 is within this factor of the pre-step p99 (issue 19).
RECOVERED_FACTOR = 2.0
# Long enough that one replica queues all 16 clients without refusing any (the default 100 ms
# budget would answer 429 to most of the step on one replica, and a refused request is a failure
# here); the same in every run.
MAX_QUEUE_DELAY_MS = 5000
ENDPOINT_TIMEOUT_MS = 60000


# ---------------------------------------------------------------------------------------------
# Manifests and `serval local`


def manifests(d: Path, autoscaling: dict | None) -> None:
    spec = (f"  model: {{uri: \"file://{MODEL}\"}}\n"
            f"  batching: {{maxBatchSize: 1, workers: 1, "
            f"maxQueueDelayMillis: {MAX_QUEUE_DELAY_MS}}}\n")
    if autoscaling is None:
        spec += "  replicas: 1\n"
    else:
        spec += "  autoscaling: " + json.dumps(autoscaling) + "\n"
    (d / "backend.yaml").write_text("apiVersion: serval.dev/v1alpha1\nkind: Backend\n"
                                    f"metadata: {{name: {NAME}}}\nspec:\n{spec}")
    (d / "endpoint.yaml").write_text(
        "apiVersion: serval.dev/v1alpha1\nkind: Endpoint\n"
        f"metadata: {{name: {NAME}}}\nspec:\n  route: {{pathPrefix: /{NAME}}}\n"
        f"  traffic: [{{backend: {NAME}, weight: 100}}]\n"
        f"  timeoutMillis: {ENDPOINT_TIMEOUT_MS}\n")


class Local:
    """A `serval local` on a fresh port; every line of its output with its arrival time."""

    def __init__(self, name: str, autoscaling: dict | None, args, scratch: Path):
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
        manifests(self.dir, autoscaling)
        self.port = free_port()
        self.lines: list = []
        cmd = [RELEASE / "serval", "local", "-f", self.dir, "--port", self.port,
               "--autoscale-stable-window", args.stable_window]
        self.logf = open(self.dir / "serval-local.log", "w")
        self.proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                     start_new_session=True, env=dict(os.environ, NO_COLOR="1"))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append((time.monotonic(), line))
            self.logf.write(f"{time.monotonic():.3f} {line}\n")
            self.logf.flush()

    def signals(self) -> dict | None:
        """This Backend in the router's /-/signals, or None."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/signals",
                                        timeout=2) as r:
                doc = json.loads(r.read())
        except (OSError, ValueError):
            return None
        return next((b for b in doc.get("backends", []) if b.get("backend") == NAME), None)

    def close(self) -> None:
        stop(self.proc)
        self.reader.join(timeout=5)
        self.logf.close()


class SignalPoller(threading.Thread):
    """(t, replicas, inflight, held, scaledToZero) every SIGNALS_EVERY_S."""

    def __init__(self, local: Local):
        super().__init__(daemon=True)
        self.local, self.samples, self.halt = local, [], threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            b = self.local.signals()
            if b is not None:
                self.samples.append((time.monotonic(), b.get("replicas"), b.get("inflight"),
                                     b.get("held"), b.get("scaledToZero")))
            self.halt.wait(SIGNALS_EVERY_S)


# ---------------------------------------------------------------------------------------------
# Closed-loop clients


class Requester:
    """One keep-alive connection; `call()` -> (start, end, status or error text)."""

    def __init__(self, port: int, body: bytes, headers: dict):
        self.port, self.body, self.headers = port, body, headers
        self.path = f"/v2/models/{NAME}/infer"
        self.conn = None

    def call(self) -> tuple:
        t0 = time.monotonic()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=REQUEST_TIMEOUT_S)
            self.conn.request("POST", self.path, self.body, self.headers)
            resp = self.conn.getresponse()
            data = resp.read()
            status = resp.status if (resp.status != 200 or b'"outputs"' in data) else "no outputs"
        except (OSError, http.client.HTTPException) as e:
            status = type(e).__name__
            self.close()
        return t0, time.monotonic(), status

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def client(port: int, body: bytes, headers: dict, start: float, end: float, out: list) -> None:
    """Sends back-to-back requests from `start` until `end` (a request started before `end`
    runs to its answer), appending (start, end, status) to `out`."""
    r = Requester(port, body, headers)
    time.sleep(max(0.0, start - time.monotonic()))
    while time.monotonic() < end:
        out.append(r.call())
    r.close()


def wait_serving(local: Local, body: bytes, headers: dict) -> list:
    """Sends requests until one is answered 200; returns every attempt."""
    r, attempts, t0 = Requester(local.port, body, headers), [], time.monotonic()
    try:
        while time.monotonic() - t0 < READY_TIMEOUT_S:
            if local.proc.poll() is not None:
                raise RuntimeError(f"serval local exited; see {local.dir}")
            attempts.append(r.call())
            if attempts[-1][2] == 200:
                return attempts
            time.sleep(0.25)
    finally:
        r.close()
    raise RuntimeError(f"not serving after {READY_TIMEOUT_S:g} s; see {local.dir}")


# ---------------------------------------------------------------------------------------------
# Statistics


def pct(values: list, q: float) -> float | None:
    """The q-quantile (nearest rank) of values, or None."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(q * len(s) + 0.999999) - 1))]


def summary(reqs: list) -> dict:
    ok = [(e - s) * 1000 for s, e, st in reqs if st == 200]
    failed: dict = {}
    for _, _, st in reqs:
        if st != 200:
            failed[str(st)] = failed.get(str(st), 0) + 1
    span = (max(e for _, e, _ in reqs) - min(s for s, _, _ in reqs)) if reqs else 0
    return {"count": len(reqs), "ok": len(ok), "failed": sum(failed.values()),
            "failed_by_kind": failed, "p50_ms": pct(ok, 0.50), "p99_ms": pct(ok, 0.99),
            "max_ms": max(ok) if ok else None, "rps": len(ok) / span if span else None}


SCALE = re.compile(r"(\d+) -> (\d+) replicas")


def step_run(name: str, autoscaling: dict | None, args, body: bytes, headers: dict,
             scratch: Path) -> dict:
    """One run of the load step (1 -> N -> 1 clients) in a fresh `serval local`."""
    local = Local(name, autoscaling, args, scratch)
    poller = SignalPoller(local)
    try:
        warm = wait_serving(local, body, headers)
        log(f"{name}: serving (logs in {local.dir}); warm-up {args.warmup:g} s at 1 client")
        warm_reqs: list = []
        client(local.port, body, headers, time.monotonic(), time.monotonic() + args.warmup,
               warm_reqs)
        poller.start()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic() + 0.5
        t_step, t_back = t0 + args.pre, t0 + args.pre + args.step
        t_end = t_back + args.post
        reqs: list = []
        threads = [threading.Thread(target=client, args=(local.port, body, headers, t0, t_end,
                                                         reqs))]
        threads += [threading.Thread(target=client, args=(local.port, body, headers, t_step,
                                                          t_back, reqs))
                    for _ in range(args.step_clients - 1)]
        for t in threads:
            t.start()
        log(f"{name}: 1 client {args.pre:g} s, {args.step_clients} clients {args.step:g} s, "
            f"1 client {args.post:g} s")
        for t in threads:
            t.join()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(SIGNALS_EVERY_S * 2)
    finally:
        poller.halt.set()
        local.close()
    wall = time.monotonic() - t0
    clients_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    rel = lambda t: round(t - t_step, 3)  # noqa: E731  seconds from the step
    windows = []
    n = int(round((t_end - t0) / WINDOW_S))
    for k in range(n):
        a, b = t0 + k * WINDOW_S, t0 + (k + 1) * WINDOW_S
        in_w = [r for r in reqs if a <= r[0] < b]
        reps = [s[1] for s in poller.samples if a <= s[0] < b and s[1] is not None]
        windows.append({"from_step_s": rel(a), "clients": args.step_clients
                        if t_step <= a < t_back else 1,
                        "replicas_min": min(reps) if reps else None,
                        "replicas_max": max(reps) if reps else None, **summary(in_w)})
    phases = {"pre": summary([r for r in reqs if r[0] < t_step]),
              "step": summary([r for r in reqs if t_step <= r[0] < t_back]),
              "post": summary([r for r in reqs if r[0] >= t_back]),
              # The step without its first window: the replicas the step settled on.
              "step_settled": summary([r for r in reqs if t_step + WINDOW_S <= r[0] < t_back])}
    # The replicas over time: each change the router saw, from the step.
    timeline, last = [], object()
    for s in poller.samples:
        if s[1] != last:
            timeline.append({"at_s": rel(s[0]), "replicas": s[1]})
            last = s[1]
    decisions = [{"at_s": rel(t), "line": line[line.index("serval: backend"):]}
                 for t, line in local.lines if "serval: backend" in line and "replicas" in line
                 and t0 - args.warmup - 5 <= t]
    start_reps = next((s[1] for s in reversed(poller.samples) if s[0] <= t_step), None)
    first_added = next((s for s in poller.samples if s[0] >= t_step and start_reps is not None
                        and (s[1] or 0) > start_reps), None)
    first_decision = next((d for d in decisions if d["at_s"] >= 0 and (m := SCALE.search(
        d["line"])) and int(m.group(2)) > int(m.group(1))), None)
    peak = max((s[1] or 0 for s in poller.samples if t_step <= s[0] < t_back), default=None)
    scaled_down = next((s for s in poller.samples if s[0] >= t_back and peak is not None
                        and s[1] is not None and s[1] < peak), None)
    pre_p99 = phases["pre"]["p99_ms"]
    recovered = next((w for w in windows if w["from_step_s"] >= 0 and w["p99_ms"] is not None
                      and pre_p99 and w["p99_ms"] <= RECOVERED_FACTOR * pre_p99), None)
    recovered_after_back = next(
        (w for w in windows if w["from_step_s"] >= args.step and w["p99_ms"] is not None
         and pre_p99 and w["p99_ms"] <= RECOVERED_FACTOR * pre_p99), None)
    warm_failed = sum(1 for r in warm_reqs if r[2] != 200)
    return {
        "name": name, "autoscaling": autoscaling,
        "schedule_s": {"pre": args.pre, "step": args.step, "post": args.post,
                       "step_clients": args.step_clients, "warmup": args.warmup},
        # Answers before the first 200 are start-up (the router has no table yet), not failures.
        "warm_up": {"attempts_until_200": len(warm), "failed": warm_failed},
        "phases": phases, "windows": windows, "replicas_timeline": timeline,
        "decisions": decisions,
        "replicas_at_step": start_reps,
        "first_added_replica_serving_s": rel(first_added[0]) if first_added else None,
        "first_scale_up_decision_s": first_decision["at_s"] if first_decision else None,
        "peak_replicas_in_step": peak,
        "first_scale_down_after_step_end_s": (round(scaled_down[0] - t_back, 3)
                                               if scaled_down else None),
        "recovered_window_end_s": (recovered["from_step_s"] + WINDOW_S) if recovered else None,
        "recovered_after_step_end_s": ((recovered_after_back["from_step_s"] + WINDOW_S
                                        - args.step) if recovered_after_back else None),
        "client_threads_cpu_cores": clients_cpu / wall if wall else None,
        "failed_total": sum(phases[p]["failed"] for p in ("pre", "step", "post")) + warm_failed,
    }


# ---------------------------------------------------------------------------------------------
# Scale from zero


LOAD_MS = re.compile(r"load_ms=(\d+)")


def fresh_sidecar_ready_ms(scratch: Path) -> dict:
    """Process start to the first 200 of /v2/health/ready of a fresh serval-sidecar on the model
    (polled every 10 ms), and the load_ms it logs."""
    port, admin = free_port(), free_port()
    logf = scratch / f"sidecar-{port}.log"
    cmd = [RELEASE / "serval-sidecar", "--model", MODEL, "--name", NAME, "--host", "127.0.0.1",
           "--port", port, "--admin-port", admin, "--max-batch-size", "1", "--workers", "1"]
    t0 = time.monotonic()
    with open(logf, "wb") as out:
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, env=dict(os.environ, RUST_LOG="info",
                                                              NO_COLOR="1"))
    ready = None
    try:
        while time.monotonic() - t0 < READY_TIMEOUT_S and p.poll() is None:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        ready = (time.monotonic() - t0) * 1000
                        break
            except OSError:
                pass
            time.sleep(0.01)
    finally:
        stop(p)
    m = LOAD_MS.search(logf.read_text(errors="replace"))
    return {"start_to_ready_ms": ready, "load_ms": int(m.group(1)) if m else None}


def zero_run(args, body: bytes, headers: dict, scratch: Path) -> dict:
    autoscaling = {"minReplicas": 0, "maxReplicas": args.max_replicas,
                   "targetInflight": args.target_inflight,
                   "scaleDownDelaySeconds": args.scale_down_delay,
                   "scaleToZeroAfterSeconds": args.zero_after}
    local = Local("from-zero", autoscaling, args, scratch)
    trials = []
    try:
        warm = wait_serving(local, body, headers)
        log(f"from zero: serving after {len(warm)} attempts; waiting for zero")
        for i in range(args.zero_trials):
            t_idle = time.monotonic()
            while time.monotonic() - t_idle < READY_TIMEOUT_S:
                b = local.signals()
                if b and b.get("replicas") == 0 and b.get("scaledToZero"):
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"not scaled to zero after {READY_TIMEOUT_S:g} s")
            idle_s = time.monotonic() - t_idle
            time.sleep(1.0)  # the last replica's process is gone, not only its route
            mark = len(local.lines)
            r = Requester(local.port, body, headers)
            s, e, status = r.call()
            r.close()
            new = local.lines[mark:]
            loads = [int(m.group(1)) for _, line in new if (m := LOAD_MS.search(line))]
            ready_at = next((t for t, line in new if LOAD_MS.search(line)), None)
            decided_at = next((t for t, line in new if "0 -> " in line and "replicas" in line),
                              None)
            trial = {"latency_ms": (e - s) * 1000, "status": status,
                     "replica_load_ms": loads[0] if loads else None,
                     "decision_after_ms": (decided_at - s) * 1000 if decided_at else None,
                     "model_ready_after_ms": (ready_at - s) * 1000 if ready_at else None,
                     "idle_until_zero_s": idle_s}
            trials.append(trial)
            log(f"from zero #{i + 1}: {trial['latency_ms']:.0f} ms, status {status}, replica "
                f"load_ms {trial['replica_load_ms']}")
    finally:
        local.close()
    fresh = [fresh_sidecar_ready_ms(scratch) for _ in range(args.zero_trials)]
    return {"autoscaling": autoscaling, "trials": trials,
            "fresh_sidecar": fresh,
            "failed_total": sum(1 for t in trials if t["status"] != 200)}


# ---------------------------------------------------------------------------------------------
# Report


def ms(v) -> str:
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def secs(v) -> str:
    return "-" if v is None else f"{v:.2f} s"


def ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def median(xs: list):
    xs = [x for x in xs if x is not None]
    return pct(xs, 0.5) if xs else None


def table(meta: dict, base: dict, auto: dict, zero: dict | None) -> str:
    out = [f"Autoscaling, issue 19: {meta['model']} via `serval local` (router + sidecars), "
           f"{meta['cpus']} CPUs, serval {meta['serval']}, {meta['when']}",
           f"load: closed loop, 1 client {meta['pre']:g} s -> {meta['step_clients']} clients "
           f"{meta['step']:g} s -> 1 client {meta['post']:g} s; batching maxBatchSize 1, "
           f"workers 1, maxQueueDelayMillis {MAX_QUEUE_DELAY_MS}",
           f"autoscaling: {json.dumps(auto['autoscaling'])}, --autoscale-stable-window "
           f"{meta['stable_window']:g} s; load average {meta['loadavg_before']} before", "",
           "p99 per 5 s window (ms; by request start; t from the step):",
           f"  {'t (s)':>9}  {'clients':>7}  {'fixed 1: p99':>12}  {'auto: p99':>9}  "
           f"{'replicas':>8}  {'ratio':>6}"]
    for wb, wa in zip(base["windows"], auto["windows"]):
        reps = ("-" if wa["replicas_min"] is None else str(wa["replicas_min"]) if
                wa["replicas_min"] == wa["replicas_max"] else
                f"{wa['replicas_min']}-{wa['replicas_max']}")
        t = f"{wa['from_step_s']:+.0f}..{wa['from_step_s'] + WINDOW_S:+.0f}"
        out.append(f"  {t:>9}  {wa['clients']:>7}  {ms(wb['p99_ms']):>12}  "
                   f"{ms(wa['p99_ms']):>9}  {reps:>8}  {ratio(wa['p99_ms'], wb['p99_ms']):>6}")
    out.append("")
    rows = [("", "fixed 1 replica", "autoscaling", "auto / fixed")]
    for ph, label in (("pre", "before the step"), ("step", "during the step"),
                      ("step_settled", f"step after its first {WINDOW_S:g} s"),
                      ("post", "after the step")):
        if ph not in base["phases"]:
            continue
        b, a = base["phases"][ph], auto["phases"][ph]
        rows.append((f"p50 / p99 {label} (ms)", f"{ms(b['p50_ms'])} / {ms(b['p99_ms'])}",
                     f"{ms(a['p50_ms'])} / {ms(a['p99_ms'])}",
                     f"{ratio(a['p50_ms'], b['p50_ms'])} / {ratio(a['p99_ms'], b['p99_ms'])}"))
    rows.append(("req/s during the step", f"{base['phases']['step']['rps']:.1f}",
                 f"{auto['phases']['step']['rps']:.1f}",
                 ratio(auto['phases']['step']['rps'], base['phases']['step']['rps'])))
    rows.append(("failed requests (all phases)", str(base["failed_total"]),
                 str(auto["failed_total"]), ""))
    rows.append(("client threads' CPU (cores)", f"{base['client_threads_cpu_cores']:.2f}",
                 f"{auto['client_threads_cpu_cores']:.2f}", ""))
    wid = [max(len(r[i]) for r in rows) for i in range(4)]
    out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, wid)).rstrip() for r in rows]
    out.append("")
    tl = ", ".join(f"{e['at_s']:+.2f} s: {e['replicas']}" for e in auto["replicas_timeline"])
    out.append(f"replicas in the router over time (from the step): {tl}")
    for d in auto["decisions"]:
        out.append(f"  {d['at_s']:+7.2f} s  {d['line']}")
    out.append(f"step -> first scale-up decision: {secs(auto['first_scale_up_decision_s'])}; "
               f"-> first added replica serving: {secs(auto['first_added_replica_serving_s'])}")
    down = auto.get("first_scale_down_after_step_end_s")
    out.append(f"clients back to 1 -> first replica removed: "
               + (f"{down:.2f} s" if down is not None else "not within the run"))
    pre = auto["phases"]["pre"]["p99_ms"]
    rec = auto["recovered_window_end_s"]
    rec_b = auto["recovered_after_step_end_s"]
    out.append(f"p99 recovered (5 s window p99 <= {RECOVERED_FACTOR:g} x pre-step "
               f"{ms(pre)} ms): " + (f"by {rec:.0f} s after the step" if rec is not None and
                                      rec <= meta["step"] else
                                      "not during the step") +
               (f"; {rec_b:.0f} s after the clients went back to 1" if rec_b is not None else
                "; not after the step either"))
    bb = base["recovered_after_step_end_s"]
    out.append(f"  (fixed 1 replica: {'%.0f s' % bb if bb is not None else 'not'} after the "
               "clients went back to 1)")
    if zero:
        out.append("")
        out.append(f"from zero ({json.dumps(zero['autoscaling'])}):")
        for i, t in enumerate(zero["trials"]):
            out.append(f"  #{i + 1}: first request {ms(t['latency_ms'])} ms (status "
                       f"{t['status']}); that replica's load_ms {t['replica_load_ms']}; "
                       f"decision at +{ms(t['decision_after_ms'])} ms, model ready at "
                       f"+{ms(t['model_ready_after_ms'])} ms")
        lat = median([t["latency_ms"] for t in zero["trials"]])
        own = median([t["replica_load_ms"] for t in zero["trials"]])
        fresh = median([f["start_to_ready_ms"] for f in zero["fresh_sidecar"]])
        fresh_load = median([f["load_ms"] for f in zero["fresh_sidecar"]])
        out.append(f"  median first request {ms(lat)} ms vs. the model's own load_ms {ms(own)} "
                   f"({ratio(lat, own)}); a fresh serval-sidecar alone: start -> ready "
                   f"{ms(fresh)} ms (load_ms {ms(fresh_load)}) ({ratio(lat, fresh)} of it)")
        out.append(f"  failed: {zero['failed_total']}")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite autoscale.txt from the autoscale.json in --out")
    ap.add_argument("--quick", action="store_true", help="short phases, for the harness only")
    ap.add_argument("--pre", type=float, default=10.0)
    ap.add_argument("--step", type=float, default=20.0)
    ap.add_argument("--post", type=float, default=30.0,
                    help="seconds at 1 client after the step: long enough to see a scale-down "
                         "(stable window + scaleDownDelaySeconds, 10 + 10 s)")
    ap.add_argument("--warmup", type=float, default=3.0, help="unrecorded, at 1 client")
    ap.add_argument("--step-clients", type=int, default=16)
    ap.add_argument("--max-replicas", type=int, default=2,
                    help="2 on a 2-core machine: a replica keeps one core busy")
    ap.add_argument("--target-inflight", type=int, default=2)
    ap.add_argument("--scale-down-delay", type=int, default=10)
    ap.add_argument("--zero-after", type=int, default=5, help="scaleToZeroAfterSeconds")
    ap.add_argument("--stable-window", type=int, default=10,
                    help="serval local --autoscale-stable-window, seconds")
    ap.add_argument("--zero-trials", type=int, default=3)
    ap.add_argument("--skip-zero", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads((args.out / "autoscale.json").read_text())
        text = table(saved["meta"], saved["fixed"], saved["autoscaling"], saved["from_zero"])
        (args.out / "autoscale.txt").write_text(text)
        print(text, end="")
        return 0
    if args.quick:
        args.pre, args.step, args.post, args.warmup, args.zero_trials = 5, 10, 5, 1, 1
    for exe in ("serval", "serval-sidecar", "serval-router"):
        if not (RELEASE / exe).exists():
            log(f"{RELEASE / exe} missing: cargo build --release -p serval-cli "
                "-p serval-sidecar -p serval-router --bins")
            return 2
    if not MODEL.exists():
        log(f"{MODEL} missing: make -C models mobilenet")
        return 2
    body, header_len = binary_request()
    headers = {"content-type": "application/octet-stream",
               "inference-header-content-length": str(header_len)}
    scratch = Path(tempfile.mkdtemp(prefix="serval-autoscale-"))
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "model": f"{NAME} ({MODEL.name}, V2 binary tensor of {len(body):,} bytes)",
            "serval": versions(), "cpus": os.cpu_count(),
            "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
            "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "pre": args.pre, "step": args.step, "post": args.post,
            "step_clients": args.step_clients, "stable_window": args.stable_window,
            # Committed results name no machine's folders (scratch folders are temporary).
            "quick": args.quick, "cache": "$SERVAL_CACHE"}
    log(f"load average {meta['loadavg_before']}; logs in {scratch}")
    base = step_run("fixed", None, args, body, headers, scratch)
    auto = step_run("autoscaling", {"minReplicas": 1, "maxReplicas": args.max_replicas,
                                    "targetInflight": args.target_inflight,
                                    "scaleDownDelaySeconds": args.scale_down_delay,
                                    "scaleToZeroAfterSeconds": args.zero_after},
                    args, body, headers, scratch)
    zero = None if args.skip_zero else zero_run(args, body, headers, scratch)
    meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "autoscale.json").write_text(json.dumps(
        {"meta": meta, "fixed": base, "autoscaling": auto, "from_zero": zero}, indent=1) + "\n")
    text = table(meta, base, auto, zero)
    (args.out / "autoscale.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
