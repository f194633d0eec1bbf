"""The Triton kernels on an fp8 KV cache match the torch reference backend on the same cache:
the write kernel stores the same e4m3 bytes (round-to-nearest-even ties, e4m3 subnormals,
saturation at 448, signed zeros), and decode (one split and several) and prefill (fresh
prompts, chunks after a cached prefix, mixed steps) attend to the same dequantized keys, with
K and V scales that differ from 1 and from each other.

Without a GPU the kernels run in Triton's CPU interpreter (small shapes); with one, compiled
(compute capability 8.9 or later: Triton has no e4m3 before Ada).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from paged_tables import paged_tables

# NOTE: before any ernie_cluster.attention.triton_* import (tests/attention/test_triton_attention).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

from ernie_cluster.attention import AttentionMetadata, TorchPagedAttention
from ernie_cluster.attention.backend import write_kv
from ernie_cluster.attention.kv_quant import FP8_KV_DTYPE, set_kv_scales
from ernie_cluster.attention.triton_backend import TritonPagedAttention
from ernie_cluster.attention.triton_cache import write_kv_triton
from ernie_cluster.triton_env import interpreting

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("Triton has e4m3 from compute capability 8.9 on", allow_module_level=True)

K_SCALE, V_SCALE = 0.05, 3.0
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def with_scales(cache: torch.Tensor) -> torch.Tensor:
    """A copy of an fp8 cache with this file's scales (a copy keeps no Python attribute)."""
    copy = cache.clone()
    set_kv_scales(copy, K_SCALE, V_SCALE)
    return copy


def cache_bytes(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8).cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kernel_rounds_like_torch(dtype):
    """Exact ties between e4m3 neighbours round to the even one, in the normal range and
    among subnormals (spacing 2**-9 below 2**-6); past 448 saturates; tiny values flush to a
    zero that keeps its sign. Then 300 random values over the whole range."""
    ties = [1.0625, 1.1875, -1.0625, 1.5 * 2**-9, 2.5 * 2**-9, -2.5 * 2**-9, 0.5 * 2**-9]
    edges = [448.0, 460.0, 1e4, -1e4, 2**-6, 2**-6 * 0.97, 1e-7, -1e-7, 0.0, -0.0, 15.5, 240.0]
    special = torch.tensor(ties + edges)
    gen = torch.Generator().manual_seed(0)
    magnitude = 10 ** (torch.rand(300, generator=gen) * 6 - 3.5)
    values = torch.cat([special, torch.randn(300, generator=gen) * magnitude])
    heads, dim = 2, 8
    rows = -(-values.numel() // (heads * dim))
    padded = torch.zeros(rows * heads * dim)
    padded[: values.numel()] = values
    k = padded.view(rows, heads, dim).to(dtype)  # e4m3 value = k / 1.0
    v = (padded.flip(0).view(rows, heads, dim) * V_SCALE).to(dtype)
    slots = torch.randperm(rows + 5, generator=gen)[:rows]
    caches = []
    for write in (write_kv, write_kv_triton):
        cache = torch.zeros(2, rows + 5, heads, dim, dtype=FP8_KV_DTYPE, device=DEVICE)
        set_kv_scales(cache, 1.0, V_SCALE)
        write(cache, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
        caches.append(cache_bytes(cache))
    want, got = caches
    assert torch.equal(got, want)
    assert (want == 0x80).any() and (want[0] == 0x7E).any()  # -0 and 448 were exercised


@dataclasses.dataclass
class Case:
    q: torch.Tensor  # [N, Hq, D]
    k: torch.Tensor  # [N, Hkv, D]
    v: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_slots, Hkv, D] fp8: earlier steps' keys in place
    meta: AttentionMetadata
    poisoned_meta: AttentionMetadata  # unused block-table entries point at a poison block


def make_case(query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    gen = torch.Generator().manual_seed(sum(context_lens) * 7 + len(query_lens))
    tables = paged_tables(query_lens, context_lens, block_size, gen, 2, DEVICE)
    meta, poisoned_meta = tables.meta, tables.poisoned_meta
    num_blocks, poison = tables.num_blocks, tables.poison
    # every e4m3 code but NaN, so reads decode the whole range (subnormals included)
    shape = (2, num_blocks * block_size, num_kv_heads, head_dim)
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0
    poison_slots = slice(poison * block_size, (poison + 1) * block_size)
    raw[:, poison_slots] = 0x7E  # 448: far from any real key or value
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen) * 0.1
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 4
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 50
    q, k, v = (x.to(DEVICE, dtype) for x in (q, k, v))
    return Case(q, k, v, raw.view(FP8_KV_DTYPE).to(DEVICE), meta, poisoned_meta)


def check_against_reference(case: Case, decode_num_splits: int | None = None) -> None:
    scale = case.q.shape[-1] ** -0.5
    want_cache = with_scales(case.kv_cache)
    want = TorchPagedAttention().forward(case.q, case.k, case.v, want_cache, case.meta, scale)
    got_cache = with_scales(case.kv_cache)
    backend = TritonPagedAttention(decode_num_splits)
    got = backend.forward(case.q, case.k, case.v, got_cache, case.poisoned_meta, scale)
    assert got.shape == case.q.shape and got.dtype == case.q.dtype
    assert torch.equal(cache_bytes(got_cache), cache_bytes(want_cache))
    tol = TOLERANCE[case.q.dtype]
    magnitude = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol * magnitude, rtol=tol)


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_decodes(dtype):
    """Contexts one short of, at and one past a block edge, and a one-key sequence."""
    case = make_case([1] * 5, [15, 16, 17, 40, 1], 4, 2, 32, 16, dtype)
    check_against_reference(case)


def test_decode_in_three_splits():
    case = make_case([1, 1, 1], [3, 200, 64], 4, 2, 32, 16, torch.float32)
    check_against_reference(case, decode_num_splits=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_and_mixed_step(dtype):
    """Two decodes, a fresh prompt and a chunk after a prefix ending mid-block."""
    case = make_case([1, 1, 17, 9], [20, 3, 17, 40], 4, 2, 32, 16, dtype)
    check_against_reference(case)


def test_real_head_layout_bfloat16():
    """The model's 20/4 heads of dim 128: a decode and a chunk after a cached prefix."""
    case = make_case([1, 6], [30, 25], 20, 4, 128, 16, torch.bfloat16)
    check_against_reference(case)


def test_gpus_without_e4m3_get_a_clear_error(monkeypatch):
    """Triton has no e4m3 before compute capability 8.9 (A100 is 8.0): the backend says so
    before any kernel fails to compile."""
    from ernie_cluster.attention.triton_backend import check_fp8_support

    check_fp8_support.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r">= 8.9, but cuda:7 is 8.0; use attention_backend"):
        check_fp8_support(torch.device("cuda", 7))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_support(torch.device("cuda", 6))
    check_fp8_support.cache_clear()
