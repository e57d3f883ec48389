"""Where the models of a fleet run: here one after another, here N at a time, or one Ray task each.

Every backend runs the same unit, `worker.run_one(entry, job)`, and hands each row to
`on_result` as soon as that model is done (the CLI rewrites fleet.json and moves the progress bar
there). The work of a model happens in its worker subprocess, so threads are enough for `--jobs N`:
N threads each wait on one worker process.

Ray (`ray_address`): "local" starts a private Ray instance in this process with `--jobs` CPUs
(what the tests and the benchmark use); "auto" joins the cluster RAY_ADDRESS or `ray start` names;
anything else is a cluster address (`ray://head:10001`, `head:6379`). One task per model asks for
1 CPU, 1 GPU when the scan runs on CUDA, and 3 x the checkpoint's bytes + 1 GiB of memory, so Ray
places no more models on a node than fit. A task's worker that dies (node lost, OOM-killed,
`ray.cancel`) becomes that model's error row; no task is retried by Ray (the next fleet run is the
retry, and it skips everything already done).
"""

from __future__ import annotations

import shutil
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable

from achilles_guard.errors import EXIT_RUNTIME, UsageError, first_line
from achilles_guard.fleet.inventory import ModelEntry
from achilles_guard.fleet.worker import Job, ModelResult, reset_stop, run_one, terminate_all

__all__ = ["run", "task_memory", "sweep_staging", "RAY_HINT"]

RAY_HINT = "the Ray backend needs Ray: pip install 'achilles-guard[ray]'"
_GIB = 1 << 30


def task_memory(entry: ModelEntry) -> int:
    """Bytes of memory one model's task reserves: the weights as loaded, a noisy copy and activations
    (about 3 x the checkpoint's bytes), plus 1 GiB for Python, torch and the tokenizer."""
    return 3 * entry.weight_bytes + _GIB


def sweep_staging(out: Path) -> int:
    """Remove half-written model outputs left by a killed run (hidden `.<id>.staging-*` / `.old-*`)."""
    n = 0
    if out.is_dir():
        for p in out.iterdir():
            if p.name.startswith(".") and (".staging-" in p.name or ".old-" in p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def run(models: Iterable[ModelEntry], job: Job, *, jobs: int = 1, ray_address: str | None = None,
        device: str = "auto", on_result: Callable[[ModelResult], None] = lambda r: None) -> list[ModelResult]:
    models = list(models)
    reset_stop()
    if ray_address is not None:
        return _run_ray(models, job, ray_address, jobs, device, on_result)
    if jobs <= 1:
        results = []
        try:
            for entry in models:
                results.append(run_one(entry, job))
                on_result(results[-1])
        except BaseException:
            terminate_all()
            raise
        return results
    return _run_threads(models, job, jobs, on_result)


def _run_threads(models, job, jobs, on_result) -> list[ModelResult]:
    import os
    from dataclasses import replace

    job = replace(job, threads=max(1, (os.cpu_count() or 1) // jobs))  # Ray does the same for its tasks
    results = []
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="guard-fleet")
    try:
        pending = {pool.submit(run_one, entry, job) for entry in models}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                results.append(future.result())
                on_result(results[-1])
    except BaseException:
        for future in pending:
            future.cancel()
        terminate_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _ray_init(ray, address: str, jobs: int) -> bool:
    """Connect or start; True when this process started the instance (and so shuts it down)."""
    import logging
    import os

    quiet = dict(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    try:
        if address == "local" or (address == "auto" and not os.environ.get("RAY_ADDRESS")):
            ray.init(num_cpus=max(jobs, 1), **quiet)
            return True
        ray.init(address=None if address == "auto" else address, **quiet)
        return False
    except Exception as err:  # ConnectionError, RuntimeError, ValueError: one line, exit 2
        raise UsageError(f"--ray {address}: cannot start or reach Ray ({first_line(err)})") from None


def _run_ray(models, job, address, jobs, device, on_result) -> list[ModelResult]:
    import contextlib
    import sys

    try:
        import ray
    except ImportError:
        raise UsageError(RAY_HINT) from None
    # Ray's driver prints its own notices ("(raylet) A worker died...") on stdout, which carries only
    # the result: while Ray runs, they go to stderr
    with contextlib.redirect_stdout(sys.stderr):
        return _ray_tasks(ray, models, job, address, jobs, device, on_result)


def _ray_tasks(ray, models, job, address, jobs, device, on_result) -> list[ModelResult]:
    started = _ray_init(ray, address, jobs)
    task = ray.remote(max_retries=0)(run_one)
    gpus = 1 if device.startswith("cuda") else 0
    refs = {}
    results = []
    try:
        for entry in models:
            ref = task.options(num_cpus=1, num_gpus=gpus, memory=task_memory(entry),
                               name=f"guard-fleet:{entry.id}").remote(entry, job)
            refs[ref] = entry
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                entry = refs.pop(ref)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayError as err:  # the task's worker died, the node went away
                    row = ModelResult(entry.id, str(entry.path), "crashed", EXIT_RUNTIME, None, 0.0, False,
                                      f"ray task failed: {type(err).__name__}: {first_line(err)}"[:500])
                results.append(row)
                on_result(row)
    except BaseException:
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # best effort while interrupted
                pass
        raise
    finally:
        if started:
            ray.shutdown()
    return results
