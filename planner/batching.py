"""Multi-query batching: how many occlusion queries run together in one batched delta plan.

Every query of a batch shares the materialized views; the per-query cost is the buffers of
its largest step (read-in context + output patch, or the stitched full tensor after a
global-context layer). The batch is the largest that keeps those buffers within the memory
budget, capped (beyond ~128 queries the GEMMs are already large; bigger batches only add
memory) and never larger than the number of queries.
"""

from __future__ import annotations

DEFAULT_MEMORY_BUDGET = 512 << 20  # bytes of per-batch buffers
MAX_BATCH = 128


def choose_batch(bytes_per_query: int, n_queries: int, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 max_batch: int = MAX_BATCH) -> int:
    """Batch size under a memory budget.

    >>> choose_batch(4 << 20, 2704, 512 << 20)
    128
    >>> choose_batch(16 << 20, 2704, 512 << 20)
    32
    >>> choose_batch(16 << 20, 5, 512 << 20)
    5
    """
    if memory_budget <= 0:
        raise ValueError(f"memory budget must be positive, got {memory_budget}")
    fit = memory_budget // max(bytes_per_query, 1)
    return int(max(1, min(n_queries, fit, max_batch)))
