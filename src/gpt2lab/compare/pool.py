"""Running the comparison's jobs: a pool of single-thread worker processes, longest job first among those
whose dependencies are done, each job's result cached in its run directory.

Two one-thread processes do far more work on two cores than one two-thread process (the small matrices of
these models scale poorly, and a spinning OpenMP thread stalls whenever its partner is descheduled). A job
is a pure function of its parameters: its result is stored in ``job.json`` beside the key it was computed
for (its parameters and its dependencies' keys), so a rerun with the same settings reuses it and an
interrupted comparison resumes per job (an interrupted training run resumes from its checkpoint).
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import ctypes
import json
import multiprocessing
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gpt2lab import files
from gpt2lab.errors import GPT2LabError

RUNS = "runs"  # job directories: OUT/runs/<job name>
JOB_JSON = "job.json"  # {"key": ..., "value": ...} of a finished job
STARTED_JSON = "job_started.json"  # the key of the job started in this directory, until it finishes
LOG = "log.txt"  # what the job printed (the training loop's messages)
PR_SET_PDEATHSIG = 1  # Linux prctl option: the signal this process gets when its parent dies
Execute = Callable[[str, dict, Path, Path], dict]  # (kind, params, run directory, output root) -> result


@dataclass
class Job:
    """One unit of work: ``kind`` names the function that runs it, ``params`` everything its result depends
    on. ``name`` is its directory under the runs root; ``piece`` the plan row it counts in; ``cost`` its
    estimated seconds (scheduling and the plan); ``deps`` the jobs whose results it reads (part of its
    cache key); ``after`` jobs it only waits for (not part of it); ``shape`` the model shape its cost is
    estimated from."""

    name: str
    kind: str
    params: dict
    piece: str
    shape: str = ""
    cost: float = 0.0
    deps: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    steps: int = 0
    tokens: int = 0

    @property
    def waits_for(self) -> tuple[str, ...]:
        """Every job that must finish before it starts: those it reads and those it only follows."""
        return self.deps + self.after


def job_keys(jobs: list[Job]) -> dict[str, dict]:
    """Each job's cache key: its kind and parameters, and its dependencies' keys (so a changed language
    model invalidates the evaluations made of it)."""
    by_name = {job.name: job for job in jobs}
    keys: dict[str, dict] = {}

    def key(name: str) -> dict:
        if name not in keys:
            job = by_name[name]
            raw = {"kind": job.kind, "params": job.params, "deps": {d: key(d) for d in job.deps}}
            keys[name] = json.loads(json.dumps(raw))  # as it reads back from JSON
        return keys[name]

    for job in jobs:
        key(job.name)
    return keys


def cached(run_dir: Path, key: dict) -> dict | None:
    """The stored result of the job with ``key`` in ``run_dir``, or None."""
    try:
        stored = json.loads((run_dir / JOB_JSON).read_text())
    except (OSError, ValueError):
        return None
    return stored["value"] if stored.get("key") == key else None


def run_job(execute: Execute, kind: str, params: dict, run_dir: str, key: dict, root: str) -> dict:
    """Run one job in ``run_dir`` (kept if the same job started there before, so training resumes; cleared
    otherwise) with its messages going to ``log.txt`` there, record its CPU and wall seconds and the machine,
    and store the result beside its key."""
    path = Path(run_dir)
    try:
        same = json.loads((path / STARTED_JSON).read_text()) == key
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        files.write_json(path / STARTED_JSON, key)
    cpu, wall = time.process_time(), time.perf_counter()
    with open(path / LOG, "a", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        value = execute(kind, params, path, Path(root))
    value |= {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall, "machine": machine()}
    files.write_text(path / JOB_JSON, json.dumps({"key": key, "value": value}) + "\n")
    (path / STARTED_JSON).unlink(missing_ok=True)  # job.json holds the key now: nothing left to resume
    return value


def machine() -> str:
    """What a job runs on: the CPU model, and the GPU where one is visible."""
    import torch

    from gpt2lab import kernels

    cpu = f"CPU: {kernels.cpu_model()}"
    return f"{torch.cuda.get_device_name()} ({cpu})" if torch.cuda.is_available() else cpu


def _init_worker(threads: int | None) -> None:
    """A worker: one torch thread on the CPU; Ctrl-C is left to the parent (a training run still stops at its
    next step and checkpoints, since the training loop installs its own handler); killed with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if threads:
        import torch

        torch.set_num_threads(threads)


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this process when the one that started it dies, however it dies (a
    kill, a timeout): a pool's worker would otherwise wait forever on its queue. Its training resumes
    from its last checkpoint on a rerun. Elsewhere nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl: not Linux
        pass


