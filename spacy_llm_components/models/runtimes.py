"""What runs a component's inference: the checkpoint's PyTorch model, a PyTorch int8 copy of it, or an
ONNX Runtime session (float32 or int8) exported from it at load. The checkpoint keeps its float32
PyTorch weights in every case: they are what `to_disk`, `export_hf` and training use.

The components call the result like the Hugging Face model (keyword tensors in, an object with
`logits` or `start_logits` / `end_logits` out), so the rest of the inference path is the same for all.
"""

import copy
import importlib.util
import itertools
import logging
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence, Set

import torch

QUANTIZATIONS = ("int8",)
RUNTIMES = ("torch", "onnxruntime")
ONNX_OPSET = 17


def check_runtime(runtime: str, quantize: Optional[str], device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, when the component is created, what cannot run: int8 and ONNX Runtime are CPU paths from
    float32 weights (PyTorch's dynamic quantization has no CUDA kernels; the ONNX path here uses ONNX
    Runtime's CPU provider)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: use one of {RUNTIMES}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize {quantize!r}: use null or one of {QUANTIZATIONS}")
    what = " and ".join(x for x in (f"quantize {quantize!r}" if quantize else "",
                                    f"runtime {runtime!r}" if runtime != "torch" else "") if x)
    if not what:
        return
    if device.type != "cpu":
        raise ValueError(f"{what} runs on the CPU (PyTorch dynamic quantization and this project's ONNX Runtime "
                         f"path have no CUDA kernels); on {device} use dtype 'bfloat16' or 'float16' instead, "
                         "or device 'cpu'")
    if dtype != torch.float32:
        raise ValueError(f"{what} starts from float32 weights; use dtype 'float32' with it")
    if runtime == "onnxruntime":
        missing = [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"runtime 'onnxruntime' needs the optional package(s) {', '.join(missing)}: "
                             "pip install 'spacy-llm-components[onnx]'")


def inference_model(model: torch.nn.Module, *, quantize: Optional[str], runtime: str, input_names: Sequence[str],
                    output_names: Sequence[str]) -> Any:
    """The callable that inference runs (`check_runtime` has passed)."""
    if runtime == "onnxruntime":
        return OnnxModel.export(model, quantize=quantize, input_names=input_names, output_names=output_names)
    if quantize is None:
        return model
    with warnings.catch_warnings():  # torch 2.10+ points to torchao; torch.ao's dynamic quantization still works
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # The int8 model is a copy of the module tree that shares every float32 tensor with `model` (the
        # float32 model stays for to_disk): its Linear layers are then replaced by int8 ones, so the
        # embeddings and norms are not held twice. One scale per output channel: on CoNLL-2003 NER 0.35
        # F1 points lost where one scale per matrix lost 1.04, at the same speed; inputs are quantized on
        # the fly.
        shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        return quantize_dynamic(copy.deepcopy(model, memo=shared), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                inplace=True).eval()


class OnnxModel:
    """An ONNX Runtime session over the model's graph, called like the PyTorch model on CPU tensors."""

    training = False

    def __init__(self, session, input_names: Sequence[str], output_names: Sequence[str], operators: Set[str]) -> None:
        self.session = session
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.operators = operators  # the exported graph's operator types (int8: MatMulInteger and its kin)

    @classmethod
    def export(cls, model: torch.nn.Module, *, quantize: Optional[str], input_names: Sequence[str],
               output_names: Sequence[str]) -> "OnnxModel":
        """Export `model` with dynamic batch and sequence axes (TorchScript exporter), quantize its weights
        to int8 with ONNX Runtime's dynamic quantization if asked (one scale per channel), and open a
        session with every graph optimisation on as many threads as torch uses."""
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        example = {name: torch.ones(2, 8, dtype=torch.long) for name in input_names}
        axes = {name: {0: "batch", 1: "sequence"} for name in (*input_names, *output_names)}
        with tempfile.TemporaryDirectory(prefix="sllm-onnx-") as folder:
            path = Path(folder) / "model.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer notes about Python control flow in the HF model
                torch.onnx.export(model.eval(), (), str(path), kwargs=example, input_names=list(input_names),
                                  output_names=list(output_names), dynamic_axes=axes, opset_version=ONNX_OPSET,
                                  dynamo=False)
            if quantize == "int8":
                quantized = Path(folder) / "model-int8.onnx"
                logging.disable(logging.WARNING)  # its advice to pre-process (shape inference) is for static graphs
                try:
                    quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True)
                finally:
                    logging.disable(logging.NOTSET)
                path = quantized
            operators = {node.op_type for node in onnx.load(str(path)).graph.node}
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3  # errors only
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(session, input_names, output_names, operators)

    def eval(self) -> "OnnxModel":
        return self

    def __call__(self, **feed: torch.Tensor) -> SimpleNamespace:
        arrays = self.session.run(self.output_names, {name: feed[name].numpy() for name in self.input_names})
        return SimpleNamespace(**{name: torch.from_numpy(a) for name, a in zip(self.output_names, arrays)})

