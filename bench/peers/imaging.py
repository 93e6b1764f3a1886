"""JPEG -> model input and logits -> label, the way a Python model server does it with its usual
libraries (Pillow, numpy), for the peers of the JPEG -> label workload. The same arithmetic as
Serval's built-in pre-processing (sidecar/src/preprocess.rs): decode, convert to RGB, resize
to 224 x 224 with a triangle (bilinear, support scaled when shrinking) filter, scale by 1/255,
subtract the ImageNet mean and divide by its std per channel, NCHW float32; then softmax over
the logits and the top-1 class with its name."""

import io
import json
import os

import numpy as np
from PIL import Image

SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float64)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float64)
# Serval's --preprocess for the same pipeline (serval_api::ImagePreprocess).
SERVAL_PREPROCESS = {"image": {"width": SIZE, "height": SIZE, "color": "Rgb", "layout": "Nchw",
                               "mean": MEAN.tolist(), "std": STD.tolist()}}


def preprocess(jpeg: bytes) -> np.ndarray:
    """One [1, 3, 224, 224] float32 row from JPEG (or PNG) bytes."""
    with Image.open(io.BytesIO(jpeg)) as im:
        return preprocess_image(im)


def preprocess_image(im: Image.Image) -> np.ndarray:
    """One [1, 3, 224, 224] float32 row from an opened (not yet decoded) Pillow image."""
    im = im.convert("RGB")
    if im.size != (SIZE, SIZE):
        # Pillow's BILINEAR is a triangle filter whose support grows with the shrink factor,
        # as the image crate's FilterType::Triangle that Serval uses.
        im = im.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    x = (np.asarray(im, dtype=np.float64) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def raw_row(body: bytes) -> np.ndarray:
    """One [1, 3, 224, 224] row from its raw float32 bytes (the binary tensor workload)."""
    return np.frombuffer(body, dtype=np.float32).reshape(1, 3, SIZE, SIZE)


def load_labels(path: str | None = None) -> list:
    """The 1000 class names (bench/images.py writes them next to the photos)."""
    path = path or os.environ["BENCH_LABELS"]
    with open(path) as f:
        return json.load(f)


def top1(logits: np.ndarray, labels: list) -> list:
    """Softmax over each row of logits, then its best class: one dict per row, as Serval's
    built-in post-processing answers ({"label", "index", "score"})."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    p = z / z.sum(axis=1, keepdims=True)
    best = p.argmax(axis=1)
    return [{"label": labels[i], "index": int(i), "score": float(p[r, i])}
            for r, i in enumerate(best)]


def answer_json(logits: np.ndarray, labels: list) -> bytes:
    """The answer body for one image: {"label", "index", "score"}."""
    return json.dumps(top1(logits, labels)[0]).encode()
