"""Build the bundled sample models with onnx.helper, deterministically (same script, same bytes).

    python models/build_models.py            # writes models/mlp.onnx
    python models/build_models.py -o DIR     # writes DIR/mlp.onnx

mlp.onnx (opset 17, IR version 8): a two-layer perceptron with a mean-squared-error loss.

    x[batch,4] -> MatMul W1[4,8] -> Add b1[8] -> Tanh = h -> MatMul W2[8,3] -> Add b2[3] = pred[batch,3]
    loss = ReduceMean((pred - target)^2)       outputs: loss (scalar), pred
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

OPSET = 17
IR_VERSION = 8
SEED = 20240501
HERE = Path(__file__).resolve().parent


def mlp() -> onnx.ModelProto:
    """The two-layer MLP with its loss; weights drawn from a fixed seed."""
    rng = np.random.default_rng(SEED)
    weights = {
        "W1": rng.standard_normal((4, 8)) / 2.0,
        "b1": rng.standard_normal(8) / 10.0,
        "W2": rng.standard_normal((8, 3)) / np.sqrt(8.0),
        "b2": rng.standard_normal(3) / 10.0,
    }
    inits = [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    nodes = [
        oh.make_node("MatMul", ["x", "W1"], ["xW1"], name="layer1/matmul"),
        oh.make_node("Add", ["xW1", "b1"], ["z1"], name="layer1/add"),
        oh.make_node("Tanh", ["z1"], ["h"], name="layer1/tanh"),
        oh.make_node("MatMul", ["h", "W2"], ["hW2"], name="layer2/matmul"),
        oh.make_node("Add", ["hW2", "b2"], ["pred"], name="layer2/add"),
        oh.make_node("Sub", ["pred", "target"], ["err"], name="loss/sub"),
        oh.make_node("Mul", ["err", "err"], ["sq"], name="loss/square"),
        oh.make_node("ReduceMean", ["sq"], ["loss"], name="loss/mean", keepdims=0),
    ]
    graph = oh.make_graph(
        nodes,
        "mlp",
        inputs=[
            oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            oh.make_tensor_value_info("target", TensorProto.FLOAT, ["batch", 3]),
        ],
        outputs=[
            oh.make_tensor_value_info("loss", TensorProto.FLOAT, []),
            oh.make_tensor_value_info("pred", TensorProto.FLOAT, ["batch", 3]),
        ],
        initializer=inits,
        doc_string="Two-layer tanh MLP with a mean-squared-error loss (onnxgrad's demo model).",
    )
    model = oh.make_model(
        graph, opset_imports=[oh.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name="onnxgrad/models/build_models.py", producer_version="1",
    )
    # record the inferred types of intermediate values, so tools that read the file (onnx_ir.load) see them
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


MODELS = {"mlp.onnx": mlp}


def main(argv: list[str] | None = None) -> None:
    """Write every sample model into the output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out-dir", type=Path, default=HERE, help="folder to write into (default: models/)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, build in MODELS.items():
        path = args.out_dir / name
        path.write_bytes(build().SerializeToString())
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