def run_jobs(
    jobs: list[Job], root: Path, execute: Execute, workers: int, threads: int | None, progress: bool
) -> dict[str, dict]:
    """Every job's result: cached ones read back, the others run in ``root/runs/<name>`` on ``workers``
    processes (spawned, each with ``threads`` torch threads; in this process when ``workers`` is 1), longest
    first among the ready ones."""
    keys = job_keys(jobs)
    results = {job.name: r for job in jobs if (r := cached(root / RUNS / job.name, keys[job.name])) is not None}
    pending = [job for job in jobs if job.name not in results]
    bar = tqdm(total=len(jobs), initial=len(results), desc="compare", unit="job", disable=not progress)
    try:
        if workers <= 1:
            for job in _order(pending, results):
                bar.set_description(job.name)
                args = (execute, job.kind, job.params, str(root / RUNS / job.name), keys[job.name], str(root))
                with _named_on_failure(job):
                    results[job.name] = run_job(*args)
                bar.update()
        else:
            _run_pool(pending, results, keys, root, execute, workers, threads, bar)
    finally:
        bar.close()
    return results


def _order(pending: list[Job], done: dict) -> list[Job]:
    """The in-process order: longest first among the jobs whose dependencies are done."""
    order, finished, todo = [], set(done), list(pending)
    while todo:
        ready = [j for j in todo if set(j.waits_for) <= finished] or todo[:1]
        job = max(ready, key=lambda j: j.cost)
        order.append(job)
        todo.remove(job)
        finished.add(job.name)
    return order


def _run_pool(pending, results, keys, root, execute, workers, threads, bar) -> None:
    context = multiprocessing.get_context("spawn")  # forking a process that has run torch can deadlock
    pool = futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,))
    running: dict[futures.Future, Job] = {}
    try:
        while pending or running:
            ready = sorted((j for j in pending if all(d in results for d in j.waits_for)), key=lambda j: -j.cost)
            for job in ready[: workers - len(running)]:
                pending.remove(job)
                args = (execute, job.kind, job.params, str(root / RUNS / job.name), keys[job.name], str(root))
                running[pool.submit(run_job, *args)] = job
            if not running:
                raise RuntimeError(f"compare jobs wait on jobs that never run: {[j.name for j in pending]}")
            bar.set_description(", ".join(sorted(j.name for j in running.values())))
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                if isinstance(future.exception(), futures.process.BrokenProcessPool):  # every running job's
                    names = ", ".join(sorted([job.name, *(j.name for j in running.values())]))  # says so
                    raise GPT2LabError(
                        f"a compare worker process died (killed, or out of memory) while these jobs ran: {names}; "
                        "finished jobs are kept: run the same command again to resume"
                    )
                with _named_on_failure(job):
                    results[job.name] = future.result()
                bar.update()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # running jobs finish (training ones stop and checkpoint)
        raise
    pool.shutdown()


@contextlib.contextmanager
def _named_on_failure(job: Job) -> Iterator[None]:
    """Name ``job`` on stderr where it raises an error (its one-line message follows from the command
    line); not where it was interrupted."""
    try:
        yield
    except Exception:
        print(f"\ncompare job {job.name} failed", file=sys.stderr)
        raise


def makespan(jobs: list[Job], workers: int) -> float:
    """Estimated seconds until the last job ends when ``workers`` run them as ``run_jobs`` does."""
    free = [0.0] * max(1, workers)
    finish: dict[str, float] = {}
    for job in _order(jobs, {}):
        start = max([min(free), *(finish.get(d, 0.0) for d in job.waits_for)])
        slot = free.index(min(free))
        finish[job.name] = free[slot] = start + job.cost
    return max(finish.values(), default=0.0)
