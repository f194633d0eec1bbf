"""ernie-cluster: a Ray serving cluster for ERNIE-4.5 mixture-of-experts models."""

import os

# NOTE: OpenMP threads that spin while waiting steal a shared core from everything else (on a
# 2-core box with one core busy elsewhere, spinning cost 76% of CPU decode speed). Passive
# waiting is the default when this package is imported before torch; an explicit
# OMP_WAIT_POLICY in the environment wins. Ray workers inherit it from the driver.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ernie_cluster.entrypoints.llm import LLM
from ernie_cluster.outputs import CompletionOutput, RequestOutput
from ernie_cluster.sampling_params import SamplingParams
from ernie_cluster.structured_output.params import StructuredOutputsParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StructuredOutputsParams"]
__version__ = "0.1.0"
