"""Hash-routing baselines (kept for imports): the kernels live in :mod:`gpu_phase_router.methods.hashing`,
the crate's ``hash_route`` helper in :mod:`gpu_phase_router.api`."""

from __future__ import annotations

from .api import hash_route
from .methods.hashing import STREAM_HASH, STREAM_WEIGHTED_HASH, hash_block, slot_keys, weighted_hash_block

__all__ = ["STREAM_HASH", "STREAM_WEIGHTED_HASH", "hash_block", "hash_route", "slot_keys", "weighted_hash_block"]
