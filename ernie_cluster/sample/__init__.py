"""Token sampling: per-request `SamplingState` and the batched `Sampler`."""

from ernie_cluster.sample.sampler import Sampler, SamplerOutput
from ernie_cluster.sample.sampling_state import SamplingState

__all__ = ["Sampler", "SamplerOutput", "SamplingState"]
