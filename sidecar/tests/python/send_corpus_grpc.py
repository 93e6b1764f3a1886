"""Sends every row of a digits corpus (models/digits/agreement.json) as one gRPC ModelInfer call
with the real tritonclient.grpc, and fails on the first call that does not succeed.

    send_corpus_grpc.py HOST:PORT MODEL CORPUS.json

Run by `cargo test -p serval-cli --test local mirror` against `serval local`'s router, whose
mirror then compares each call's answer with its shadow's.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> int:
    url, model, corpus = sys.argv[1:4]
    with open(corpus) as f:
        rows = json.load(f)["inputs"]
    client = grpcclient.InferenceServerClient(url)
    for row in rows:
        x = np.asarray([row], dtype=np.float32)
        tensor = grpcclient.InferInput("X", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        answer = client.infer(model, [tensor])
        assert answer.as_numpy("probabilities").shape == (1, 10), answer.get_response()
    print(f"{len(rows)} gRPC calls answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
