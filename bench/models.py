"""The benchmark models, each as (ONNX model, the same network in PyTorch or None, input array, xs).

The first three are PyTorch modules exported with the TorchScript exporter (``dynamo=False``) after every
parameter and buffer was given seeded random values, so the ONNX model and the module hold the same weights.
ResNet-50 is the architecture of onnx's ``light_resnet50.onnx`` (opset 9, weights stripped to
ConstantOfShape nodes) with those nodes replaced by seeded random initializers.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

MODELS = ("mlp", "cnn", "transformer", "resnet50")


@dataclass
class Bench:
    """One benchmark: the ONNX model, its input, the values to differentiate, and the PyTorch twin."""

    name: str
    model: onnx.ModelProto
    input_name: str
    x: np.ndarray
    xs: list[str]  # the input, then every weight
    torch_module: Any | None  # a torch.nn.Module in eval mode holding the same weights, or None
    grad_y: np.ndarray | None = None  # the seed (None: ones, as PyTorch's backward(ones_like(y)))


def _randomize(module: Any, seed: int) -> None:
    """Seeded random weights, BatchNorm statistics and affine parameters (no two initializers alike)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*module.named_parameters(), *module.named_buffers()]:
            if not p.is_floating_point():
                continue
            if name.endswith("running_var"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith("running_mean"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 and name.endswith("weight"):  # BatchNorm / LayerNorm scale
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)


def _export(module: Any, x: Any) -> onnx.ModelProto:
    import torch

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), f, dynamo=False, input_names=["x"], output_names=["y"],
            training=torch.onnx.TrainingMode.PRESERVE,
        )
    return onnx.load_from_string(f.getvalue())


def _weights(model: onnx.ModelProto, module: Any) -> list[str]:
    """The values of the ONNX graph holding the module's parameters: initializers (or their Identity aliases)
    named like a parameter, or else holding a parameter's values (the exporter stores some transposed)."""
    names = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    params = [(name, p.detach().numpy()) for name, p in module.named_parameters()]
    if all(name in names for name, _ in params):
        return [name for name, _ in params]
    found = []
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(init)
        for _, p in params:
            if any(v.shape == value.shape and np.array_equal(v, value) for v in (p, p.T)):
                found.append(init.name)
                break
    return found


def _torch_bench(name: str) -> Bench:
    """The raw export of a PyTorch benchmark module, as a user differentiates it (no pre-simplification)."""
    module, x = torch_twin(name)
    model = _export(module, x)
    return Bench(name, model, "x", x.numpy(), ["x", *_weights(model, module)], module)


def torch_twin(name: str) -> tuple[Any, Any]:
    """The PyTorch module (seeded random weights, eval mode) and input of a benchmark."""
    import torch

    if name == "resnet50":
        bench = resnet50()
        return bench.torch_module, torch.from_numpy(bench.x)
    make, shape, seed = _TORCH[name]
    module = make()
    _randomize(module, seed)
    module.eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return module, x


def _mlp_module() -> Any:
    """MLP 784-1024-1024-10, ReLU."""
    import torch.nn as nn

    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def _cnn_module() -> Any:
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        """relu(x + bn(conv(relu(bn(conv(x))))))"""

        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    def stem(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *stem(3, 32), Block(32), Block(32), nn.MaxPool2d(2),
        *stem(32, 64), Block(64), Block(64), nn.MaxPool2d(2),
        *stem(64, 128), Block(128), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 10),
    )


def _transformer_module() -> Any:
    """nn.TransformerEncoder: 4 layers, d=256, 4 heads, feed-forward 1024 (dropout 0)."""
    import torch.nn as nn

    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)


# name: (module factory, input shape, seed); the CNN's BatchNorm runs in inference form (eval mode)
_TORCH = {
    "mlp": (_mlp_module, (64, 784), 1),
    "cnn": (_cnn_module, (16, 3, 32, 32), 2),
    "transformer": (_transformer_module, (8, 128, 256), 3),
}


