"""Component settings, declared once: each hf_* component's options are the fields of one dataclass (type,
default, help, valid range), from which its spaCy factory (signature and `default_config`), its checks and
the documentation derive. A shipped config states only what it changes.

A field's default is what `default_config` holds: a value, or a registry reference such as
`{"@sllm_strategies": "sllm.first_piece.v1"}` that spaCy resolves before the component sees it.
"""

import inspect
import typing
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Type

from spacy.language import Language

from ..core.settings import check_settings, defaults, setting
from ..models.checkpoint import DEFAULT_MODEL
from ..models.devices import DTYPES
from ..models.runtimes import QUANTIZATIONS, RUNTIMES


@dataclass
class SharedSettings:
    """What every hf_* component has: its checkpoint, batching, device, precision and scorer."""

    model: Optional[str] = setting(None, "the checkpoint: a local Hugging Face folder or hub name (a base encoder "
                                         "gets a new head; a fine-tuned checkpoint brings its own); null: the shared "
                                         f"encoder's, or else {DEFAULT_MODEL}")
    encoder: Optional[str] = setting(None, "the hf_encoder component (earlier in the pipeline) this head reads, so "
                                           "several heads share one encoder pass; null: the component's own encoder")
    batch_size: int = setting(64, "sequences per forward pass (length-sorted batches)", ge=1)
    max_length: Optional[int] = setting(None, "cap on the model input in word pieces; null: the model's own limit "
                                              "(longer docs are windowed)", ge=8)
    device: str = setting("auto", "auto, cpu or cuda:N")
    dtype: str = setting("float32", "weights' precision", choices=tuple(DTYPES))
    quantize: Optional[str] = setting(None, "int8: dynamically quantized Linear layers on the CPU (float32 weights "
                                            "stay on disk)", choices=QUANTIZATIONS)
    runtime: str = setting("torch", "what runs inference: torch, or onnxruntime (an ONNX export made at load; the "
                                    "[onnx] extra)", choices=RUNTIMES)
    mixed_precision: bool = setting(False, "`spacy train`: autocast the forward pass (CUDA)")
    temperature: float = setting(1.0, "the head's logits are divided by this before they become scores (`sllm "
                                      "calibrate` fits it on dev data: temperature scaling)", gt=0)
    scorer: Optional[Callable] = setting(None, "the scorer `nlp.evaluate` uses (a registered function)")


def default_config(settings: Type[SharedSettings]) -> Dict[str, Any]:
    return defaults(settings)


def check_component_settings(component: str, settings: SharedSettings) -> None:
    """Refuse a value outside its range, naming the component and the setting."""
    check_settings(settings, name=lambda field: f"{component}: {field}")


def component_factory(name: str, settings: Type[SharedSettings], component: type, *, module: str,
                      **meta: Any) -> Callable:
    """Register the spaCy factory `name` of `component`: its signature and default config are the fields
    of `settings`; it builds `component(nlp, name, settings(**config))`. Returns the factory function,
    named `make_<name>` in `module` (so that it pickles, and entry points find it)."""
    hints = typing.get_type_hints(settings)

    def make(nlp: Language, name: str, **config: Any):
        return component(nlp, name, settings(**config))

    parameters = [inspect.Parameter("nlp", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Language),
                  inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)]
    parameters += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name])
                   for f in fields(settings)]
    make.__signature__ = inspect.Signature(parameters, return_annotation=component)
    make.__annotations__ = {"nlp": Language, "name": str, **{f.name: hints[f.name] for f in fields(settings)},
                            "return": component}
    make.__name__ = make.__qualname__ = f"make_{name}"
    make.__module__ = module
    make.__doc__ = f"The {name} component ({component.__name__}); settings: {settings.__name__}."
    return Language.factory(name, default_config=default_config(settings), **meta)(make)
