#!/usr/bin/env python3
"""Composition (issue 24): cascade, ensemble and sequence Endpoints in `serval local`.

One `serval local` serves the composition models (models/generate.py, trained on a fixed 70 %
of scikit-learn's digits) behind an Endpoint each, and compositions of them. On the held-out
30 % (models/digits/composition.json):

1. accuracy through the router, 16 rows a request: digits-small and digits-large alone, the
   cascade small -> large at minConfidence 0.9 and 0.99 (and the share of rows escalated),
   the three ensemble members alone and their ensembles (Mean, Vote, Max), the sequence
   digits-pca -> digits-pca-head;
2. throughput at saturation (closed loop, --concurrency clients), requests of 16 held-out rows
   (each request the same 16 rows, the first of the held-out set: 3 of them escalate at 0.9),
   cascade / large alone;
3. latency at concurrency 1 of one row: a row the small model is sure of through the cascade
   (one stage) against the small model alone, and a row it escalates against the large alone;
4. the cost of a hop: an identity model (models/identity.onnx, a trivial upstream) called
   through the router directly, and as a sequence of 2 and 3 steps, at c = 1 and c = 32:
   p50 added per extra step, and the router's CPU per request (its /proc CPU time over the
   window / requests) added per extra step.

Only the standard library and serval-loadgen. Writes composition.{json,txt} into --out.

    composition.py [--out bench/results] [--quick]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overload import RELEASE, cpu_seconds, free_port, loadgen, log, stop  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRUTH = REPO / "models/digits/composition.json"
BACKENDS = {
    "digits-small": "digits-small.onnx",
    "digits-large": "digits-large.onnx",
    "digits-ens-a": "digits-ens-a.onnx",
    "digits-ens-b": "digits-ens-b.onnx",
    "digits-ens-c": "digits-ens-c.onnx",
    "digits-pca": "digits-pca.onnx",
    "digits-pca-head": "digits-pca-head.onnx",
    "identity-a": "identity.onnx",
    "identity-b": "identity.onnx",
    "identity-c": "identity.onnx",
}
MEMBERS = "[digits-ens-a, digits-ens-b, digits-ens-c]"
ENDPOINTS = {
    "small": "  traffic: [{backend: digits-small, weight: 100}]\n",
    "large": "  traffic: [{backend: digits-large, weight: 100}]\n",
    "cascade-0.9": "  cascade: {output: probabilities, stages: [{backend: digits-small, "
                   "minConfidence: 0.9}, {backend: digits-large}]}\n",
    "cascade-0.99": "  cascade: {output: probabilities, stages: [{backend: digits-small, "
                    "minConfidence: 0.99}, {backend: digits-large}]}\n",
    "ens-a": "  traffic: [{backend: digits-ens-a, weight: 100}]\n",
    "ens-b": "  traffic: [{backend: digits-ens-b, weight: 100}]\n",
    "ens-c": "  traffic: [{backend: digits-ens-c, weight: 100}]\n",
    "ensemble-mean": f"  ensemble: {{backends: {MEMBERS}, output: probabilities, reduce: Mean}}\n",
    "ensemble-vote": f"  ensemble: {{backends: {MEMBERS}, output: probabilities, reduce: Vote}}\n",
    "ensemble-max": f"  ensemble: {{backends: {MEMBERS}, output: probabilities, reduce: Max}}\n",
    "sequence": "  sequence: {steps: [{backend: digits-pca}, {backend: digits-pca-head, "
                "inputs: {X: variable}}]}\n",
    "hop1": "  traffic: [{backend: identity-a, weight: 100}]\n",
    "hop2": "  sequence: {steps: [{backend: identity-a}, {backend: identity-b, inputs: {x: y}}]}\n",
    "hop3": "  sequence: {steps: [{backend: identity-a}, {backend: identity-b, inputs: {x: y}}, "
            "{backend: identity-c, inputs: {x: y}}]}\n",
}
ACCURACY = ["small", "large", "cascade-0.9", "cascade-0.99", "ens-a", "ens-b", "ens-c",
            "ensemble-mean", "ensemble-vote", "ensemble-max", "sequence"]


def manifests(d: Path) -> None:
    docs = []
    for b, model in BACKENDS.items():
        docs.append(f"apiVersion: serval.dev/v1alpha1\nkind: Backend\nmetadata: {{name: {b}}}\n"
                    f"spec:\n  model: {{uri: \"file://{REPO / 'models' / model}\"}}\n"
                    "  replicas: 1\n")
    for name, spec in ENDPOINTS.items():
        ep = name.replace(".", "")
        docs.append(f"apiVersion: serval.dev/v1alpha1\nkind: Endpoint\nmetadata: {{name: {ep}}}\n"
                    f"spec:\n  route: {{pathPrefix: /{ep}}}\n{spec}")
    (d / "composition.yaml").write_text("---\n".join(docs))


def body(rows: list, name: str = "X", width: int = 64) -> bytes:
    return json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": [len(rows), width],
                                   "data": [v for r in rows for v in r]}]}).encode()


def url(port: int, name: str) -> str:
    ep = name.replace(".", "")
    return f"http://127.0.0.1:{port}/{ep}/v2/models/{ep}/infer"


def infer(port: int, name: str, rows: list) -> dict:
    req = urllib.request.Request(url(port, name), body(rows), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())
        out["_backend"] = r.headers.get("serval-backend")
        return out


def accuracy(port: int, name: str, rows: list, labels: list) -> dict:
    correct = large = 0
    for i in range(0, len(rows), 16):
        chunk = rows[i:i + 16]
        a = infer(port, name, chunk)
        p = next(o for o in a["outputs"] if o["name"] == "probabilities")["data"]
        stages = a.get("parameters", {}).get("serval_stages") or [a["_backend"]] * len(chunk)
        for k in range(len(chunk)):
            row = p[k * 10:(k + 1) * 10]
            correct += int(max(range(10), key=row.__getitem__) == labels[i + k])
            large += int(stages[k] == "digits-large")
    return {"accuracy": correct / len(rows), "escalated": large / len(rows)}


def router_pid(local_pid: int) -> int:
    """The router `serval local` started: its command line names `serval-local-<pid>`."""
    out = subprocess.run(["pgrep", "-f", f"serval-local-{local_pid}"], capture_output=True,
                         text=True).stdout.split()
    for pid in map(int, out):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip().startswith("serval-router"):
                return pid
        except OSError:
            pass
    raise RuntimeError(f"no router of serval local {local_pid} in {out}")


def answered(port: int, endpoint: str) -> float:
    """`serval_router_requests_total` of an endpoint, every backend and code."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("serval_router_requests_total{") and f'endpoint="{endpoint}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def hops(port: int, router: int, scratch: Path, window: list) -> dict:
    """p50 and router CPU per request of 1, 2 and 3 identity steps at c = 1 and c = 32."""
    f = scratch / "identity.json"
    f.write_bytes(body([[1.0, 2.0, 3.0, 4.0]], "x", 4))
    out: dict = {}
    for c in (1, 32):
        for name in ("hop1", "hop2", "hop3"):
            log(f"hop cost {name}, c = {c}")
            before, served = cpu_seconds(router), answered(port, name)
            rep, _, _ = loadgen(url(port, name), f, ["content-type: application/json"],
                                ["--concurrency", c] + window, 120)
            cpu = (cpu_seconds(router) or 0) - (before or 0)
            # Warm-up included on both sides: the router's own count of the endpoint's answers.
            requests = answered(port, name) - served
            out[f"{name}@c{c}"] = {"p50_us": rep["p50_us"], "p99_us": rep["p99_us"],
                                   "rps": rep["rps"], "errors": rep["error_count"],
                                   "router_cpu_us_per_request":
                                       cpu / requests * 1e6 if requests else None}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench/results"))
    ap.add_argument("--quick", action="store_true", help="short windows, to check the harness")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    window = ["--warmup", "1", "--duration", "3"] if args.quick else ["--warmup", "2",
                                                                      "--duration", "10"]
    truth = json.loads(TRUTH.read_text())
    rows, labels = truth["rows"], truth["labels"]
    scratch = Path(tempfile.mkdtemp(prefix="serval-bench-composition-"))
    manifests(scratch)
    port = free_port()
    local = subprocess.Popen([str(RELEASE / "serval"), "local", "-f", str(scratch), "--port",
                              str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict = {"truth": {k: truth[k] for k in ("accuracy", "cascadeSmallLarge",
                                                     "ensemble", "sequencePcaHead")}}
    try:
        deadline = time.time() + 120
        while True:
            try:
                for n in ACCURACY:
                    infer(port, n, rows[:1])
                # A cascade skips a stage that cannot serve yet: wait for both.
                stages = infer(port, "cascade-0.99", rows[:16])["parameters"]["serval_stages"]
                if "digits-large" in stages:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the composition Endpoints did not all serve in 120 s")
            time.sleep(0.3)
        log("serving; accuracy on the held-out split")
        results["accuracy"] = {n: accuracy(port, n, rows, labels) for n in ACCURACY}

        batch = rows[:16]
        batch_file = scratch / "batch.json"
        batch_file.write_bytes(body(batch))
        escalated_in_batch = sum(1 for s in (infer(port, "cascade-0.9", batch)["parameters"]
                                             ["serval_stages"]) if s == "digits-large")
        results["throughput"] = {"rows_per_request": len(batch),
                                 "escalated_per_request_at_0.9": escalated_in_batch,
                                 "concurrency": args.concurrency}
        for name in ("small", "large", "cascade-0.9"):
            log(f"throughput {name}, c = {args.concurrency}")
            rep, _, _ = loadgen(url(port, name), batch_file, ["content-type: application/json"],
                                  ["--concurrency", args.concurrency] + window, 120)
            results["throughput"][name] = {"rps": rep["rps"], "p50_us": rep["p50_us"],
                                           "p99_us": rep["p99_us"], "errors": rep["error_count"]}

        # One row the small model is sure of, and one it escalates at 0.9.
        sure = next(i for i in range(len(rows))
                    if infer(port, "cascade-0.9", [rows[i]])["_backend"] == "digits-small")
        unsure = next(i for i in range(len(rows))
                      if infer(port, "cascade-0.9", [rows[i]])["_backend"] == "digits-large")
        lat = {}
        for label, row, name in [("small alone, sure row", sure, "small"),
                                 ("cascade, sure row (1 stage)", sure, "cascade-0.9"),
                                 ("large alone, unsure row", unsure, "large"),
                                 ("cascade, unsure row (2 stages)", unsure, "cascade-0.9")]:
            f = scratch / f"row{row}.json"
            f.write_bytes(body([rows[row]]))
            rep, _, _ = loadgen(url(port, name), f, ["content-type: application/json"],
                                ["--concurrency", 1] + window, 120)
            lat[label] = {"p50_us": rep["p50_us"], "p99_us": rep["p99_us"], "rps": rep["rps"]}
        results["latency_c1"] = lat
        results["hops"] = hops(port, router_pid(local.pid), scratch, window)
    finally:
        stop(local)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "composition.json").write_text(json.dumps(results, indent=1) + "\n")
    t = results["throughput"]
    tr = results["truth"]
    offline = {"small": tr["accuracy"]["digits-small"], "large": tr["accuracy"]["digits-large"],
               "cascade-0.9": tr["cascadeSmallLarge"]["0.9"]["accuracy"],
               "cascade-0.99": tr["cascadeSmallLarge"]["0.99"]["accuracy"],
               "ens-a": tr["accuracy"]["digits-ens-a"], "ens-b": tr["accuracy"]["digits-ens-b"],
               "ens-c": tr["accuracy"]["digits-ens-c"],
               "ensemble-mean": tr["ensemble"]["Mean"], "ensemble-vote": tr["ensemble"]["Vote"],
               "ensemble-max": tr["ensemble"]["Max"], "sequence": tr["sequencePcaHead"]}
    lines = ["Cascade, ensemble and sequence Endpoints in serval local (bench/composition.py)", "",
             "Held-out digits (540 rows), 16 rows a request, through the router:",
             f"{'':16} {'accuracy':>9} {'offline':>9} {'to large':>9}   (offline: onnxruntime)"]
    for n, a in results["accuracy"].items():
        escalated = f"{a['escalated']*100:8.1f}%" if n.startswith(("cascade", "large")) else ""
        lines.append(f"{n:16} {a['accuracy']*100:8.2f}% {offline[n]*100:8.2f}% {escalated:>9}")
    acc = results["accuracy"]
    best = max(acc[m]["accuracy"] for m in ("ens-a", "ens-b", "ens-c"))
    lines.append("ensembles - best member: " + ", ".join(
        f"{r} {(acc['ensemble-' + r]['accuracy'] - best)*100:+.2f} points"
        for r in ("mean", "vote", "max")))
    lines += ["", f"Throughput, c = {t['concurrency']}, {t['rows_per_request']} rows a request "
              f"({t['escalated_per_request_at_0.9']} escalated at 0.9):"]
    for n in ("small", "large", "cascade-0.9"):
        lines.append(f"{n:16} {t[n]['rps']:9.0f} req/s {t[n]['rps']*t['rows_per_request']:9.0f} "
                     f"rows/s  p50 {t[n]['p50_us']/1000:.2f} ms  errors {t[n]['errors']}")
    lines.append(f"cascade / large alone: {t['cascade-0.9']['rps']/t['large']['rps']:.2f}x req/s")
    lines += ["", "Latency at c = 1, one row:"]
    for label, v in results["latency_c1"].items():
        lines.append(f"{label:32} p50 {v['p50_us']/1000:.3f} ms  p99 {v['p99_us']/1000:.3f} ms")
    l = results["latency_c1"]
    lines.append("cascade's own cost (1 stage vs small alone): "
                 f"{(l['cascade, sure row (1 stage)']['p50_us'] - l['small alone, sure row']['p50_us'])/1000:+.3f} ms p50")
    lines.append("extra stage (2 stages vs large alone): "
                 f"{(l['cascade, unsure row (2 stages)']['p50_us'] - l['large alone, unsure row']['p50_us'])/1000:+.3f} ms p50")
    h = results["hops"]
    lines += ["", "The cost of a hop: identity.onnx through the router, 1 step (traffic) and a "
              "sequence of 2 and 3 steps, one row of 4 floats:"]
    for c in (1, 32):
        for n in ("hop1", "hop2", "hop3"):
            v = h[f"{n}@c{c}"]
            cpu = v["router_cpu_us_per_request"]
            lines.append(f"c = {c:2}, {n[-1]} step(s): {v['rps']:8.0f} req/s  p50 {v['p50_us']/1000:.3f} ms"
                         f"  p99 {v['p99_us']/1000:.3f} ms  router CPU {cpu:.1f} us/request"
                         f"  errors {v['errors']}")
        one, two, three = (h[f"{n}@c{c}"] for n in ("hop1", "hop2", "hop3"))
        lines.append(f"c = {c:2}, per extra step: p50 "
                     f"{(two['p50_us'] - one['p50_us'])/1000:+.3f} ms, "
                     f"{(three['p50_us'] - two['p50_us'])/1000:+.3f} ms; router CPU "
                     f"{two['router_cpu_us_per_request'] - one['router_cpu_us_per_request']:+.1f} us, "
                     f"{three['router_cpu_us_per_request'] - two['router_cpu_us_per_request']:+.1f} us")
    lines.append("Anchors on this machine kind (issue 24): KServe's InferenceGraph +0.18 ms p50 "
                 "and ~90 us of router CPU per hop at c = 1; Ray Serve ~3.5 ms per hop.")
    (out / "composition.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
