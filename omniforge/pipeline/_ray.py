"""Connecting to Ray: an existing cluster (--ray-address / RAY_ADDRESS) or an in-process local one."""

from __future__ import annotations

import logging
import os

from omniforge.errors import ConfigError

log = logging.getLogger(__name__)

# Logical CPUs for a local cluster: teacher actors hold their CPUs for the whole job, so a 2-core laptop
# still needs room for decode and write tasks beside them. An actor's torch threads are its CPUs scaled to
# the cores the node really has (`_job.torch_threads`), so a lone teacher on 2 cores gets 2 threads.
MIN_LOCAL_CPUS = 4


def ensure_ray(address: str | None = None) -> None:
    """Initialize Ray once per process: `address` (or RAY_ADDRESS) when given, else a local cluster."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = logging.getLogger("omniforge").getEffectiveLevel() > logging.INFO
    # Ray Data logs every dataset execution at INFO; omniforge prints its own progress and summary.
    # Errors reach the caller as exceptions (the CLI prints one line), so Ray Data's own copy stays quiet.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL if quiet else logging.INFO)
    # Worker output (tracebacks of failed samples are recorded in _status anyway) stays in Ray's session
    # logs unless omniforge runs with --verbose.
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR if quiet else logging.INFO,
                  log_to_driver=not quiet)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": a new cluster of this process's own, even when another Ray cluster runs on this machine
            num_cpus = max(MIN_LOCAL_CPUS, os.cpu_count() or 1)
            # A job with every teacher runs a few dozen actor processes on a small machine by design; Ray's
            # raylet warns past 4x its startup concurrency (the CPU count), so the local cluster may start
            # more at once (a user's RAY_worker_maximum_startup_concurrency wins).
            os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(16, 4 * num_cpus)))
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    except ConnectionError as e:
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {e}; check --ray-address / RAY_ADDRESS "
                          f"or leave both unset to start a local cluster") from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # omniforge draws one progress bar for the whole job
    ctx.execution_options.preserve_order = False
    ctx.execution_options.verbose_progress = False


def cluster_gpus() -> float:
    import ray
    import ray.data

    return float(ray.cluster_resources().get("GPU", 0))
