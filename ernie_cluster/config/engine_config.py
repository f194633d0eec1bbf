"""Engine settings: what model, how it is split, how the KV cache and scheduler are sized.

One dataclass shared by the Python API, the CLI and the Serve config; cross-field checks raise
`ValueError` with the numbers. Values that depend on the checkpoint (max_model_len) are
resolved against the model config by `resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ernie_cluster.config.model_config import ErnieMoeConfig

ATTENTION_BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """Checkpoint directory or Hugging Face repo id."""
    revision: str | None = None
    dtype: str = "auto"
    """'auto' (the checkpoint's), 'float32', 'bfloat16' or 'float16'."""
    device: str = "cpu"
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    max_model_len: int | None = None
    """Longest prompt + output; defaults to the config's max_position_embeddings."""
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    """Token budget of one step, shared by prefill chunks and decodes."""
    block_size: int = 16
    num_kv_blocks: int | None = None
    """Explicit KV cache size in blocks; overrides kv_cache_memory_bytes."""
    kv_cache_memory_bytes: int | None = None
    """KV cache budget per rank, used as given (gpu_memory_utilization is then ignored).
    Default: 1 GiB on CPU; on a GPU, what gpu_memory_utilization leaves after the weights and
    a profiled forward (worker/kv_cache_sizing)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of each GPU's total memory the engine may fill (weights, activations, KV
    cache); memory other processes hold on the device counts against it. Not used on CPU."""
    attention_backend: str = "auto"
    """Paged attention kernels: 'triton', 'torch' (the reference) or 'auto' (triton on CUDA,
    torch elsewhere)."""
    enforce_eager: bool = False
    """Run every step eagerly: no CUDA-graph capture of decode steps (debugging, or to save
    the graphs' memory)."""
    multi_rank_cuda_graphs: bool = False
    """Capture CUDA graphs also at tensor_parallel_size > 1. Off (steps run eagerly there) until
    a multi-GPU run has replayed a W = 2 graph with its NCCL collectives and matched eager
    (benchmarks/device_check.sh)."""
    enable_prefix_caching: bool = True
    kv_offload_gb: float = 0.0
    """Host KV tier per rank, in GiB (0 = off): evicted prefix blocks are kept in host memory
    (pinned on CUDA) and copied back instead of recomputed. Needs prefix caching."""
    num_host_kv_blocks: int | None = None
    """Explicit host tier size in blocks; overrides kv_offload_gb."""
    grammar_compile_threads: int = 2
    """Output-constraint (grammar) compiles run at once, each on its own thread."""
    grammar_compile_timeout_s: float = 10.0
    """Longest a request waits for its grammar: a compile running longer is refused as too
    complex (400), one that cannot start in time because the pool is busy gets 503."""
    grammar_max_pending_compiles: int = 64
    """Compiles waiting for a thread; a request with a new grammar beyond this gets 503."""
    grammar_cache_bytes: int = 512 * 2**20
    """Byte budget of the compiled-grammar cache (LRU; spec text + compiled size)."""
    seed: int = 0
    """Seed of the default generator used by requests that give no seed."""
    show_progress: bool = True

    def __post_init__(self) -> None:
        positive = (
            "tensor_parallel_size",
            "expert_parallel_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "grammar_compile_threads",
            "grammar_max_pending_compiles",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tensor_parallel_size != self.expert_parallel_size:
            raise ValueError(
                f"expert_parallel_size ({self.expert_parallel_size}) must equal "
                f"tensor_parallel_size ({self.tensor_parallel_size}) for now"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_offload_gb < 0 or (self.num_host_kv_blocks or 0) < 0:
            raise ValueError(
                f"kv_offload_gb ({self.kv_offload_gb}) and num_host_kv_blocks "
                f"({self.num_host_kv_blocks}) must be >= 0"
            )
        if self.kv_offload_enabled and not self.enable_prefix_caching:
            raise ValueError(
                f"the host KV tier (kv_offload_gb={self.kv_offload_gb}, num_host_kv_blocks="
                f"{self.num_host_kv_blocks}) needs prefix caching: its blocks are found by hash"
            )
        if not 0 < self.grammar_compile_timeout_s < float("inf"):  # NaN too
            raise ValueError(
                "grammar_compile_timeout_s must be a finite number > 0, got "
                f"{self.grammar_compile_timeout_s}"
            )
        if self.grammar_cache_bytes < 0:
            raise ValueError(f"grammar_cache_bytes must be >= 0, got {self.grammar_cache_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention_backend {self.attention_backend!r}; "
                f"choose one of {list(ATTENTION_BACKENDS)}"
            )

    @property
    def kv_offload_enabled(self) -> bool:
        if self.num_host_kv_blocks is not None:
            return self.num_host_kv_blocks > 0
        return self.kv_offload_gb > 0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size

    def resolve(self, model_config: ErnieMoeConfig) -> EngineConfig:
        """Fill max_model_len from the checkpoint."""
        if self.max_model_len is None:
            return replace(self, max_model_len=model_config.max_position_embeddings)
        return self

    def num_blocks_cap(self) -> int:
        """Never more blocks than every sequence at full length could use."""
        max_len = self.max_model_len or 0
        return self.max_num_seqs * (-(-max_len // self.block_size)) + 1
