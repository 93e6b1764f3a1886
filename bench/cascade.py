#!/usr/bin/env python3
"""Cascade (issue 24): accuracy, escalation and throughput of a cascade in `serval local`.

One `serval local` serves digits-small and digits-large (models/generate.py, trained on a fixed
70 % of scikit-learn's digits) behind four Endpoints: each model alone, and a cascade
small -> large at minConfidence 0.9 and at 0.99. On the held-out 30 %
(models/digits/composition.json):

1. accuracy and the share of rows escalated, through the router, 16 rows a request;
2. throughput at saturation (closed loop, --concurrency clients), requests of 16 held-out rows
   (each request the same 16 rows, the first of the held-out set: 1 of them escalates at 0.9),
   cascade / large alone, and rows a second;
3. latency at concurrency 1 of one row: a row the small model is sure of through the cascade
   (one stage) against the small model alone (the cascade's own cost), and a row it escalates
   against the large model alone (the cost of the extra stage).

Only the standard library and serval-loadgen. Writes cascade.{json,txt} into --out.

    cascade.py [--out bench/results] [--quick]
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
from overload import RELEASE, free_port, loadgen, log, stop  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRUTH = REPO / "models/digits/composition.json"
ENDPOINTS = {
    "small": "  traffic: [{backend: digits-small, weight: 100}]\n",
    "large": "  traffic: [{backend: digits-large, weight: 100}]\n",
    "cascade-0.9": "  cascade: {output: probabilities, stages: [{backend: digits-small, "
                   "minConfidence: 0.9}, {backend: digits-large}]}\n",
    "cascade-0.99": "  cascade: {output: probabilities, stages: [{backend: digits-small, "
                    "minConfidence: 0.99}, {backend: digits-large}]}\n",
}


def manifests(d: Path) -> None:
    docs = []
    for b in ("digits-small", "digits-large"):
        docs.append(f"apiVersion: serval.dev/v1alpha1\nkind: Backend\nmetadata: {{name: {b}}}\n"
                    f"spec:\n  model: {{uri: \"file://{REPO / 'models' / (b + '.onnx')}\"}}\n"
                    "  replicas: 1\n")
    for name, spec in ENDPOINTS.items():
        ep = name.replace(".", "")
        docs.append(f"apiVersion: serval.dev/v1alpha1\nkind: Endpoint\nmetadata: {{name: {ep}}}\n"
                    f"spec:\n  route: {{pathPrefix: /{ep}}}\n{spec}")
    (d / "cascade.yaml").write_text("---\n".join(docs))


def body(rows: list) -> bytes:
    return json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [len(rows), 64],
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
    scratch = Path(tempfile.mkdtemp(prefix="serval-bench-cascade-"))
    manifests(scratch)
    port = free_port()
    local = subprocess.Popen([str(RELEASE / "serval"), "local", "-f", str(scratch), "--port",
                              str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict = {"truth": {k: truth[k] for k in ("accuracy", "cascadeSmallLarge")}}
    try:
        deadline = time.time() + 90
        while True:
            try:
                infer(port, "cascade-0.9", rows[:1])
                infer(port, "large", rows[:1])
                infer(port, "small", rows[:1])
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        log("serving; accuracy on the held-out split")
        results["accuracy"] = {n: accuracy(port, n, rows, labels) for n in ENDPOINTS}

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
    finally:
        stop(local)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade.json").write_text(json.dumps(results, indent=1) + "\n")
    t = results["throughput"]
    lines = ["Cascade digits-small -> digits-large in serval local (bench/cascade.py)", "",
             "Held-out digits (540 rows), 16 rows a request, through the router:",
             f"{'':16} {'accuracy':>9} {'to large':>9}   (offline truth: onnxruntime)"]
    for n, a in results["accuracy"].items():
        lines.append(f"{n:16} {a['accuracy']*100:8.2f}% {a['escalated']*100:8.1f}%")
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
    (out / "cascade.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
