"""ernie-cluster: a Ray serving cluster for ERNIE-4.5 mixture-of-experts models.

The public names load lazily (PEP 562): `import ernie_cluster` pulls in no torch, so the HTTP
ingress, which imports subpackages of this one, stays light. `from ernie_cluster import LLM`
loads the engine on first use.
"""

import importlib
import os
from typing import TYPE_CHECKING

# NOTE: OpenMP threads that spin while waiting steal a shared core from everything else (on a
# 2-core box with one core busy elsewhere, spinning cost 76% of CPU decode speed). Passive
# waiting is the default when this package is imported before torch; an explicit
# OMP_WAIT_POLICY in the environment wins. Ray workers inherit it from the driver.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    from ernie_cluster.entrypoints.llm import LLM
    from ernie_cluster.outputs import CompletionOutput, RequestOutput
    from ernie_cluster.sampling_params import SamplingParams, StructuredOutputsParams

_EXPORTS = {
    "LLM": "ernie_cluster.entrypoints.llm",
    "CompletionOutput": "ernie_cluster.outputs",
    "RequestOutput": "ernie_cluster.outputs",
    "SamplingParams": "ernie_cluster.sampling_params",
    "StructuredOutputsParams": "ernie_cluster.sampling_params",
}

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StructuredOutputsParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ernie_cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
