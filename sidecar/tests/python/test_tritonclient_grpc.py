"""The real tritonclient (gRPC) against a server of models/digits.onnx named `digits`, on the
same port as REST.

Run by `cargo test -p serval-sidecar --test process tritonclient` against a serval-sidecar.
SERVAL_URL is host:port, SERVAL_MODEL the .onnx path (the onnxruntime reference), and
SERVAL_MAX_BODY the server's body limit in bytes.
"""

import os

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_digits
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

URL = os.environ.get("SERVAL_URL")
MODEL_PATH = os.environ.get("SERVAL_MODEL")
MAX_BODY = int(os.environ.get("SERVAL_MAX_BODY", "0"))
NAME = "digits"

if not URL or not MODEL_PATH or not MAX_BODY:
    pytest.fail("SERVAL_URL, SERVAL_MODEL and SERVAL_MAX_BODY must be set (run through cargo "
                "test)", pytrace=False)


@pytest.fixture(scope="module")
def client():
    return grpcclient.InferenceServerClient(url=URL)


@pytest.fixture(scope="module")
def batch():
    x = load_digits().data[:37].astype(np.float32)
    return x, references(x)


def references(x):
    """onnxruntime's (labels, probabilities) for `x` under each model SERVAL_MODEL lists
    (os.pathsep-separated): through an Endpoint's split, any of its Backends may answer."""
    return [tuple(ort.InferenceSession(p).run(None, {"X": x}))
            for p in MODEL_PATH.split(os.pathsep)]


def assert_one_model(got_labels, got_probs, refs):
    """The answer is exactly one listed model's, as onnxruntime computes it."""
    misses = []
    for labels, probs in refs:
        try:
            np.testing.assert_array_equal(got_labels, labels)
            np.testing.assert_allclose(got_probs, probs, rtol=1e-4, atol=1e-5)
            return
        except AssertionError as e:
            misses.append(str(e))
    raise AssertionError("equal to no listed model's answer:\n" + "\n".join(misses))


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(NAME)
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata(as_json=True)
    assert "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(NAME, as_json=True)
    assert meta["name"] == NAME
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
    assert [o["datatype"] for o in meta["outputs"]] == ["INT64", "FP32"]


def test_infer_fp32_in_int64_and_fp32_out_matches_onnxruntime(client, batch):
    x, refs = batch
    inp = grpcclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outputs = [grpcclient.InferRequestedOutput("label"),
               grpcclient.InferRequestedOutput("probabilities")]
    result = client.infer(NAME, [inp], outputs=outputs, request_id="42")
    response = result.get_response()
    assert response.id == "42"
    assert response.model_name == NAME
    assert result.as_numpy("label").dtype == np.int64
    assert_one_model(result.as_numpy("label"), result.as_numpy("probabilities"), refs)
    # Without requested outputs, every output in the model's order.
    every = client.infer(NAME, [inp])
    assert [o.name for o in every.get_response().outputs] == ["label", "probabilities"]


def test_typed_contents_are_accepted_too(batch):
    """tritonclient always sends raw_input_contents; other clients send typed contents."""
    x, refs = batch
    request = service_pb2.ModelInferRequest(model_name=NAME)
    tensor = request.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.flatten().tolist())
    with grpc.insecure_channel(URL) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert [o.name for o in response.outputs] == ["label", "probabilities"]
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.int64)
    probs = np.frombuffer(response.raw_output_contents[1], dtype=np.float32).reshape(-1, 10)
    assert_one_model(got, probs, refs)


def test_a_request_over_the_body_limit_is_refused_with_the_limit(client):
    # 256 MiB of FP32 rows: over the default 64 MiB limit.
    rows = (256 << 20) // (64 * 4)
    x = np.zeros((rows, 64), dtype=np.float32)
    inp = grpcclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as err:
        client.infer(NAME, [inp])
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED", err.value
    assert str(MAX_BODY) in err.value.message(), err.value


def test_errors_carry_grpc_codes(client, batch):
    x, _ = batch
    inp = grpcclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [inp])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "not found" in err.value.message()
    wrong = grpcclient.InferInput("X", [37, 63], "FP32")
    wrong.set_data_from_numpy(x[:, :63].copy())
    with pytest.raises(InferenceServerException) as err:
        client.infer(NAME, [wrong])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
