"""How every job gets its Ray: the one this process holds, the cluster ``RAY_ADDRESS`` names, or a local one.

    started = connect_ray(cpus=4, dashboard=True)
    try:
        ...                      # Ray Data, Ray Train, actors
    finally:
        if started:
            ray.shutdown()

The preprocessing, training and evaluation jobs and the main job all connect through ``connect_ray``, so a local
Ray means the same thing whichever started it, and ``RAY_ADDRESS`` (``ray job submit``, ``ray start``, a test's
cluster) always wins over local sizing.
"""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # the jobs' blocks are small (decoded clips, batches of keys); Ray's default
# is 30% of memory, which on a shared machine takes memory the decoders and the training workers need
START_ATTEMPTS = 3


def connect_ray(*, cpus: int = 0, need_cpus: float = 0, object_store_bytes: int = 0, dashboard: bool = False) -> bool:
    """Connect this process to Ray; True when this call connected it (the caller then calls ``ray.shutdown()``).

    - Already connected: nothing is done, False (the connection belongs to whoever made it).
    - ``RAY_ADDRESS`` set: join that cluster, whose resources decide; True (shutting down only disconnects).
    - Otherwise start a local Ray advertising ``cpus`` CPUs (0: every core), raised to ``need_cpus`` when the
      workers to be placed ask for more logical CPUs than that (2 training workers of 1.5 CPUs on 2 cores), with an
      object store of
      ``object_store_bytes`` (default ``LOCAL_OBJECT_STORE_BYTES``), with the dashboard when ``dashboard`` (Ray
      Train needs it: it serves the State API that Train's placement-group cleaner polls every second, and without
      it the cleaner logs a warning per poll and never exits); True.

    Ray gives a starting raylet a fixed 30 s to register and then raises a bare ``Exception``; on a machine busy with
    other work that can happen once, and a second start usually succeeds: up to ``START_ATTEMPTS`` starts.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return True
    local_cpus = max(cpus or os.cpu_count() or 1, math.ceil(need_cpus))
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=local_cpus, object_store_memory=object_store_bytes or LOCAL_OBJECT_STORE_BYTES,
                     include_dashboard=dashboard)  # fmt: skip
            break
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception; re-raised after the last attempt
            ray.shutdown()
            if attempt == START_ATTEMPTS:
                raise
            log.warning("Ray did not start (%s); trying again (%d of %d)", err, attempt + 1, START_ATTEMPTS)
    log.info("started a local Ray with %d CPUs (set RAY_ADDRESS to use a cluster)", local_cpus)
    return True
