"""mdx.runtime: sample mdx ONNX models with ONNX Runtime and numpy (no torch).

    from mdx.runtime import Pipeline
    pipe = Pipeline.load("emoji16")                  # a shipped model's name or a path
    out = pipe(classes=["food"], n=4, seed=0)        # the model's recommended settings
    out.save("food.png")

The names below are imported on first use (PEP 562), so that the training code's
`import mdx.runtime.schedules`, or `import mdx.runtime` alone, loads neither onnxruntime nor
the sampling stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports them
    from mdx.runtime.api import ERRORS, Output, Pipeline, Request, SamplingSettings, Timings
    from mdx.runtime.contract import ModelError
    from mdx.runtime.images import OutputError
    from mdx.runtime.pipeline import PipelineError
    from mdx.runtime.samplers import SamplerError
    from mdx.runtime.shipped import shipped_models

_LAZY = {
    "Pipeline": "mdx.runtime.api", "Output": "mdx.runtime.api", "SamplingSettings": "mdx.runtime.api",
    "Timings": "mdx.runtime.api", "ERRORS": "mdx.runtime.api", "Request": "mdx.runtime.api",
    "ModelError": "mdx.runtime.contract", "PipelineError": "mdx.runtime.pipeline",
    "SamplerError": "mdx.runtime.samplers", "OutputError": "mdx.runtime.images",
    "shipped_models": "mdx.runtime.shipped",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mdx.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
