"""Running a sweep's units: a local process pool (default, nothing to start) or a Ray cluster.

Both backends run the same function (:func:`pgvar.experiments.unit.run_unit_safely`) on the same unit specs and
write the same results folder, so the backend is a choice, not a different code path: units are idempotent
(a finished one is skipped, an interrupted one resumes from its checkpoint), and a failed unit is reported with its
error while the others go on.

Ray: ``backend="ray"`` connects to an existing cluster with ``address`` (``"auto"`` or ``"ray://host:10001"``) or
starts a local one with ``workers`` CPUs. Each unit asks for one CPU. Workers write checkpoints and results into
the results folder, so on a cluster of several machines it must be a shared filesystem (NFS, a mounted bucket);
the driver also writes each returned ``result.json``, so the results land on the driver's machine even without one
(but an interrupted unit then resumes from scratch on another machine).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgvar._validation import check_choice, check_positive
from pgvar.experiments.config import SweepConfig, UnitSpec
from pgvar.experiments.unit import read_json, run_unit_safely, unit_folder, write_json

__all__ = ["BACKENDS", "SweepProgress", "map_jobs", "run_sweep"]

BACKENDS = ("local", "ray")


@dataclasses.dataclass
class SweepProgress:
    """Where a sweep stands; passed to the ``progress`` callback after every change."""

    total: int
    done: int = 0
    skipped: int = 0
    failed: int = 0
    running: int = 0
    started: float = dataclasses.field(default_factory=time.time)
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def eta_seconds(self) -> float | None:
        """Remaining time if the remaining units take as long as the finished ones did (``None`` before one)."""
        ran = self.done - self.skipped
        if ran <= 0:
            return None
        elapsed = time.time() - self.started
        return elapsed / ran * (self.total - self.finished)


def _is_finished(unit: UnitSpec, results: Path) -> bool:
    path = unit_folder(results, unit) / "result.json"
    return path.exists() and read_json(path).get("digest") == unit.digest


def run_sweep(
    config: SweepConfig,
    results: str | os.PathLike[str],
    *,
    backend: str = "local",
    workers: int | None = None,
    address: str | None = None,
    progress: Callable[[SweepProgress], None] | None = None,
) -> SweepProgress:
    """Run every unit of ``config`` that has no result yet in ``results``.

    :param config: the sweep
    :param results: the results folder (created; ``sweep.json`` records the config)
    :param backend: ``"local"`` (a process pool on this machine) or ``"ray"``
    :param workers: parallel units (default: the machine's CPU count; for Ray, the CPUs of a local cluster)
    :param address: Ray only: an existing cluster's address; ``None`` starts a local one
    :param progress: called with a :class:`SweepProgress` after every finished unit
    :return: the final progress (``failures`` lists the failed units with their errors)
    """
    check_choice("backend", backend, BACKENDS)
    if workers is not None:
        workers = int(check_positive("workers", workers, integer=True))
    if address is not None and backend != "ray":
        raise ValueError(
            f"address is for backend='ray' only, got backend={backend!r} with address={address!r}"
        )
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "sweep.json", {"name": config.name, "config": dataclasses.asdict(config)})
    units = config.units()
    state = SweepProgress(total=len(units))
    pending = []
    for unit in units:
        if _is_finished(unit, results):
            state.done += 1
            state.skipped += 1
        else:
            pending.append(unit)
    if progress is not None:
        progress(state)
    if not pending:
        return state

    n_workers = workers or os.cpu_count() or 1
    state.running = min(n_workers, len(pending))

    def record(_: int, result: dict[str, Any]) -> None:
        state.running = min(n_workers, len(pending) - (state.finished - state.skipped) - 1)
        if result.get("status") == "done":
            state.done += 1
            folder = results / "units" / result["unit_id"]
            if not (folder / "result.json").exists():  # a Ray worker on another machine
                folder.mkdir(parents=True, exist_ok=True)
                write_json(folder / "result.json", result)
        else:
            state.failed += 1
            state.failures.append(result)
        if progress is not None:
            progress(state)

    jobs = [(unit.to_json(), str(results)) for unit in pending]
    map_jobs(run_unit_safely, jobs, backend=backend, workers=n_workers, address=address, on_result=record)
    return state


def map_jobs(
    function: Callable[..., Any],
    jobs: list[tuple[Any, ...]],
    *,
    backend: str,
    workers: int,
    address: str | None = None,
    on_result: Callable[[int, Any], None],
) -> None:
    """Run ``function(*job)`` for every job on ``backend`` and call ``on_result(index, result)`` as each finishes.

    ``"local"``: a pool of ``spawn`` processes (a forked torch/OpenMP runtime can deadlock, and spawn behaves the
    same on every OS). ``"ray"``: one CPU per job on the cluster at ``address``, or on a local Ray started with
    ``workers`` CPUs (and shut down afterwards). ``function`` must be importable by the workers.
    """
    if backend == "local":
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            futures = {pool.submit(function, *job): index for index, job in enumerate(jobs)}
            for future in concurrent.futures.as_completed(futures):
                on_result(futures[future], future.result())
        return
    try:
        import ray
    except ImportError:
        raise ValueError("backend='ray' needs Ray: pip install 'pgvar[sweep]' (or 'ray>=2.9')") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(function)
        refs = {remote.remote(*job): index for index, job in enumerate(jobs)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            on_result(refs[ready[0]], ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()
