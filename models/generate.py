#!/usr/bin/env python3
"""Deterministically generate Serval's test and demo models.

Usage:
    python models/generate.py [--out models] [--mobilenet-out DIR]

Writes into --out (committed, small):
    digits.onnx        MLPClassifier 64->128->64->10 trained on scikit-learn's bundled 8x8
                       digits; outputs `label` (int64 [N]) and `probabilities` (float [N,10]).
    identity.onnx      y = x * 1 + 0 over float [N,4]; for batching-correctness tests.
    gather.onnx        y = table[indices], int64 [N] -> float [N,4]; bad indices break the engine.
    fixed1.onnx        y = x + 1 over float [1,4]: a graph with a fixed batch of one.
    slow.onnx          32 x (y = tanh(y W)) over float [N,256], one shared 256x256 W: a model
                       slow enough per row (~4 MFLOP) that queueing and admission show in tests.
    digits-v2.onnx     digits retrained with another seed and shape: a good canary.
    digits-permuted.onnx  digits trained on labels shifted by one class: a bad canary that
                       disagrees with digits.onnx on nearly every row.
    digits/agreement.json  1,000 noisy digits and the classes digits and digits-v2 give them
                       (onnxruntime): the offline truth of mirror agreement tests.
    digits-small.onnx, digits-large.onnx, digits-ens-{a,b,c}.onnx  MLPs trained on a fixed
                       70 % split of the digits: a fast and a slower, more accurate cascade
                       stage, and three ensemble members (issue 24).
    digits-pca.onnx, digits-pca-head.onnx  a two-step sequence on the same split: PCA of the
                       64 pixels to 32 components (`X` -> `variable`), then a logistic
                       regression on them (`X` -> `label`, `probabilities`).
    digits/composition.json  the held-out 30 % (rows, labels) and each model's, the
                       cascade's, the ensembles' (Mean, Vote, Max) and the sequence's
                       accuracy and per-row classes on it (onnxruntime).
    digits/<name>.png  8x8 grayscale digits from the data set, pixel = value * 15, so the
                       built-in preprocess {"width":8,"height":8,"layout":"Flat","scale":1/15}
                       recovers the data-set values (0..16) exactly.
    digits/labels.json the ground-truth label of each PNG.

With --mobilenet-out DIR, also writes DIR/mobilenetv2.onnx (~14 MB, not committed):
MobileNetV2's architecture with deterministic random weights, input float [N,3,224,224].
"""

import argparse
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
OPSET = 17
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits(out: str) -> None:
    from PIL import Image
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target
    clf = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=300, random_state=SEED)
    clf.fit(x, y)
    model = to_onnx(
        clf,
        x[:1],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    model.graph.name = "digits"
    # skl2onnx stamps its own version and a random-free but tool-dependent doc; keep it stable.
    model.producer_version = "serval"
    with open(os.path.join(out, "digits.onnx"), "wb") as f:
        f.write(model.SerializeToString())
    print(f"digits.onnx: training accuracy {clf.score(x, y):.4f}")

    pngs = os.path.join(out, "digits")
    os.makedirs(pngs, exist_ok=True)
    labels = {}
    # The first example of each class, so the file names say what the model should answer.
    for digit in range(10):
        index = int(np.flatnonzero(y == digit)[0])
        pixels = (data.images[index] * 15).astype(np.uint8)
        name = f"{NAMES[digit]}.png"
        Image.fromarray(pixels, mode="L").save(os.path.join(pngs, name), optimize=False)
        labels[name] = {"label": NAMES[digit], "index": index,
                        "predicted": NAMES[int(clf.predict(x[index:index + 1])[0])]}
    with open(os.path.join(pngs, "labels.json"), "w") as f:
        json.dump(labels, f, indent=2, sort_keys=True)
        f.write("\n")


def canaries(out: str) -> None:
    """Canaries of digits.onnx for rollouts and mirror agreement (issue 20), same interface:

    digits-v2.onnx        retrained (another seed and shape): as accurate, a good canary.
    digits-permuted.onnx  trained on labels shifted by one class (y -> (y + 1) % 10): it
                          disagrees with digits.onnx on nearly every row, a bad canary.
    """
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target
    for name, labels, seed, hidden in [
        ("digits-v2", y, SEED + 1, (96, 48)),
        ("digits-permuted", (y + 1) % 10, SEED, (128, 64)),
    ]:
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=300, random_state=seed)
        clf.fit(x, labels)
        model = to_onnx(
            clf,
            x[:1],
            options={id(clf): {"zipmap": False}},
            target_opset={"": OPSET, "ai.onnx.ml": 3},
        )
        model.graph.name = name
        model.producer_version = "serval"
        with open(os.path.join(out, f"{name}.onnx"), "wb") as f:
            f.write(model.SerializeToString())
        print(f"{name}.onnx: training accuracy on its labels {clf.score(x, labels):.4f}")


