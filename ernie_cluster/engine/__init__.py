"""The continuous-batching engine: scheduler, KV cache manager, request state."""
