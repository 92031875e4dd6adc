"""The offline KV pool: VMM-backed chunks, its backends (cuda, sim), reclaim client and eviction policy."""