# The fixed train/test split of the composition models (issue 24): 30 % held out, stratified.
SPLIT = {"test_size": 0.3, "random_state": SEED}
# The composition models: name -> (hidden layers, seed, training iterations). `small` is fast
# and less accurate, `large` slower and more accurate (the cascade's two stages); `ens-*` are
# three different members for an ensemble.
COMPOSITION = {
    "digits-small": ((32,), SEED, 1000),
    "digits-large": ((512, 512), SEED, 300),
    "digits-ens-a": ((32,), SEED + 1, 300),
    "digits-ens-b": ((64, 32), SEED + 2, 300),
    "digits-ens-c": ((24, 24), SEED + 3, 300),
}


def composition(out: str) -> None:
    """Models for cascades and ensembles (issue 24), trained on the training split of
    scikit-learn's digits, same interface as digits.onnx (`X` float [N,64] -> `label`,
    `probabilities`), and digits/composition.json: the held-out split (rows and labels) and
    what each model, the cascade small -> large at several thresholds and the mean ensemble
    answer on it, computed here with onnxruntime (the offline truth of the composition tests).
    """
    import onnxruntime as ort
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    data = load_digits()
    x = data.data.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, data.target, stratify=data.target,
                                                        **SPLIT)
    probs = {}
    for name, (hidden, seed, iters) in COMPOSITION.items():
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=iters, random_state=seed)
        clf.fit(x_train, y_train)
        model = to_onnx(clf, x_train[:1], options={id(clf): {"zipmap": False}},
                        target_opset={"": OPSET, "ai.onnx.ml": 3})
        model.graph.name = name
        model.producer_version = "serval"
        path = os.path.join(out, f"{name}.onnx")
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        _, p = ort.InferenceSession(path).run(None, {"X": x_test})
        probs[name] = p

    def accuracy(p):
        return float(np.mean(np.argmax(p, axis=1) == y_test))

    small, large = probs["digits-small"], probs["digits-large"]
    cascades = {}
    for threshold in (0.9, 0.99):
        escalate = small.max(axis=1) < threshold
        answer = np.where(escalate[:, None], large, small)
        cascades[str(threshold)] = {"accuracy": accuracy(answer),
                                    "escalated": float(escalate.mean())}
    members = [probs[n] for n in ("digits-ens-a", "digits-ens-b", "digits-ens-c")]
    votes = np.stack([np.argmax(m, axis=1) for m in members], axis=1)

    def vote(row):
        # The majority, ties to the member listed first (as the router does).
        counts = [(list(row).count(v), -i) for i, v in enumerate(row)]
        return row[-max(counts)[1]]

    ensemble = {
        "Mean": np.argmax(sum(members) / len(members), axis=1),
        "Max": np.argmax(np.maximum.reduce(members), axis=1),
        "Vote": np.array([vote(r) for r in votes]),
    }

    # A sequence: PCA to 32 components (output `variable`), then a classifier on them
    # (input `X`), trained on the PCA of the training split.
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    pca = PCA(n_components=32, random_state=SEED).fit(x_train)
    head = LogisticRegression(max_iter=2000).fit(pca.transform(x_train).astype(np.float32),
                                                 y_train)
    for name, model, sample in (("digits-pca", pca, x_train[:1]),
                                ("digits-pca-head", head,
                                 pca.transform(x_train[:1]).astype(np.float32))):
        onx = to_onnx(model, sample, options={id(model): {"zipmap": False}}
                      if name.endswith("head") else None,
                      target_opset={"": OPSET, "ai.onnx.ml": 3})
        onx.graph.name = name
        onx.producer_version = "serval"
        with open(os.path.join(out, f"{name}.onnx"), "wb") as f:
            f.write(onx.SerializeToString())
    (reduced,) = ort.InferenceSession(os.path.join(out, "digits-pca.onnx")).run(
        None, {"X": x_test})
    _, p = ort.InferenceSession(os.path.join(out, "digits-pca-head.onnx")).run(
        None, {"X": reduced})
    sequence = np.argmax(p, axis=1)
    truth = {
        "split": {"testSize": SPLIT["test_size"], "randomState": SPLIT["random_state"],
                  "stratified": True},
        "accuracy": {name: accuracy(p) for name, p in probs.items()},
        "cascadeSmallLarge": cascades,
        "ensembleMean": accuracy(sum(members) / len(members)),
        "ensemble": {k: float(np.mean(v == y_test)) for k, v in ensemble.items()},
        "sequencePcaHead": float(np.mean(sequence == y_test)),
        "predictions": {**{f"ensemble{k}": v.tolist() for k, v in ensemble.items()},
                        "sequence": sequence.tolist()},
        "rows": x_test.astype(int).tolist(),
        "labels": y_test.tolist(),
    }
    os.makedirs(os.path.join(out, "digits"), exist_ok=True)
    with open(os.path.join(out, "digits", "composition.json"), "w") as f:
        json.dump(truth, f, separators=(",", ":"))
        f.write("\n")
    print(json.dumps({k: v for k, v in truth.items()
                      if k not in ("rows", "labels", "predictions")}, indent=1))


