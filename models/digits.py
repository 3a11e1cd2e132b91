"""A real dataset for the bundled CNN (``models/cnn.onnx``: 1x8x8 images, 3 classes): the handwritten digits 3, 5
and 8 (the three most often confused) of scikit-learn's bundled ``load_digits`` (UCI optical digits, 8x8 pixels, ink
0-16), standardized, split 80/20 with a fixed seed, stratified.

    python models/digits.py -o build/                   # build/digits_train.npz, build/digits_test.npz
    python models/digits.py --evaluate MODEL.onnx       # accuracy of a cnn.onnx-shaped model on the test split

Needs scikit-learn (``pip install scikit-learn``): its wheel ships the data, nothing is downloaded."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DIGITS = (3, 5, 8)
SEED = 20240701
TEST_FRACTION = 0.2


def load() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, test): ``image`` float32 [n, 1, 8, 8] and ``labels`` int64 [n] (0, 1, 2 for the digits 3, 5, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, DIGITS)
    images = digits.images[keep].astype(np.float64)
    labels = np.searchsorted(DIGITS, digits.target[keep]).astype(np.int64)
    rng = np.random.default_rng(SEED)
    test = np.zeros(len(labels), bool)
    for c in range(len(DIGITS)):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: round(TEST_FRACTION * len(members))]] = True
    mean, std = images[~test].mean(), images[~test].std()  # statistics of the training split only
    x = ((images - mean) / std).astype(np.float32)[:, None]
    return ({"image": x[~test], "labels": labels[~test]}, {"image": x[test], "labels": labels[test]})


def accuracy(model: str | Path, data: dict[str, np.ndarray]) -> float:
    """The fraction of ``data`` that ``model`` (an inference model with ``image`` in, ``logits`` out) gets right."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in sess.get_inputs()}
    (logits,) = sess.run(["logits"], feeds)
    return float(np.mean(np.argmax(logits, axis=1) == data["labels"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-o", "--out-dir", type=Path, default=Path("build"), help="where to write the .npz files")
    parser.add_argument("--evaluate", metavar="MODEL.onnx", help="print the test accuracy of MODEL instead")
    args = parser.parse_args(argv)
    train, test = load()
    if args.evaluate:
        print(f"test accuracy {accuracy(args.evaluate, test):.4f} ({len(test['labels'])} images); "
              f"train accuracy {accuracy(args.evaluate, train):.4f} ({len(train['labels'])} images)")
        return
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("digits_train.npz", train), ("digits_test.npz", test)):
        np.savez(args.out_dir / name, **part)
        print(f"wrote {args.out_dir / name}: {len(part['labels'])} images, classes {np.bincount(part['labels'])}")


if __name__ == "__main__":
    main()
