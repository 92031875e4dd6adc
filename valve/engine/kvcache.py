"""Paged KV cache: fixed-size token blocks, per-sequence block tables, storage from a pluggable allocator.

The allocator interface is the one of the runtime's ``KVPool`` (``valve.runtime.memory.pool``):
``allocate(seq_id, n_blocks)``, ``free(seq_id)``, ``block_table(seq_id)`` and ``tensor(dtype, block_shape)``,
the last a view ``[max_blocks, *block_shape]`` in which block ``b`` is ``view[b]``. ``TorchBlockAllocator`` is
a plain tensor with a free list (CPU tests, the online server); ``KVPool`` plugs in for the offline runner.

One block holds every layer's keys and values of ``block_size`` tokens:
``[n_layers, 2, block_size, n_kv_heads, head_dim]``.
"""

from __future__ import annotations

from typing import Protocol

from valve.engine.config import ModelConfig


class OutOfBlocks(MemoryError):
    """The allocator has too few free blocks for the request."""


class BlockAllocator(Protocol):
    def allocate(self, seq_id, n_blocks: int) -> list[int]: ...

    def free(self, seq_id) -> None: ...

    def block_table(self, seq_id) -> list[int]: ...

    def tensor(self, dtype, block_shape: tuple[int, ...]): ...


class TorchBlockAllocator:
    """``num_blocks`` blocks in one torch tensor; allocation is a free list."""

    def __init__(self, num_blocks: int, device=None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks, self.device = num_blocks, device
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[object, list[int]] = {}
        self._storage = None

    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, seq_id, n_blocks: int) -> list[int]:
        if n_blocks < 0:
            raise ValueError("n_blocks must be >= 0")
        if n_blocks > len(self._free):
            raise OutOfBlocks(f"asked for {n_blocks} blocks, {len(self._free)} free")
        new = [self._free.pop() for _ in range(n_blocks)]
        self._tables.setdefault(seq_id, []).extend(new)
        return new

    def free(self, seq_id) -> None:
        blocks = self._tables.pop(seq_id, [])
        self._free.extend(reversed(blocks))

    def block_table(self, seq_id) -> list[int]:
        return list(self._tables.get(seq_id, []))

    def tensor(self, dtype, block_shape: tuple[int, ...]):
        import torch

        if self._storage is None:
            self._storage = torch.zeros((self.num_blocks, *block_shape), dtype=dtype, device=self.device)
        return self._storage


class PagedKVCache:
    """Block tables per sequence over the allocator's block storage."""

    def __init__(self, cfg: ModelConfig, allocator: BlockAllocator, dtype, block_size: int = 16) -> None:
        self.cfg, self.allocator, self.block_size = cfg, allocator, block_size
        self.block_shape = (cfg.n_layers, 2, block_size, cfg.n_kv_heads, cfg.head_dim)
        self.kv = allocator.tensor(dtype, self.block_shape)
        self.tables: dict[object, list[int]] = {}

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def free_blocks(self) -> int | None:
        """Free blocks if the allocator can tell, else None."""
        fn = getattr(self.allocator, "free_blocks", None)
        return fn() if callable(fn) else None

    def ensure(self, seq_id, n_tokens: int) -> list[int]:
        """Grow ``seq_id``'s table to cover ``n_tokens`` tokens. Raises OutOfBlocks (nothing allocated then)."""
        have = len(self.tables.get(seq_id, ()))
        need = self.blocks_for(n_tokens) - have
        if need > 0:
            free = self.free_blocks()
            if free is not None and need > free:
                raise OutOfBlocks(f"sequence {seq_id!r} needs {need} more blocks, {free} free")
            try:
                self.allocator.allocate(seq_id, need)
            except MemoryError as e:  # KVPool or another allocator that found no room
                raise OutOfBlocks(str(e)) from e
            self.tables[seq_id] = list(self.allocator.block_table(seq_id))
        return self.tables.setdefault(seq_id, [])

    def free(self, seq_id) -> None:
        if self.tables.pop(seq_id, None) is not None:
            self.allocator.free(seq_id)

    def remap(self, moved: dict[int, int]) -> None:
        """Apply a compaction's block moves (old id -> new id) to every table."""
        if moved:
            self.tables = {s: [moved.get(b, b) for b in t] for s, t in self.tables.items()}

    def drop(self, seq_id) -> None:
        """Forget a sequence whose blocks the allocator already took back (evicted)."""
        self.tables.pop(seq_id, None)

    def refresh_storage(self) -> None:
        """Re-read the storage view (after the pool re-created it, e.g. on growth)."""
        self.kv = self.allocator.tensor(self.kv.dtype, self.block_shape)
