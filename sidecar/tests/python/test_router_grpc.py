"""gRPC through the router: the Endpoint `digits` of examples/ (digits-v1 90, digits-v2 10,
`x-canary: 1` to digits-v2, sticky on `x-user-id`) applies its policy to gRPC calls as to REST.

Run by `cargo test -p serval-cli --test local tritonclient` against the router of `serval
local` (SERVAL_URL host:port). Each answer's initial metadata names its Backend
(`serval-backend`), as the REST answers' headers do.
"""

import os
from collections import Counter

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_digits
from tritonclient.grpc import service_pb2, service_pb2_grpc

URL = os.environ.get("SERVAL_URL")
NAME = "digits"

if not URL:
    pytest.fail("SERVAL_URL must be set (run through cargo test)", pytrace=False)


@pytest.fixture(scope="module")
def stub():
    with grpc.insecure_channel(URL) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def request_():
    x = load_digits().data[:1].astype(np.float32)
    req = service_pb2.ModelInferRequest(model_name=NAME)
    req.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def backend_of(stub, req, metadata=()):
    response, call = stub.ModelInfer.with_call(req, metadata=metadata)
    assert response.model_name == NAME
    return dict(call.initial_metadata())["serval-backend"]


def test_a_90_10_split_over_10000_calls(stub, request_):
    counts = Counter(backend_of(stub, request_) for _ in range(10_000))
    share = counts["digits-v1"] / 10_000
    print(f"digits-v1 {share:.4f} of 10,000 gRPC calls: {dict(counts)}")
    assert set(counts) == {"digits-v1", "digits-v2"}
    assert abs(share - 0.90) <= 0.02, counts


def test_header_match_and_sticky_keys_are_read_from_metadata(stub, request_):
    canary = Counter(backend_of(stub, request_, [("x-canary", "1")]) for _ in range(200))
    assert canary == {"digits-v2": 200}, canary
    for user in ("ada", "grace", "linus"):
        pinned = Counter(backend_of(stub, request_, [("x-user-id", user)]) for _ in range(50))
        assert len(pinned) == 1, (user, pinned)
