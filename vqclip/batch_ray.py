"""``vqclip batch --ray``: a batch's jobs on a Ray cluster, one actor per GPU (the ``ray`` extra).

Each actor loads the models once and runs jobs as :func:`vqclip.batch.run_job` does in-process,
writing the same files, so the outputs, ids and the commit marker (``meta/<id>.json``, written
last) are the same wherever a job ran. Ray schedules: an actor that dies is restarted, and the
job it was running is retried on it (``max_retries``). A job retried after its marker was
written finds it and does nothing, and the manifest is rebuilt from ``meta/`` at the end, so
every finished job has one output and one manifest line.

``address="local"`` starts a single-node cluster for this run: its listeners on the loopback
only, no dashboard, no usage statistics. Any other address (``auto`` honours ``RAY_ADDRESS``,
as ``ray job submit`` sets it) joins an existing cluster, whose nodes need vqclip installed and
the batch folder on a file system they share.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from .batch import BatchReport, Job, begin, rebuild_manifest, record_outcome, run_job

__all__ = ["actor_options", "connect", "run_on_ray"]

log = logging.getLogger("vqclip")

# the object store holds only the jobs' small records
_OBJECT_STORE = 200 * 2**20


class _Worker:
    """One actor: the batch's models, loaded once."""

    def __init__(self, config: dict, threads: int | None):
        import torch

        from .generator import Generator

        if threads:
            torch.set_num_threads(threads)
        self.gen = Generator.load(config)
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def run(self, job: Job, out: str) -> dict[str, Any]:
        """The job's record (None if it was finished already), or its error: a failed job is
        an answer, not a crash for Ray to retry."""
        from .generator import GenerationError

        try:
            return {"record": run_job(self.gen, job, out, worker=self.name)}
        except (GenerationError, ValueError, OSError) as e:
            return {"error": str(e)}


def connect(address: str):
    """Ray, started for ``address``: for a local cluster, every listener on 127.0.0.1 (Ray binds
    all interfaces otherwise; read when ray is first imported), no dashboard and no usage
    statistics. The caller calls ``ray.shutdown()``.

    Raises:
        ValueError: Ray is not installed (one line naming the extra).
    """
    if address == "local":
        if "ray" in sys.modules:
            log.warning("ray was imported before vqclip started its local cluster: its "
                        "listeners may bind every interface, not only the loopback")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
    except ImportError:
        raise ValueError('--ray needs Ray: pip install "vqclip[ray]"') from None
    local = dict(include_dashboard=False, object_store_memory=_OBJECT_STORE) if address == "local" else {}
    ray.init(address=address, log_to_driver=False, **local)
    return ray


def actor_options(ray, workers: int | None) -> tuple[int, dict[str, float], int | None]:
    """How many actors (``workers``, default one per GPU of the cluster, else one), the
    resources of each (a GPU where the cluster has them, else a share of the CPUs) and the torch
    threads of each on CPUs (None on GPUs)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = workers or max(gpus, 1)
    cpus = ray.cluster_resources().get("CPU", 1)
    # fractional CPUs: actors that hold whole CPUs on a small node starve Ray's own tasks
    options = dict(num_gpus=1, num_cpus=0.5) if gpus else dict(num_cpus=min(0.5, cpus / n))
    return n, options, None if gpus else max(1, int(cpus) // n)


def run_on_ray(common, jobs: list[Job], out: str | Path, address: str = "local",
               workers: int | None = None, max_retries: int = 3, progress: bool = False
               ) -> BatchReport:
    """Run the unfinished ``jobs`` on Ray actors that load ``common``'s models: ``workers``
    actors (default: one per GPU of the cluster, else one), each with one GPU where the cluster
    has them, else a share of the CPUs.

    Raises:
        ValueError: Ray is not installed (one line naming the extra).
    """
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    todo, report = begin(out, jobs)
    if not todo:
        return report
    ray = connect(address)
    try:
        n, options, threads = actor_options(ray, workers)
        actor = ray.remote(_Worker).options(max_restarts=-1, max_task_retries=max_retries, **options)
        config = OmegaConf.to_container(common)
        idle = [actor.remote(config, threads) for _ in range(min(n, len(todo)))]
        queue, running = list(reversed(todo)), {}
        bar = tqdm(total=len(todo), desc="jobs", unit="job", disable=not progress)
        while queue or running:
            while idle and queue:
                a, job = idle.pop(), queue.pop()
                running[a.run.remote(job, str(out))] = (a, job)
            [ready], _ = ray.wait(list(running), num_returns=1)
            a, job = running.pop(ready)
            idle.append(a)
            try:
                record_outcome(out, report, job, **ray.get(ready))
            except ray.exceptions.RayError as e:  # its actor died more often than retried
                record_outcome(out, report, job, error=f"{type(e).__name__}: {e}".splitlines()[0],
                               attempts=max_retries + 1)
            bar.update()
        bar.close()
    finally:
        ray.shutdown()
    rebuild_manifest(out)  # a job retried after its marker was written has no line yet
    return report