def agreement_corpus(out: str) -> None:
    """digits/agreement.json: 1,000 noisy digits (integers 0..16, so a PNG at value * 15 holds
    them exactly) and the class each of digits.onnx and digits-v2.onnx gives them, computed
    here with onnxruntime: the offline truth the router's mirror agreement is checked against.
    """
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(SEED)
    rows = rng.choice(len(data.data), size=1000, replace=False)
    noisy = np.clip(np.rint(data.data[rows] + rng.normal(0.0, 4.0, size=(1000, 64))), 0, 16)
    x = noisy.astype(np.float32)
    classes = {}
    for name in ["digits", "digits-v2"]:
        sess = ort.InferenceSession(os.path.join(out, f"{name}.onnx"))
        _, probs = sess.run(None, {"X": x})
        classes[name] = probs.argmax(axis=1).tolist()
    agree = int(sum(a == b for a, b in zip(classes["digits"], classes["digits-v2"])))
    corpus = {
        "inputs": noisy.astype(int).tolist(),
        "stable": classes["digits"],
        "canary": classes["digits-v2"],
        "agree": agree,
    }
    os.makedirs(os.path.join(out, "digits"), exist_ok=True)
    with open(os.path.join(out, "digits", "agreement.json"), "w") as f:
        json.dump(corpus, f, separators=(",", ":"))
        f.write("\n")
    print(f"digits/agreement.json: digits and digits-v2 agree on {agree} of 1000 noisy digits")


def identity(out: str) -> None:
    one = numpy_helper.from_array(np.ones([1], dtype=np.float32), "one")
    zero = numpy_helper.from_array(np.zeros([1], dtype=np.float32), "zero")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "one"], ["scaled"]),
         helper.make_node("Add", ["scaled", "zero"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[one, zero],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="serval")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "identity.onnx"))


def gather(out: str) -> None:
    """y = table[indices]: an out-of-range index makes tract fail or panic (engine-failure tests)."""
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "indices"], ["y"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("indices", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="serval")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "gather.onnx"))


