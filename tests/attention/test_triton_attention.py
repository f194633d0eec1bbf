"""The Triton paged-attention kernels match the torch reference backend: decodes, fresh
prompts, chunks after a cached prefix and mixed steps, over ragged batches, shuffled block
tables and the real model's head layout. Also: the cache they write equals the reference's,
a launch performs no host sync, and backend selection.

Without a GPU the kernels run in Triton's CPU interpreter on CPU tensors; with one, the same
tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
from paged_tables import paged_tables

# NOTE: triton.jit decides between compiling and interpreting when a kernel is decorated, so
# the interpreter is switched on before any ernie_cluster.attention.triton_* import (for the
# whole pytest process, as tests/model/test_fused_moe does).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from ernie_cluster.attention import AttentionMetadata, TorchPagedAttention
from ernie_cluster.attention.backend import write_kv
from ernie_cluster.attention.selector import get_attention_backend
from ernie_cluster.attention.triton_backend import TritonPagedAttention
from ernie_cluster.attention.triton_decode import decode_attention, interpreting

DEVICE = "cpu" if interpreting() else "cuda"

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Contents of the block that unused block-table entries point at: a kernel that reads past
# a row's blocks attends to these and misses the reference by far.
POISON_KEY, POISON_VALUE = 30.0, 1e3


@dataclasses.dataclass
class Case:
    q: torch.Tensor  # [N, Hq, D], a view of a fused qkv projection, as in the model
    k: torch.Tensor  # [N, Hkv, D]
    v: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_slots, Hkv, D], earlier steps' keys already in place
    meta: AttentionMetadata  # what the reference reads
    poisoned_meta: AttentionMetadata  # same, with garbage past each row's blocks


def make_case(query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    gen = torch.Generator().manual_seed(sum(context_lens) * 31 + len(query_lens))
    tables = paged_tables(query_lens, context_lens, block_size, gen, 3, DEVICE)
    meta, poisoned_meta = tables.meta, tables.poisoned_meta
    num_blocks, poison = tables.num_blocks, tables.poison

    kv_cache = torch.randn(2, num_blocks * block_size, num_kv_heads, head_dim, generator=gen)
    poison_slots = slice(poison * block_size, (poison + 1) * block_size)
    kv_cache[0, poison_slots], kv_cache[1, poison_slots] = POISON_KEY, POISON_VALUE
    num_tokens = sum(query_lens)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen)
    q, k, v = qkv.to(dtype).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    q, k, v = (x.to(DEVICE) for x in (q, k, v))
    return Case(q, k, v, kv_cache.to(DEVICE, dtype), meta, poisoned_meta)


def check_against_reference(case: Case, decode_num_splits: int | None = None) -> None:
    scale = case.q.shape[-1] ** -0.5
    want_cache = case.kv_cache.clone()
    want = TorchPagedAttention().forward(case.q, case.k, case.v, want_cache, case.meta, scale)
    got_cache = case.kv_cache.clone()
    backend = TritonPagedAttention(decode_num_splits)
    got = backend.forward(case.q, case.k, case.v, got_cache, case.poisoned_meta, scale)
    assert got.shape == case.q.shape and got.dtype == case.q.dtype
    assert torch.equal(got_cache, want_cache)
    tol = TOLERANCE[case.q.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decodes_at_block_boundaries(dtype):
    """Ragged decode batch, contexts one short of, at and one past block edges, and a
    sequence whose only key is its own (a 1-token prompt decoded as a one-row step)."""
    context_lens = [15, 16, 17, 63, 64, 65, 1, 130]
    case = make_case([1] * 8, context_lens, 8, 4, 64, 16, dtype)
    check_against_reference(case)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_with_pinned_split_counts(num_splits):
    """A CUDA graph pins the split count, whatever the lengths: one split, and three (not a
    power of two) over short contexts, where some splits hold no keys, are both exact."""
    case = make_case([1, 1, 1], [3, 200, 64], 4, 4, 64, 64, torch.float32)
    check_against_reference(case, decode_num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_count_per_sequence_63_short_1_long(dtype):
    """The grid is sized for the longest sequence; each sequence splits by its own length on
    the device: the long one uses many programs, each short one a single split (small shapes
    for the interpreter: head_dim 16, 16 keys per split)."""
    context_lens = [3 + i % 5 for i in range(63)] + [200]
    case = make_case([1] * 64, context_lens, 2, 1, 16, 16, dtype)
    scale = 0.25
    want = TorchPagedAttention().forward(
        case.q, case.k, case.v, case.kv_cache.clone(), case.meta, scale
    )
    cache = case.kv_cache.clone()
    write_kv(cache, case.k, case.v, case.meta.slot_mapping)
    got = torch.empty_like(case.q)
    used = decode_attention(
        case.q, cache, case.poisoned_meta, scale, got, block_n=16, min_keys_per_split=16
    )
    assert used.tolist() == [1] * 63 + [13]  # ceil(200 / 16) of a 16-split grid
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fresh_prompts(dtype):
    """Causal prefill of ragged prompts: several query tiles, block edges, one-token prompts
    as one-row spans after a longer one."""
    case = make_case([17, 1, 64, 70], [17, 1, 64, 70], 4, 4, 64, 64, dtype)
    check_against_reference(case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_after_a_cached_prefix(dtype):
    """Chunks whose prefix is already cached (prefix-cache hits, chunked prefill): full
    attention to the prefix, causal within the chunk, prefix ending mid-block."""
    case = make_case([33, 5, 16], [80, 21, 48], 8, 4, 64, 16, dtype)
    check_against_reference(case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_step_real_head_layout(dtype):
    """Decodes then prefill spans in one call, with the model's 20/4 heads of dim 128."""
    case = make_case([1, 1, 1, 9, 20], [40, 17, 2, 9, 50], 20, 4, 128, 16, dtype)
    check_against_reference(case)


