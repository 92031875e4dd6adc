"""Errors of the KV pool and its backends (a leaf module: backends raise them, the pool catches them)."""

from __future__ import annotations


class PoolExhausted(MemoryError):
    """The pool cannot hold the blocks asked for without growing past its limit."""


class DeviceOutOfMemory(MemoryError):
    """The device had no physical memory for a chunk (another process holds it). Backends map all or nothing."""


class ReclaimImpossible(MemoryError):
    """A reclaim asked for more bytes than the pool holds mapped. Nothing was released."""
