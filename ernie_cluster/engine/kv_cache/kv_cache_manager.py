"""Per-request KV block tables on top of the BlockPool, with automatic prefix caching.

Owns which blocks each request holds, the chained hashes of its full blocks and the prefix
cache hit-rate counters; with a host tier (host_tier.py), also the device<->host copies a step
must run. It never touches tensors and never decides scheduling: callers ask whether blocks
fit, and a failed allocation changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ernie_cluster.engine.kv_cache.block_pool import BlockPool, KVBlock, hash_block_tokens
from ernie_cluster.engine.kv_cache.host_tier import HostTier


@dataclass(slots=True)
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache and tokens found already computed."""

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @property
    def hit_rate(self) -> float:
        if self.prefix_cache_queries == 0:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries


class KVCacheManager:
    """Block tables keyed by request id.

    Lifecycle per request: `get_computed_blocks` (once per admission attempt) ->
    `allocate_slots` (each step) -> `cache_blocks` (after each step's KV is written) -> `free`.
    A request's token ids are append-only while it lives; call `free` for every request id
    that was passed in, even one that never got blocks (it drops the memoised hashes).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        num_host_blocks: int = 0,
        write_through: bool = False,
    ) -> None:
        """`num_host_blocks` > 0 adds a host tier under the prefix cache. Full blocks go down
        to it when the device pool evicts them, or (`write_through`) as soon as they are
        published."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        if num_host_blocks and not enable_prefix_caching:
            raise ValueError("the host KV tier needs prefix caching (its blocks are found by hash)")
        self._pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.host = HostTier(num_host_blocks) if num_host_blocks else None
        self.write_through = write_through
        # This step's copies, handed to the workers by `take_copy_ops`:
        # (device block, host slot) saves and (host slot, device block) loads.
        self._saves: list[tuple[int, int]] = []
        self._loads: list[tuple[int, int]] = []
        if self.host is not None:
            self._pool.on_evict = self._save_block
        self._block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._req_blocks: dict[str, list[KVBlock]] = {}
        self._req_block_ids: dict[str, list[int]] = {}  # the same tables as ids, kept in step
        # Chained hashes of the request's leading full blocks, computed lazily and at most once.
        self._req_hashes: dict[str, list[int]] = {}
        # Number of leading full blocks already published or deliberately left unpublished.
        self._req_num_cached: dict[str, int] = {}

    def needs_caching(self, request_id: str, num_computed_tokens: int) -> bool:
        """Whether `cache_blocks` would publish anything (cheap: no token list needed)."""
        if not self.enable_prefix_caching or request_id not in self._req_num_cached:
            return False
        return num_computed_tokens // self._block_size > self._req_num_cached[request_id]

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self._pool.usage

    def num_blocks_needed(self, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self._block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether `num_tokens` fit in the whole pool (admission check; ignores current use)."""
        return self.num_blocks_needed(num_tokens) <= self._pool.num_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a copy); empty for a request holding no blocks."""
        return [block.block_id for block in self._req_blocks.get(request_id, ())]

    def get_computed_blocks(
        self, request_id: str, token_ids: Sequence[int]
    ) -> tuple[list[int], int]:
        """Longest cached chain of full prompt blocks: (block ids, number of computed tokens).

        Takes no references: pass the ids to `allocate_slots` right away. The last token is
        never counted as computed, so the model still produces logits for the prompt.
        """
        if not self.enable_prefix_caching:
            return [], 0
        if request_id in self._req_blocks:
            raise ValueError(f"request {request_id!r} already holds blocks; free it first")
        # (len - 1) // block_size full blocks leaves at least one token to compute, which
        # also drops the last block of a prompt that is an exact multiple of block_size.
        max_hit_blocks = max(0, (len(token_ids) - 1) // self._block_size)
        hit_ids: list[int] = []
        parent_hash: int | None = None
        for index in range(max_hit_blocks):
            block_hash = self._block_hash(request_id, token_ids, index)
            block = self._pool.get_cached_block(
                block_hash, self._block_tokens(token_ids, index), parent_hash
            )
            if block is None:
                break
            hit_ids.append(block.block_id)
            parent_hash = block_hash
        num_computed_tokens = len(hit_ids) * self._block_size
        self.stats.prefix_cache_queries += len(token_ids)
        self.stats.prefix_cache_hits += num_computed_tokens
        return hit_ids, num_computed_tokens

    def allocate_slots(
        self,
        request_id: str,
        num_tokens_total: int,
        computed_block_ids: list[int] | None = None,
    ) -> list[int] | None:
        """Grow the request's block table to hold `num_tokens_total` tokens.

        On the request's first call, `computed_block_ids` (from `get_computed_blocks`) are
        referenced and become the head of its table. Returns the whole table, or None when
        the pool is short, in which case nothing changed. Tables never shrink here.

        NOTE: the returned list is the manager's own, kept up to date in place (the scheduler
        calls this for every running request every step, so no copy is made): read it,
        slice it, never modify it.
        """
        num_needed_total = self.num_blocks_needed(num_tokens_total)
        blocks = self._req_blocks.get(request_id)
        if blocks is not None:
            if computed_block_ids:
                raise ValueError(
                    f"computed_block_ids given for request {request_id!r}, which already "
                    f"holds {len(blocks)} blocks; they are only accepted on its first call"
                )
            num_new = num_needed_total - len(blocks)
            if num_new > self._pool.num_free_blocks:
                return None
            ids = self._req_block_ids[request_id]
            for _ in range(num_new):
                block = self._pool.allocate()
                blocks.append(block)
                ids.append(block.block_id)
            return ids

        computed = self._resolve_computed(request_id, num_tokens_total, computed_block_ids or [])
        num_new = num_needed_total - len(computed)
        # NOTE: referencing a cached-free hit takes it off the free list, so it costs
        # capacity just like a fresh block.
        num_free_hits = sum(1 for block in computed if block.ref_cnt == 0)
        if num_new + num_free_hits > self._pool.num_free_blocks:
            return None
        self._pool.touch(computed)
        blocks = computed + [self._pool.allocate() for _ in range(num_new)]
        self._req_blocks[request_id] = blocks
        self._req_block_ids[request_id] = ids = [block.block_id for block in blocks]
        self._req_num_cached[request_id] = len(computed)
        return ids

    def cache_blocks(
        self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Publish the request's blocks that became full once KV up to `num_computed_tokens`
        is written.

        If another request already published the same chain link (it computed the same prefix
        concurrently), this request's block stays unpublished: its block id is already in the
        worker's block table, so it cannot be swapped for the cached one, and the duplicate
        is simply plain free space after release. Its later blocks still chain by hash.
        """
        if not self.enable_prefix_caching:
            return
        blocks = self._req_blocks.get(request_id)
        if blocks is None:
            raise ValueError(f"request {request_id!r} holds no blocks")
        if not 0 <= num_computed_tokens <= len(token_ids):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} outside [0, {len(token_ids)}] "
                f"for request {request_id!r}"
            )
        num_full = num_computed_tokens // self._block_size
        if num_full > len(blocks):
            raise ValueError(
                f"request {request_id!r} has {num_full} full blocks of KV but holds only "
                f"{len(blocks)} blocks"
            )
        start = self._req_num_cached[request_id]
        for index in range(start, num_full):
            block_hash = self._block_hash(request_id, token_ids, index)
            parent_hash = self._req_hashes[request_id][index - 1] if index > 0 else None
            published = self._pool.cache_full_block(
                blocks[index], block_hash, self._block_tokens(token_ids, index), parent_hash
            )
            if published and self.write_through and self.host is not None:
                self._save_block(blocks[index])
        self._req_num_cached[request_id] = max(start, num_full)

    def trim(self, request_id: str, num_tokens: int) -> int | None:
        """Release the request's tail blocks beyond those `num_tokens` need (slots a
        speculative step allocated for proposals that were rejected). Returns the blocks it
        keeps, or None when nothing was released. The tail was never published: it lies past
        the request's computed tokens."""
        blocks = self._req_blocks.get(request_id)
        keep = self.num_blocks_needed(num_tokens)
        if blocks is None or len(blocks) <= keep:
            return None
        if keep < self._req_num_cached[request_id]:
            raise ValueError(
                f"request {request_id!r}: cannot trim to {keep} blocks below its "
                f"{self._req_num_cached[request_id]} published ones"
            )
        tail = blocks[keep:]
        del blocks[keep:]
        del self._req_block_ids[request_id][keep:]
        self._pool.free_blocks(reversed(tail))
        return keep

    def free(self, request_id: str) -> None:
        """Release the request's blocks and forget it; a no-op for unknown ids."""
        blocks = self._req_blocks.pop(request_id, None)
        self._req_block_ids.pop(request_id, None)
        self._req_hashes.pop(request_id, None)
        self._req_num_cached.pop(request_id, None)
        if blocks:
            # NOTE: tail blocks first, so they reach the LRU head and are evicted before the
            # prefix blocks: a later request sharing only the prefix still hits.
            self._pool.free_blocks(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        """Forget all cached-free prefixes (the host tier's too); True if nothing published
        remains."""
        if self.host is not None:
            self.host.clear()
        return self._pool.reset_prefix_cache()

    # ------------------------------------------------------------------------ host tier
    def match_host_blocks(
        self, request_id: str, token_ids: Sequence[int], num_device_blocks: int
    ) -> list[int]:
        """Hashes of the host blocks that continue the request's cached chain after its
        `num_device_blocks` device hits (empty without a host tier). They stay pinned on the
        host until this step's copies are taken, whether or not they are loaded."""
        if self.host is None:
            return []
        max_hit_blocks = max(0, (len(token_ids) - 1) // self._block_size)
        hashes: list[int] = []
        parent_hash = (
            self._block_hash(request_id, token_ids, num_device_blocks - 1)
            if num_device_blocks
            else None
        )
        for index in range(num_device_blocks, max_hit_blocks):
            block_hash = self._block_hash(request_id, token_ids, index)
            tokens = self._block_tokens(token_ids, index)
            if self.host.lookup(block_hash, tokens, parent_hash) is None:
                break
            self.host.pin(block_hash)
            hashes.append(block_hash)
            parent_hash = block_hash
        return hashes

    def load_host_blocks(self, request_id: str, host_hashes: list[int], first_index: int) -> None:
        """Plan copies of `host_hashes` into the request's blocks from `first_index` on (fresh
        blocks `allocate_slots` just gave it). The loaded blocks are published like computed
        ones once the request's first step has run."""
        blocks = self._req_blocks[request_id]
        if first_index + len(host_hashes) > len(blocks):
            raise ValueError(
                f"request {request_id!r} holds {len(blocks)} blocks: too few to load "
                f"{len(host_hashes)} host blocks from index {first_index}"
            )
        for offset, block_hash in enumerate(host_hashes):
            slot = self.host.pin(block_hash)  # pinned since match_host_blocks: still there
            self._loads.append((slot, blocks[first_index + offset].block_id))
        self.host.stats.blocks_loaded += len(host_hashes)
        self.host.stats.host_hit_tokens += len(host_hashes) * self._block_size

    def take_copy_ops(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(saves, loads) planned since the last call, for the step about to be sent."""
        saves, loads = self._saves, self._loads
        self._saves, self._loads = [], []
        if self.host is not None:
            self.host.release_pins()
        return saves, loads

    def _save_block(self, block: KVBlock) -> None:
        slot = self.host.store(block.block_hash, block.token_ids, block.parent_hash)
        if slot is not None:
            self._saves.append((block.block_id, slot))

    def _resolve_computed(
        self, request_id: str, num_tokens_total: int, computed_block_ids: list[int]
    ) -> list[KVBlock]:
        if len(computed_block_ids) * self._block_size > num_tokens_total:
            raise ValueError(
                f"{len(computed_block_ids)} computed blocks of {self._block_size} tokens "
                f"exceed num_tokens_total={num_tokens_total} for request {request_id!r}"
            )
        hashes = self._req_hashes.get(request_id, [])
        computed = []
        for index, block_id in enumerate(computed_block_ids):
            if not 0 <= block_id < self._pool.num_blocks:
                raise ValueError(f"block id {block_id} outside [0, {self._pool.num_blocks})")
            block = self._pool.blocks[block_id]
            # A hit from get_computed_blocks may have been evicted by allocations since;
            # sharing it then would read another sequence's KV.
            if index >= len(hashes) or block.block_hash != hashes[index]:
                raise ValueError(
                    f"block {block_id} is not the cached block {index} of request "
                    f"{request_id!r}; call get_computed_blocks again"
                )
            computed.append(block)
        return computed

    def _block_tokens(self, token_ids: Sequence[int], index: int) -> Sequence[int]:
        return token_ids[index * self._block_size : (index + 1) * self._block_size]

    def _block_hash(self, request_id: str, token_ids: Sequence[int], index: int) -> int:
        """Chained hash of full block `index`, memoised per request (blocks hash once)."""
        hashes = self._req_hashes.setdefault(request_id, [])
        while len(hashes) <= index:
            parent_hash = hashes[-1] if hashes else None
            hashes.append(
                hash_block_tokens(parent_hash, self._block_tokens(token_ids, len(hashes)))
            )
        return hashes[index]
