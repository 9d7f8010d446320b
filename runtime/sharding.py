"""Which share of a list this process takes: ``--shard-index/--num-shards`` or a SLURM array's
variables, so one job array splits flow extraction or proposal computation without any
coordination (shard ``i`` of ``n`` takes every ``n``-th item from ``i``)."""
from __future__ import annotations

import os
from typing import Sequence, TypeVar

from runtime.errors import ConfigError

T = TypeVar("T")


def shard_from_env(shard_index: int | None = None, num_shards: int | None = None) -> tuple[int, int]:
    """Explicit values win; otherwise a SLURM array task's position (``SLURM_ARRAY_TASK_ID`` minus
    ``SLURM_ARRAY_TASK_MIN``) among ``SLURM_ARRAY_TASK_COUNT``; otherwise ``(0, 1)``."""
    env = os.environ
    in_array = "SLURM_ARRAY_TASK_ID" in env
    if num_shards is None:
        num_shards = int(env.get("SLURM_ARRAY_TASK_COUNT", "1")) if in_array else 1
    if shard_index is None:
        shard_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0")) if in_array else 0
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"shard index {shard_index} is outside 0..{num_shards - 1} (num shards {num_shards})")
    return shard_index, num_shards


def shard(items: Sequence[T], shard_index: int, num_shards: int) -> list[T]:
    """Shard ``shard_index`` of ``num_shards``: every ``num_shards``-th item from ``shard_index``."""
    return list(items[shard_index::num_shards])
