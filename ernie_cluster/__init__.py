"""ernie-cluster: a Ray serving cluster for ERNIE-4.5 mixture-of-experts models."""

from ernie_cluster.entrypoints.llm import LLM
from ernie_cluster.outputs import CompletionOutput, RequestOutput
from ernie_cluster.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