def test_long_context():
    """A 4K decode (split 32 ways) and a chunk after a 4K prefix, 64-token pages."""
    case = make_case([1, 16], [4100, 4112], 4, 2, 64, 64, torch.float32)
    check_against_reference(case)


def test_empty_step():
    case = make_case([1], [5], 4, 4, 64, 16, torch.float32)
    empty = AttentionMetadata.build([], [], [], 16, DEVICE)
    out = TritonPagedAttention().forward(
        case.q[:0], case.k[:0], case.v[:0], case.kv_cache, empty, 0.125
    )
    assert out.shape == (0, 4, 64)


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.item",
    "aten.equal",
    "aten.is_nonzero",
}


def test_launches_never_sync_with_the_device():
    """No op that copies a device value to the host runs in the decode launcher or in a
    whole mixed forward (the interpreter's own host copies are not aten ops)."""
    case = make_case([1, 1, 7], [70, 3, 20], 8, 4, 64, 16, torch.float32)
    meta = case.meta
    with RecordOps() as decode_ops:
        out = torch.empty_like(case.q)
        decode_attention(case.q, case.kv_cache, meta, 0.125, out, num_splits=4)
    assert "aten.empty" in decode_ops.names  # the mode saw the launcher's buffers
    assert not decode_ops.names & SYNC_OPS
    with RecordOps() as forward_ops:
        TritonPagedAttention().forward(case.q, case.k, case.v, case.kv_cache, meta, 0.125)
    assert "aten.empty" in forward_ops.names  # the mode saw the forward's output buffer
    assert not forward_ops.names & SYNC_OPS


def test_backend_selection(monkeypatch):
    assert isinstance(get_attention_backend("torch", "cuda"), TorchPagedAttention)
    assert isinstance(get_attention_backend("auto", "cpu"), TorchPagedAttention)
    assert isinstance(get_attention_backend("auto", torch.device("cuda", 1)), TritonPagedAttention)
    if interpreting():  # on CPU only the interpreter can run the kernels
        assert isinstance(get_attention_backend("triton", "cpu"), TritonPagedAttention)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("flash", "cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on CUDA devices"):
        get_attention_backend("triton", "cpu")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
    with pytest.raises(ValueError, match="needs triton"):
        get_attention_backend("triton", "cuda")
    assert isinstance(get_attention_backend("auto", "cuda"), TorchPagedAttention)
