"""Run a stage's tasks on Ray: one Ray task per pipeline task (an input part, a domain ...).

The driver submits every unfinished task, writes each task's marker as soon as its result arrives
(the same markers as the local and SLURM executors, so a run can start on one and finish on another),
and fails naming every task that raised or lost its worker. `address=""` starts a local Ray
instance with `cpus` CPUs (or reuses the one this process already started); `"auto"` or
`"ray://host:10001"` joins an existing cluster. Tasks are not retried: a task that died on its
input would die again, and the rerun after a fix resumes from the markers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from megaqwen.data_pipeline.process_pool import TaskError

log = logging.getLogger("megaqwen.data_pipeline")


def _run_task(fn: Callable[[int], dict[str, Any]], task: int) -> tuple[int, dict[str, Any]]:
    import time

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    result = fn(task)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return task, result


def ensure_ray(address: str, cpus: int):
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("executor ray needs the ray package: pip install 'megaqwen[data]'") from e
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
        log.info("ray: %s", ray.cluster_resources())
    return ray


def run_on_ray(
    stage: str,
    todo: list[int],
    fn: Callable[[int], dict[str, Any]],
    cpus: int,
    on_done: Callable[[int, dict[str, Any]], None],
    describe: Callable[[int], str],
    address: str = "",
) -> None:
    ray = ensure_ray(address, cpus)
    remote = ray.remote(num_cpus=1, max_retries=0)(_run_task)
    fn_ref = ray.put(fn)
    pending = {remote.remote(fn_ref, t): t for t in todo}
    failures = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            task = pending.pop(ref)
            try:
                _, result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...: named below
                cause = getattr(e, "cause", None)  # a RayTaskError wraps the task's own exception
                if isinstance(cause, BaseException):
                    why = f"{type(cause).__name__}: {cause}"
                else:
                    why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                failures.append(f"task {task} of stage {stage!r} ({describe(task)}) failed on ray: {why}")
                continue
            on_done(task, result)
    if failures:
        raise TaskError(
            f"{len(failures)} task(s) of stage {stage!r} failed (finished tasks kept their markers; "
            "rerun to resume):\n" + "\n".join(failures)
        )
