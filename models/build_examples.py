"""Build the example models with onnx.helper, deterministically (same script, same bytes).

    python models/build_examples.py            # writes the examples into models/
    python models/build_examples.py -o DIR     # ... into DIR

All at opset 17, IR version 8, float32 weights drawn from fixed seeds, a symbolic batch (or atom) axis:

mlp_classifier.onnx   x[batch,8] -> Gemm -> Relu -> Gemm = logits[batch,4];
                      loss = SoftmaxCrossEntropyLoss(logits, labels[batch] int64, mean)
cnn.onnx              image[batch,1,8,8] -> Conv -> BatchNormalization (inference) -> Relu -> MaxPool ->
                      Conv -> Relu -> AveragePool -> Reshape -> Gemm = logits[batch,3]; loss as above
transformer_block.onnx  x[batch,seq,8] -> pre-norm encoder block: LayerNormalization, 2-head self-attention
                      (MatMul, Reshape, Transpose, Softmax), residual, LayerNormalization, GELU MLP (Erf),
                      residual = y; loss = ReduceMean(y * y)
lj_energy.onnx        positions[atoms,3] -> Lennard-Jones energy 4 eps sum_{i<j} ((s/r)^12 - (s/r)^6);
                      its gradient with respect to positions is minus the forces
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

OPSET = 17
IR_VERSION = 8
SEED = 20240601
HERE = Path(__file__).resolve().parent
F = TensorProto.FLOAT


def _weights(seed: int, shapes: dict[str, tuple[int, ...]], scale: dict[str, float] | None = None
             ) -> list[onnx.TensorProto]:
    """float32 initializers drawn from one seed, in the order given (fan-in scaled normal by default)."""
    rng = np.random.default_rng(seed)
    out = []
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = (scale or {}).get(name, 1.0 / np.sqrt(max(fan_in, 1)) if len(shape) > 1 else 0.1)
        out.append(numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name))
    return out


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _const(name: str, value: float) -> onnx.NodeProto:
    """A float32 scalar as a Constant node (a fixed number, not a weight: ``@weights`` leaves it out)."""
    return oh.make_node("Constant", [], [name], name=f"const/{name}",
                        value=numpy_helper.from_array(np.asarray(value, dtype=np.float32)))


def _finish(graph: onnx.GraphProto, name: str) -> onnx.ModelProto:
    model = oh.make_model(
        graph, opset_imports=[oh.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name="onnxgrad/models/build_examples.py", producer_version="1",
    )
    model.graph.name = name
    # record the inferred types of intermediate values, so tools that read the file see them
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_classifier() -> onnx.ModelProto:
    """A two-layer ReLU classifier with its cross-entropy loss."""
    inits = _weights(SEED + 1, {"fc1.weight": (16, 8), "fc1.bias": (16,), "fc2.weight": (4, 16), "fc2.bias": (4,)})
    nodes = [
        oh.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
        oh.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        oh.make_node("Gemm", ["a1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
        oh.make_node("SoftmaxCrossEntropyLoss", ["logits", "labels"], ["loss"], name="loss", reduction="mean"),
    ]
    graph = oh.make_graph(
        nodes, "mlp_classifier",
        inputs=[oh.make_tensor_value_info("x", F, ["batch", 8]),
                oh.make_tensor_value_info("labels", TensorProto.INT64, ["batch"])],
        outputs=[oh.make_tensor_value_info("loss", F, []),
                 oh.make_tensor_value_info("logits", F, ["batch", 4])],
        initializer=inits,
        doc_string="MLP classifier (8 features, 4 classes) with a mean cross-entropy loss.",
    )
    return _finish(graph, "mlp_classifier")


def cnn() -> onnx.ModelProto:
    """A small image classifier: two convolutions, batch norm, max and average pooling, a linear head."""
    inits = _weights(SEED + 2, {"conv1.weight": (4, 1, 3, 3), "conv1.bias": (4,), "conv2.weight": (8, 4, 3, 3),
                                "conv2.bias": (8,), "fc.weight": (3, 32), "fc.bias": (3,)})
    rng = np.random.default_rng(SEED + 3)
    bn = {
        "bn1.weight": 1.0 + 0.1 * rng.standard_normal(4),
        "bn1.bias": 0.1 * rng.standard_normal(4),
        "bn1.running_mean": 0.1 * rng.standard_normal(4),
        "bn1.running_var": 1.0 + 0.2 * rng.random(4),
    }
    inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in bn.items()]
    inits.append(_ints("flat_shape", [0, -1]))
    nodes = [
        oh.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["c1"], name="conv1",
                     kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        oh.make_node("BatchNormalization", ["c1", *bn], ["n1"], name="bn1", epsilon=1e-5),
        oh.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        oh.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2",
                     kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        oh.make_node("AveragePool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("Reshape", ["p2", "flat_shape"], ["flat"], name="flatten"),
        oh.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
        oh.make_node("SoftmaxCrossEntropyLoss", ["logits", "labels"], ["loss"], name="loss", reduction="mean"),
    ]
    graph = oh.make_graph(
        nodes, "cnn",
        inputs=[oh.make_tensor_value_info("image", F, ["batch", 1, 8, 8]),
                oh.make_tensor_value_info("labels", TensorProto.INT64, ["batch"])],
        outputs=[oh.make_tensor_value_info("loss", F, []),
                 oh.make_tensor_value_info("logits", F, ["batch", 3])],
        initializer=inits,
        doc_string="Small CNN (8x8 single-channel images, 3 classes), batch norm in inference mode.",
    )
    return _finish(graph, "cnn")


def transformer_block() -> onnx.ModelProto:
    """A pre-norm transformer encoder block (d_model 8, 2 heads, MLP width 16) and a toy loss."""
    d, heads, ff = 8, 2, 16
    head = d // heads
    inits = _weights(SEED + 4, {
        "attn.q.weight": (d, d), "attn.k.weight": (d, d), "attn.v.weight": (d, d), "attn.out.weight": (d, d),
        "mlp.fc1.weight": (d, ff), "mlp.fc2.weight": (ff, d),
        "attn.q.bias": (d,), "attn.k.bias": (d,), "attn.v.bias": (d,), "attn.out.bias": (d,),
        "mlp.fc1.bias": (ff,), "mlp.fc2.bias": (d,),
    })
    rng = np.random.default_rng(SEED + 5)
    for name in ("ln1", "ln2"):
        inits.append(numpy_helper.from_array((1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32),
                                             f"{name}.weight"))
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), f"{name}.bias"))
    inits += [
        _ints("heads_shape", [0, 0, heads, head]), _ints("model_shape", [0, 0, d]),
    ]
    nodes = [
        _const("attn.scale", 1.0 / np.sqrt(head)), _const("half", 0.5), _const("one", 1.0),
        _const("inv_sqrt2", 1.0 / np.sqrt(2.0)),
    ]
    nodes += [oh.make_node("LayerNormalization", ["x", "ln1.weight", "ln1.bias"], ["ln1"], name="ln1", axis=-1,
                          epsilon=1e-5)]
    for p in ("q", "k", "v"):
        nodes += [
            oh.make_node("MatMul", ["ln1", f"attn.{p}.weight"], [f"{p}_mm"], name=f"attn/{p}/matmul"),
            oh.make_node("Add", [f"{p}_mm", f"attn.{p}.bias"], [f"{p}_lin"], name=f"attn/{p}/add"),
            oh.make_node("Reshape", [f"{p}_lin", "heads_shape"], [f"{p}_heads"], name=f"attn/{p}/split_heads"),
            oh.make_node("Transpose", [f"{p}_heads"], [f"{p}_t"], name=f"attn/{p}/transpose",
                         perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3]),
        ]
    nodes += [
        oh.make_node("MatMul", ["q_t", "k_t"], ["scores_raw"], name="attn/scores"),
        oh.make_node("Mul", ["scores_raw", "attn.scale"], ["scores"], name="attn/scale"),
        oh.make_node("Softmax", ["scores"], ["probs"], name="attn/softmax", axis=-1),
        oh.make_node("MatMul", ["probs", "v_t"], ["ctx_heads"], name="attn/context"),
        oh.make_node("Transpose", ["ctx_heads"], ["ctx_t"], name="attn/merge_transpose", perm=[0, 2, 1, 3]),
        oh.make_node("Reshape", ["ctx_t", "model_shape"], ["ctx"], name="attn/merge_heads"),
        oh.make_node("MatMul", ["ctx", "attn.out.weight"], ["attn_mm"], name="attn/out/matmul"),
        oh.make_node("Add", ["attn_mm", "attn.out.bias"], ["attn_out"], name="attn/out/add"),
        oh.make_node("Add", ["x", "attn_out"], ["h"], name="residual1"),
        oh.make_node("LayerNormalization", ["h", "ln2.weight", "ln2.bias"], ["ln2"], name="ln2", axis=-1,
                     epsilon=1e-5),
        oh.make_node("MatMul", ["ln2", "mlp.fc1.weight"], ["fc1_mm"], name="mlp/fc1/matmul"),
        oh.make_node("Add", ["fc1_mm", "mlp.fc1.bias"], ["u"], name="mlp/fc1/add"),
        # GELU, erf form: 0.5 u (1 + erf(u / sqrt 2))
        oh.make_node("Mul", ["u", "inv_sqrt2"], ["u_s"], name="mlp/gelu/scale"),
        oh.make_node("Erf", ["u_s"], ["erf"], name="mlp/gelu/erf"),
        oh.make_node("Add", ["erf", "one"], ["erf1"], name="mlp/gelu/add"),
        oh.make_node("Mul", ["u", "erf1"], ["gelu_2"], name="mlp/gelu/mul"),
        oh.make_node("Mul", ["gelu_2", "half"], ["gelu"], name="mlp/gelu/half"),
        oh.make_node("MatMul", ["gelu", "mlp.fc2.weight"], ["fc2_mm"], name="mlp/fc2/matmul"),
        oh.make_node("Add", ["fc2_mm", "mlp.fc2.bias"], ["mlp_out"], name="mlp/fc2/add"),
        oh.make_node("Add", ["h", "mlp_out"], ["y"], name="residual2"),
        oh.make_node("Mul", ["y", "y"], ["y2"], name="loss/square"),
        oh.make_node("ReduceMean", ["y2"], ["loss"], name="loss/mean", keepdims=0),
    ]
    graph = oh.make_graph(
        nodes, "transformer_block",
        inputs=[oh.make_tensor_value_info("x", F, ["batch", "seq", d])],
        outputs=[oh.make_tensor_value_info("y", F, ["batch", "seq", d]), oh.make_tensor_value_info("loss", F, [])],
        initializer=inits,
        doc_string="Pre-norm transformer encoder block: 2-head self-attention and a GELU MLP, with residuals.",
    )
    return _finish(graph, "transformer_block")


def lj_energy() -> onnx.ModelProto:
    """Lennard-Jones energy of a cluster of atoms; sigma and epsilon are (fittable) weights."""
    inits = [
        _scalar("sigma", 0.8), _scalar("epsilon", 1.0),
        _ints("col_shape", [-1, 1, 3]), _ints("row_shape", [1, -1, 3]), _ints("last_axis", [-1]),
    ]
    nodes = [
        _const("four", 4.0), _const("half", 0.5), _const("one", 1.0),
        # pairwise displacement r_i - r_j and squared distance
        oh.make_node("Reshape", ["positions", "col_shape"], ["pos_i"], name="pairs/col"),
        oh.make_node("Reshape", ["positions", "row_shape"], ["pos_j"], name="pairs/row"),
        oh.make_node("Sub", ["pos_i", "pos_j"], ["disp"], name="pairs/displacement"),
        oh.make_node("Mul", ["disp", "disp"], ["disp2"], name="pairs/square"),
        oh.make_node("ReduceSum", ["disp2", "last_axis"], ["r2"], name="pairs/r2", keepdims=0),
        # an identity matrix of the run-time atom count (integer path: constant w.r.t. the positions)
        oh.make_node("Shape", ["positions"], ["n_atoms"], name="mask/n", start=0, end=1),
        oh.make_node("Concat", ["n_atoms", "n_atoms"], ["nn"], name="mask/nn", axis=0),
        oh.make_node("ConstantOfShape", ["nn"], ["zeros"], name="mask/zeros",
                     value=numpy_helper.from_array(np.zeros(1, dtype=np.float32))),
        oh.make_node("EyeLike", ["zeros"], ["eye"], name="mask/eye"),
        oh.make_node("Sub", ["one", "eye"], ["off_diag"], name="mask/off_diagonal"),
        oh.make_node("Add", ["r2", "eye"], ["r2_safe"], name="pairs/r2_safe"),  # no division by zero on i == j
        # (s/r)^6 and (s/r)^12
        oh.make_node("Mul", ["sigma", "sigma"], ["sigma2"], name="lj/sigma2"),
        oh.make_node("Div", ["sigma2", "r2_safe"], ["s2"], name="lj/s2"),
        oh.make_node("Mul", ["s2", "s2"], ["s4"], name="lj/s4"),
        oh.make_node("Mul", ["s4", "s2"], ["s6"], name="lj/s6"),
        oh.make_node("Mul", ["s6", "s6"], ["s12"], name="lj/s12"),
        oh.make_node("Sub", ["s12", "s6"], ["lj"], name="lj/diff"),
        oh.make_node("Mul", ["four", "epsilon"], ["four_eps"], name="lj/four_eps"),
        oh.make_node("Mul", ["lj", "four_eps"], ["pair_energy_full"], name="lj/scale"),
        oh.make_node("Mul", ["pair_energy_full", "off_diag"], ["pair_energy"], name="lj/mask"),
        oh.make_node("ReduceSum", ["pair_energy"], ["total"], name="energy/sum", keepdims=0),
        oh.make_node("Mul", ["total", "half"], ["energy"], name="energy/half"),  # each pair counted twice
    ]
    graph = oh.make_graph(
        nodes, "lj_energy",
        inputs=[oh.make_tensor_value_info("positions", F, ["atoms", 3])],
        outputs=[oh.make_tensor_value_info("energy", F, [])],
        initializer=inits,
        doc_string="Lennard-Jones cluster energy; forces = -d energy / d positions.",
    )
    return _finish(graph, "lj_energy")


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp_classifier.onnx": mlp_classifier,
    "cnn.onnx": cnn,
    "transformer_block.onnx": transformer_block,
    "lj_energy.onnx": lj_energy,
}


def main(argv: list[str] | None = None) -> None:
    """Write every example model into the output folder."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-o", "--out-dir", type=Path, default=HERE, help="folder to write into (default: models/)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, build in MODELS.items():
        path = args.out_dir / name
        path.write_bytes(build().SerializeToString())
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