def fixed_batch(out: str) -> None:
    """y = x + 1 over float [1,4]: a graph exported with a fixed batch of one."""
    one = numpy_helper.from_array(np.ones([1], dtype=np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "fixed1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="serval")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "fixed1.onnx"))


class _Builder:
    """Accumulates MobileNetV2 nodes and deterministic random initializers."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(SEED)
        self.nodes = []
        self.inits = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, groups: int, relu6: bool) -> str:
        w = self.name("w")
        b = self.name("b")
        fan_in = cin // groups * k * k
        self.inits.append(numpy_helper.from_array(
            (self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in))
            .astype(np.float32), w))
        self.inits.append(numpy_helper.from_array(np.zeros(cout, dtype=np.float32), b))
        y = self.name("conv")
        pad = k // 2
        self.nodes.append(helper.make_node(
            "Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[stride, stride],
            pads=[pad, pad, pad, pad], group=groups))
        if not relu6:
            return y
        lo, hi = self.name("lo"), self.name("hi")
        self.inits.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), lo))
        self.inits.append(numpy_helper.from_array(np.array(6.0, dtype=np.float32), hi))
        z = self.name("relu6")
        self.nodes.append(helper.make_node("Clip", [y, lo, hi], [z]))
        return z


def mobilenetv2(out: str) -> None:
    b = _Builder()
    x = b.conv("input", 3, 32, 3, 2, 1, True)
    cin = 32
    # (expansion t, channels c, repeats n, first stride s), from the MobileNetV2 paper.
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            y = x if t == 1 else b.conv(x, cin, hidden, 1, 1, 1, True)
            y = b.conv(y, hidden, hidden, 3, stride, hidden, True)
            y = b.conv(y, hidden, c, 1, 1, 1, False)
            if stride == 1 and cin == c:
                added = b.name("add")
                b.nodes.append(helper.make_node("Add", [x, y], [added]))
                y = added
            x, cin = y, c
    x = b.conv(x, cin, 1280, 1, 1, 1, True)
    pooled = b.name("pool")
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
    flat = b.name("flat")
    b.nodes.append(helper.make_node("Flatten", [pooled], [flat], axis=1))
    fc_w, fc_b = b.name("fc_w"), b.name("fc_b")
    b.inits.append(numpy_helper.from_array(
        (b.rng.standard_normal((1280, 1000)) * 0.01).astype(np.float32), fc_w))
    b.inits.append(numpy_helper.from_array(np.zeros(1000, dtype=np.float32), fc_b))
    b.nodes.append(helper.make_node("Gemm", [flat, fc_w, fc_b], ["logits"]))
    graph = helper.make_graph(
        b.nodes, "mobilenetv2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="serval")
    model.ir_version = 8
    onnx.checker.check_model(model)
    os.makedirs(out, exist_ok=True)
    onnx.save(model, os.path.join(out, "mobilenetv2.onnx"))


def slow(out: str) -> None:
    """32 layers of y = tanh(y W) with one shared W: ~4 MFLOP a row, in a 256 KB file."""
    rng = np.random.default_rng(SEED)
    w = numpy_helper.from_array(
        (rng.standard_normal((256, 256)) / 16).astype(np.float32), "w")
    nodes, y = [], "x"
    for i in range(32):
        nodes.append(helper.make_node("MatMul", [y, "w"], [f"m{i}"]))
        y = "y" if i == 31 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [y]))
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="serval")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, "slow.onnx"))


def check(out: str) -> None:
    """Cross-check the committed models with onnxruntime so a broken export fails here."""
    import onnxruntime as ort

    sess = ort.InferenceSession(os.path.join(out, "identity.onnx"))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert np.array_equal(sess.run(None, {"x": x})[0], x)
    from sklearn.datasets import load_digits
    data = load_digits()
    sess = ort.InferenceSession(os.path.join(out, "digits.onnx"))
    labels, probs = sess.run(None, {"X": data.data[:16].astype(np.float32)})
    assert probs.shape == (16, 10), probs.shape
    print(f"onnxruntime digits labels[:16] = {labels.tolist()}")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=here)
    parser.add_argument("--mobilenet-out", default=None)
    parser.add_argument("--skip-small", action="store_true",
                        help="only write mobilenetv2 (the committed models stay untouched)")
    parser.add_argument("--only-canaries", action="store_true",
                        help="only write the digits canaries (the other models stay untouched)")
    parser.add_argument("--only-composition", action="store_true",
                        help="only write the cascade and ensemble models and their truth")
    args = parser.parse_args()
    if args.only_canaries:
        canaries(args.out)
        agreement_corpus(args.out)
        return
    if args.only_composition:
        composition(args.out)
        return
    if not args.skip_small:
        digits(args.out)
        identity(args.out)
        gather(args.out)
        fixed_batch(args.out)
        slow(args.out)
        canaries(args.out)
        agreement_corpus(args.out)
        composition(args.out)
        check(args.out)
    if args.mobilenet_out:
        mobilenetv2(args.mobilenet_out)


if __name__ == "__main__":
    main()
