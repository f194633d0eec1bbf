"""Workers: one rank each, owning its model shard, KV cache and per-request state."""
