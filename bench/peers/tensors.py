"""Open Inference Protocol V2 JSON tensors <-> numpy, for the peers whose framework leaves the
payload to the user (Ray Serve, Flask). Every system gets byte-identical request bodies."""

import json

import numpy as np

V2_TO_NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
NUMPY_TO_V2 = {np.dtype(v): k for k, v in V2_TO_NUMPY.items()}


def decode(body: bytes) -> np.ndarray:
    """The first input tensor of a V2 JSON request as a numpy array."""
    tensor = json.loads(body)["inputs"][0]
    dtype = V2_TO_NUMPY[tensor["datatype"]]
    return np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])


def encode(model: str, names: list, outputs: list) -> bytes:
    """A V2 JSON response with one entry per model output."""
    return json.dumps({
        "model_name": model,
        "outputs": [
            {"name": n, "datatype": NUMPY_TO_V2.get(o.dtype, "FP32"), "shape": list(o.shape),
             "data": o.ravel().tolist()}
            for n, o in zip(names, outputs)
        ],
    }).encode()


def session(path: str, threads: int):
    """An onnxruntime CPU session limited to `threads` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
