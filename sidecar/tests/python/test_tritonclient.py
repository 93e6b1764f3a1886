"""The real tritonclient (HTTP) against a server of models/digits.onnx named `digits`.

Run by `cargo test -p serval-sidecar --test process tritonclient` against a serval-sidecar, and
by `cargo test -p serval-cli --test local tritonclient` against the router of `serval local`
(the Endpoint `digits`). Both set SERVAL_URL (host:port) and SERVAL_MODEL (the .onnx path, used
for an onnxruntime reference).
"""

import os

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from sklearn.datasets import load_digits

URL = os.environ.get("SERVAL_URL")
MODEL_PATH = os.environ.get("SERVAL_MODEL")
NAME = "digits"

if not URL or not MODEL_PATH:
    pytest.fail("SERVAL_URL and SERVAL_MODEL must be set (run through cargo test)", pytrace=False)


@pytest.fixture(scope="module")
def client():
    return httpclient.InferenceServerClient(url=URL)


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
    server = client.get_server_metadata()
    assert "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(NAME)
    assert meta["name"] == NAME
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_infer_matches_onnxruntime(client, batch, binary_in, binary_out):
    x, refs = batch
    inp = httpclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outputs = [
        httpclient.InferRequestedOutput("label", binary_data=binary_out),
        httpclient.InferRequestedOutput("probabilities", binary_data=binary_out),
    ]
    result = client.infer(NAME, [inp], outputs=outputs, request_id="42")
    assert result.get_response()["id"] == "42"
    assert result.get_response()["model_name"] == NAME
    assert_one_model(result.as_numpy("label"), result.as_numpy("probabilities"), refs)


def test_unknown_model_is_an_error(client, batch):
    x, _ = batch
    inp = httpclient.InferInput("X", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(Exception) as err:
        client.infer("nope", [inp])
    assert "not found" in str(err.value)
