"""The host tier's bookkeeping: which full prefix blocks sit in which host slot, in LRU order.

The host tier sits under the device prefix cache and uses the same chained block hashes, so a
lookup continues the device chain where it stopped. Like the BlockPool it owns ids only (slots,
hashes, pins) and compares a hit's tokens and parent, so a hash collision is a miss. It never
touches tensors: the copies it plans are carried to every rank by the step message and each
rank moves its own shard (worker/kv_offload.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class HostBlock:
    slot: int
    parent_hash: int | None
    token_ids: tuple[int, ...]


@dataclass(slots=True)
class HostTierStats:
    """Cumulative counters of the host tier (blocks and tokens)."""

    host_hit_tokens: int = 0
    """Prompt tokens served by copying blocks back from the host (not recomputed)."""
    blocks_saved: int = 0
    """Device blocks written to the host."""
    blocks_loaded: int = 0
    """Host blocks copied back into device blocks."""
    blocks_dropped: int = 0
    """Host blocks evicted (LRU) to make room, or not written because every slot was pinned."""
    swapped_in_tokens: int = 0
    """Host-hit tokens of requests coming back from preemption (swap instead of recompute)."""
    load_wait_s: float = 0.0
    """Seconds requests spent waiting for their blocks to be copied back (sum)."""


class HostTier:
    """`num_slots` host blocks keyed by chained hash, evicted least recently used first.

    A slot matched for a load this step is pinned until the step's copies are handed to the
    workers (`release_pins`): the device blocks allocated for the load may evict others that
    are saved in the same step, and workers run a step's saves before its loads, so no save
    planned in the step may overwrite a slot a load reads.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"the host KV tier needs >= 1 block, got {num_slots}")
        self.num_slots = num_slots
        self._entries: OrderedDict[int, HostBlock] = OrderedDict()  # oldest first
        self._free_slots = list(range(num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self._pinned: set[int] = set()
        self.stats = HostTierStats()

    @property
    def num_used_slots(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._entries

    def lookup(
        self, block_hash: int, token_ids: Sequence[int], parent_hash: int | None
    ) -> int | None:
        """The slot holding this chain link, or None (a colliding hash is a miss)."""
        entry = self._entries.get(block_hash)
        if entry is None or entry.parent_hash != parent_hash:
            return None
        if entry.token_ids != tuple(token_ids):
            return None
        return entry.slot

    def pin(self, block_hash: int) -> int:
        """Keep a looked-up block (most recently used, not evictable) until `release_pins`:
        a load may read it this step. Returns its slot."""
        entry = self._entries[block_hash]
        self._entries.move_to_end(block_hash)
        self._pinned.add(entry.slot)
        return entry.slot

    def store(
        self, block_hash: int, token_ids: Sequence[int], parent_hash: int | None
    ) -> int | None:
        """A slot to write this block into, or None when no copy is needed or possible.

        None when the block is already on the host (it becomes most recently used) or every
        slot is pinned by this step's loads (the block is dropped; it will be recomputed).
        """
        if block_hash in self._entries:
            self._entries.move_to_end(block_hash)
            return None
        slot = self._take_slot()
        if slot is None:
            self.stats.blocks_dropped += 1
            return None
        self._entries[block_hash] = HostBlock(slot, parent_hash, tuple(token_ids))
        self.stats.blocks_saved += 1
        return slot

    def release_pins(self) -> None:
        """The step's copies left for the workers: later saves may reuse any slot."""
        self._pinned.clear()

    def clear(self) -> None:
        """Forget every host block (the slots' bytes are simply overwritten later)."""
        self._entries.clear()
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self._pinned.clear()

    def _take_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        for block_hash, entry in self._entries.items():
            if entry.slot not in self._pinned:
                del self._entries[block_hash]
                self.stats.blocks_dropped += 1
                return entry.slot
        return None


if __name__ == "__main__":
    tier = HostTier(num_slots=2)
    print("store a ->", tier.store(1, (1, 2), None), " store b ->", tier.store(2, (3, 4), 1))
    print("lookup a:", tier.lookup(1, (1, 2), None), " a again ->", tier.store(1, (1, 2), None))
    print("store c evicts the LRU (b) ->", tier.store(3, (5, 6), None), " b:", 2 in tier)
