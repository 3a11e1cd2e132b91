"""Raw exports of architectures the main table does not cover, as users export them: gradient graph against the
forward and against PyTorch eager, in one run.

    .venv/bin/python bench/zoo.py                                # every model below, 15 s of rounds each
    .venv/bin/python bench/zoo.py --model convnext_tiny bert --budget 30
    .venv/bin/python bench/zoo.py --exporter dynamo             # PyTorch's default exporter instead

Each model is exported with PyTorch's TorchScript exporter at opset 17 (``dynamo=False``, constant folding on, as
``torch.onnx.export`` does by default) and differentiated with respect to its input and every weight, ones as the
seed; onnxruntime CPU and PyTorch eager run with 2 threads in interleaved rounds (``bench/run.py``'s sessions).
torchvision's models have random weights (the ViT's classification head, which torchvision starts at zero, is
drawn too). Models: a BERT-style encoder (``nn.TransformerEncoder``, GELU, pre-norm),
a small ViT, MobileNetV2/V3, EfficientNet-B0 and ConvNeXt-T (depthwise convolutions, exported GELU); on request
(``--model hf_bert hf_gpt2 hf_llama``, with the ``transformers`` package installed) Hugging Face's BERT, GPT-2
and Llama at the same size (4 layers, width 256, 8 x 128 tokens fed as ``inputs_embeds``; Llama: RMSNorm, rotary
positions, SiLU gating, two key/value heads).
``--exporter dynamo``: exported instead by PyTorch's default exporter (torch.export, then onnxscript's optimizer, at
its own default opset; eval BatchNorm folded into the convs), as ``torch.onnx.export(module, (x,))`` writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers sleep (see bench/run.py)

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnxgrad
from bench.run import ROUND, ort_session

THREADS = 2


def _torchvision() -> Any:
    """torchvision.models; where the wheel's compiled operators do not load, without their fake kernels."""
    try:
        import torchvision
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
    return torchvision.models


def _bert() -> tuple[Any, Any]:
    import torch

    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, activation="gelu", batch_first=True,
                                             norm_first=True)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(8, 128, 256)


def _vit() -> tuple[Any, Any]:
    import torch

    vit = _torchvision().vision_transformer.VisionTransformer(64, 8, 4, 4, 192, 768, num_classes=10)
    torch.nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision starts it at zero: every gradient 0
    return vit, torch.randn(4, 3, 64, 64)


def _vision(name: str) -> Callable[[], tuple[Any, Any]]:
    def make() -> tuple[Any, Any]:
        import torch

        return getattr(_torchvision(), name)(num_classes=100), torch.randn(4, 3, 128, 128)

    return make


def _last_hidden(model: Any) -> Any:
    """A transformers model as a torch module of one tensor: ``inputs_embeds`` in, ``last_hidden_state`` out."""
    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(inputs_embeds=x).last_hidden_state

    return LastHidden()


def _hf(model_class: str, config_class: str, **config: Any) -> Callable[[], tuple[Any, Any]]:
    """A Hugging Face model of BERT's benchmark size (random weights; transformers is not a dependency)."""
    def make() -> tuple[Any, Any]:
        import torch

        _torchvision()  # transformers' image utilities import torchvision
        import transformers

        from bench.models import _randomize

        cfg = getattr(transformers, config_class)(**config)
        cfg._attn_implementation = "eager"  # as TorchScript can export every attention (grouped-query SDPA: not)
        module = _last_hidden(getattr(transformers, model_class)(cfg))
        _randomize(module, 7)  # a fresh model's unit LayerNorm scales make the final norm's sum constant
        return module, torch.randn(8, 128, 256)

    return make


MODELS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "bert": _bert, "vit": _vit, "mobilenet_v2": _vision("mobilenet_v2"),
    "mobilenet_v3_small": _vision("mobilenet_v3_small"), "efficientnet_b0": _vision("efficientnet_b0"),
    "convnext_tiny": _vision("convnext_tiny"),
    # Hugging Face's own exports (``--model hf_bert hf_gpt2 hf_llama``; not in the default list)
    "hf_bert": _hf("BertModel", "BertConfig", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=1024),
    "hf_gpt2": _hf("GPT2Model", "GPT2Config", n_embd=256, n_layer=4, n_head=4),
    "hf_llama": _hf("LlamaModel", "LlamaConfig", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=704),
}
DEFAULT = [name for name in MODELS if not name.startswith("hf_")]


def export(module: Any, x: Any, exporter: str) -> onnx.ModelProto:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            return torch.onnx.export(module, (x,), input_names=["x"], output_names=["y"], verbose=False).model_proto
        torch.onnx.export(module, (x,), buf, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    return onnx.load_from_string(buf.getvalue())


def measure(name: str, budget_s: float, exporter: str = "torchscript") -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    module, x = MODELS[name]()
    module.eval()
    model = export(module, x, exporter)
    t0 = time.perf_counter()
    aug = onnxgrad.add_gradients(model, ["y"], ["x", "@weights"])
    build_s = time.perf_counter() - t0
    fwd, fb = ort_session(model, THREADS), ort_session(aug.model, THREADS)
    feeds = {"x": x.numpy()}
    names = [o.name for o in aug.model.graph.output]
    xt = x.clone().requires_grad_(True)

    def torch_step() -> Any:
        xt.grad = None
        for p in module.parameters():
            p.grad = None
        y = module(xt)
        y.backward(torch.ones_like(y))
        return xt.grad

    dx = torch_step().numpy()
    mine = dict(zip(names, fb.run(names, feeds), strict=True))[aug.gradients["x"]]  # type: ignore[index]
    err = float(np.abs(mine - dx).max() / (np.abs(dx).max() + 1e-30))
    runs = {"fwd": lambda: fwd.run(None, feeds), "fwd+bwd": lambda: fb.run(names, feeds), "torch": torch_step}
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    start = time.perf_counter()
    while time.perf_counter() - start < budget_s or len(times["fwd"]) < 3 * ROUND:
        for key, run in runs.items():
            for _ in range(ROUND):
                t0 = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"model": name, "nodes": f"{len(model.graph.node)} → {len(aug.model.graph.node)}", "build s": build_s,
            "fwd ms": ms["fwd"], "fwd+bwd ms": ms["fwd+bwd"], "ratio": ms["fwd+bwd"] / ms["fwd"],
            "torch ms": ms["torch"], "vs torch": ms["fwd+bwd"] / ms["torch"], "dx err": err,
            "rounds": len(times["fwd"]) // ROUND}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=DEFAULT, choices=list(MODELS))
    parser.add_argument("--budget", type=float, default=15.0, help="seconds of timed rounds per model")
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    args = parser.parse_args()
    print("| model | nodes | build s | ORT fwd ms | ORT fwd+bwd ms | fwd+bwd / fwd | PyTorch fwd+bwd ms "
          "| ours / PyTorch | dx rel. err | rounds |\n|---|---|---|---|---|---|---|---|---|---|")
    for name in args.model:
        r = measure(name, args.budget, args.exporter)
        print(f"| {r['model']} | {r['nodes']} | {r['build s']:.2f} | {r['fwd ms']:.1f} | {r['fwd+bwd ms']:.1f} | "
              f"**{r['ratio']:.2f}** | {r['torch ms']:.1f} | **{r['vs torch']:.2f}** | {r['dx err']:.1e} | "
              f"{r['rounds']} |", flush=True)


if __name__ == "__main__":
    main()