LIGHT_RESNET50 = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light",
                              "light_resnet50.onnx")


def resnet50(batch: int = 1) -> Bench:
    """onnx's light_resnet50.onnx (opset 9) with seeded random weights in place of its ConstantOfShape nodes."""
    model = onnx.load(LIGHT_RESNET50)
    graph = model.graph
    rng = np.random.default_rng(4)
    shapes = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    keep, weights = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            keep.append(node)
            continue
        name, dims = node.output[0], tuple(int(d) for d in shapes[node.input[0]])
        if name.endswith("_riv_0"):  # running variance
            value = 0.5 + rng.random(dims)
        elif name.endswith("_rm_0") or name.endswith("_b_0"):
            value = 0.1 * rng.standard_normal(dims)
        elif name.endswith("_s_0"):
            value = 1.0 + 0.1 * rng.standard_normal(dims)
        else:  # conv / fc weights, He-scaled
            value = rng.standard_normal(dims) * (2.0 / max(1, int(np.prod(dims[1:])))) ** 0.5
        weights.append(numpy_helper.from_array(value.astype(np.float32), name))
    used = {i for n in keep for i in n.input}
    inits = [i for i in graph.initializer if i.name in used] + weights
    data = graph.input[0]
    data.type.tensor_type.shape.dim[0].dim_value = batch
    out = onnx.helper.make_graph(keep, graph.name, [data], list(graph.output), inits)
    model = onnx.helper.make_model(out, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    x = np.random.default_rng(5).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    _calibrate_batchnorm(model, x)
    trainable = [w.name for w in weights if not w.name.endswith(("_rm_0", "_riv_0"))]
    # the output is a softmax, whose sum is 1: with a ones seed every gradient would be 0
    seed = np.random.default_rng(6).standard_normal((batch, 1000)).astype(np.float32)
    return Bench("resnet50", model, data.name, x, [data.name, *trainable], onnx_twin(model, trainable), seed)


def onnx_twin(model: onnx.ModelProto, trainable: list[str]) -> Any:
    """A PyTorch eager module that runs ``model``'s graph op by op (the ops of light_resnet50: Conv,
    BatchNormalization in inference form, Relu, Sum, MaxPool, AveragePool, Reshape, Gemm, Softmax), its
    ``trainable`` initializers as parameters and the others as buffers: the PyTorch side of a benchmark whose
    model has no PyTorch source."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def attrs(node: onnx.NodeProto) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def same_pads(a: dict[str, Any]) -> list[int]:
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:] or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise NotImplementedError(f"asymmetric or automatic pads {pads}")
        return pads[:2]

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.keys: dict[str, str] = {}
            for i, init in enumerate(model.graph.initializer):
                value = torch.from_numpy(numpy_helper.to_array(init).copy())
                key = self.keys[init.name] = f"w{i}"
                if init.name in trainable:
                    self.register_parameter(key, nn.Parameter(value))
                else:
                    self.register_buffer(key, value)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            env: dict[str, Any] = {model.graph.input[0].name: x}
            for name, key in self.keys.items():
                env[name] = getattr(self, key)
            for node in model.graph.node:
                a, ins, op = attrs(node), [env[i] if i else None for i in node.input], node.op_type
                if op == "Conv":
                    y = F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a.get("strides", 1),
                                 same_pads(a), a.get("dilations", 1), a.get("group", 1))
                elif op == "BatchNormalization":
                    y = F.batch_norm(ins[0], ins[3], ins[4], ins[1], ins[2], False, 0.0, a.get("epsilon", 1e-5))
                elif op == "Relu":
                    y = torch.relu(ins[0])
                elif op == "Sum":
                    y = ins[0]
                    for term in ins[1:]:
                        y = y + term
                elif op == "MaxPool":
                    y = F.max_pool2d(ins[0], a["kernel_shape"], a.get("strides", 1), same_pads(a),
                                     ceil_mode=bool(a.get("ceil_mode", 0)))
                elif op == "AveragePool":
                    y = F.avg_pool2d(ins[0], a["kernel_shape"], a.get("strides", 1), same_pads(a),
                                     ceil_mode=bool(a.get("ceil_mode", 0)),
                                     count_include_pad=bool(a.get("count_include_pad", 0)))
                elif op == "Reshape":
                    shape = [int(d) for d in ins[1]]
                    y = ins[0].reshape([ins[0].shape[i] if d == 0 else d for i, d in enumerate(shape)])
                elif op == "Gemm":
                    left = ins[0].t() if a.get("transA", 0) else ins[0]
                    right = ins[1].t() if a.get("transB", 0) else ins[1]
                    y = a.get("alpha", 1.0) * (left @ right) + a.get("beta", 1.0) * ins[2]
                elif op == "Softmax":
                    y = torch.softmax(ins[0], a.get("axis", 1))
                else:
                    raise NotImplementedError(f"onnx_twin: {op}")
                env[node.output[0]] = y
            return env[model.graph.output[0].name]

    return Twin().eval()


def _calibrate_batchnorm(model: onnx.ModelProto, x: np.ndarray) -> None:
    """Set every BatchNormalization's running mean and variance to the statistics of its input for ``x``
    (what training would have left), so that activations neither explode nor vanish with random weights.

    One onnxruntime pass over a copy in which each BatchNormalization normalizes with batch statistics."""
    import onnxruntime as ort
    from onnx import helper as oh

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, outputs = [], []
    flat = numpy_helper.from_array(np.array([-1], np.int64), "calib/flat")
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            nodes.append(node)
            continue
        x_in, scale, bias, mean, var = node.input[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = f"calib/{node.output[0]}/"
        nodes += [
            oh.make_node("ReduceMean", [x_in], [p + "mean4"], axes=[0, 2, 3], keepdims=1),
            oh.make_node("Sub", [x_in, p + "mean4"], [p + "d"]),
            oh.make_node("Mul", [p + "d", p + "d"], [p + "d2"]),
            oh.make_node("ReduceMean", [p + "d2"], [p + "var4"], axes=[0, 2, 3], keepdims=1),
            oh.make_node("Reshape", [p + "mean4", flat.name], [p + "mean"]),
            oh.make_node("Reshape", [p + "var4", flat.name], [p + "var"]),
            oh.make_node("BatchNormalization", [x_in, scale, bias, p + "mean", p + "var"], [node.output[0]],
                         epsilon=eps),
        ]
        outputs.append((mean, var, p + "mean", p + "var"))
    used = {i for n in nodes for i in n.input}
    final = nodes
    calib = oh.make_graph(final, "calib", list(graph.input),
                          [oh.make_empty_tensor_value_info(o) for pair in outputs for o in pair[2:]],
                          [i for i in graph.initializer if i.name in used] + [flat])
    calib_model = oh.make_model(calib, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sess = ort.InferenceSession(calib_model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {graph.input[0].name: x}), strict=True))
    for mean, var, m_out, v_out in outputs:
        inits[mean].CopyFrom(numpy_helper.from_array(values[m_out].astype(np.float32), mean))
        inits[var].CopyFrom(numpy_helper.from_array(values[v_out].astype(np.float32), var))


def build(name: str) -> Bench:
    if name == "resnet50":
        return resnet50()
    return _torch_bench(name)


def resnet18(width: int = 64, classes: int = 1000) -> Any:
    """torchvision's ResNet-18 layout (7x7 stem, max-pool, four stages of two basic blocks, average pool, linear),
    written out here: torchvision is not installed."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.pool = nn.MaxPool2d(3, 2, 1)
            blocks, cin = [], width
            for stage in range(4):
                cout = width * 2**stage
                blocks += [Block(cin, cout, 1 if stage == 0 else 2), Block(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layers(self.pool(torch.relu(self.bn1(self.conv1(x)))))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    return ResNet18()
