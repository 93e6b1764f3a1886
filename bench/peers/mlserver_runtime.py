"""Seldon MLServer: a custom inference runtime (`mlserver.MLModel`) on onnxruntime, served by
`mlserver start DIR` with the settings.json and model-settings.json that bench/run.py writes
(parallel_workers, adaptive batching with max_batch_size / max_batch_time; see README.md).

Requests, as MLServer documents them:
- V2 REST JSON tensors at /v2/models/<name>/infer (the digits workload; adaptive batching
  merges the requests' first dimension);
- a JPEG as a V2 BYTES tensor with the `base64` content type (MLServer's Base64 codec) at the
  same path: decoded, resized and normalised with Pillow and numpy (peers/imaging.py), answered
  as three outputs `label` (BYTES), `index` (INT64), `score` (FP32); batched the same way;
- raw float32 bytes of one [1, 3, 224, 224] row at /models/<name>/raw: MLServer's REST has no
  binary tensor extension, so this is a custom handler (`mlserver.handlers.custom_handler`,
  the way MLServer's own MLflow runtime serves /invocations from the raw body), answered with
  the raw float32 logits. Custom handlers run in the inference workers but bypass adaptive
  batching.

Model parameters (model-settings.json `parameters`): `uri` (the ONNX file), `extra`:
{"ort_threads": 1, "labels": "<labels.json>"}."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from fastapi import Depends, Request  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from mlserver import MLModel  # noqa: E402
from mlserver.codecs import Base64Codec, NumpyCodec, StringCodec  # noqa: E402
from mlserver.handlers import custom_handler  # noqa: E402
from mlserver.types import InferenceRequest, InferenceResponse  # noqa: E402

from imaging import load_labels, preprocess, raw_row, top1  # noqa: E402
from tensors import session  # noqa: E402

async def _raw_body(request: Request) -> bytes:
    return await request.body()


class OnnxModel(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        extra = (params.extra if params else None) or {}
        self._session = session(params.uri, int(extra.get("ort_threads", 1)))
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._labels = load_labels(extra["labels"]) if extra.get("labels") else None
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request_input = payload.inputs[0]
        if request_input.datatype == "BYTES":
            # One JPEG per row (adaptive batching concatenates the rows of several requests).
            images = Base64Codec.decode_input(request_input)
            x = np.concatenate([preprocess(b) for b in images])
            best = top1(self._session.run(None, {self._input: x})[0], self._labels)
            outputs = [
                StringCodec.encode_output("label", [b["label"] for b in best]),
                NumpyCodec.encode_output("index", np.array([b["index"] for b in best])),
                NumpyCodec.encode_output("score", np.array([b["score"] for b in best],
                                                           dtype=np.float32)),
            ]
        else:
            x = NumpyCodec.decode_input(request_input).astype(np.float32, copy=False)
            outs = self._session.run(None, {self._input: x})
            outputs = [NumpyCodec.encode_output(n, o) for n, o in zip(self._outputs, outs)]
        return InferenceResponse(model_name=self.name, outputs=outputs)

    @custom_handler(rest_path="/models/{name}/raw")
    async def raw(self, name: str, body: bytes = Depends(_raw_body)) -> Response:
        logits = self._session.run(None, {self._input: raw_row(body)})[0]
        return Response(content=logits.astype(np.float32).tobytes(),
                        media_type="application/octet-stream")
