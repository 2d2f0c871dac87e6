"""One job pool for the batch commands (`marlin extract`, `marlin prepare`): bounded, ordered or not, crash-tolerant.

:func:`run_jobs` maps a function over items either in this process (``workers <= 0``) or in a pool of *spawned*
worker processes (never forked: forking a process that holds torch / mediapipe threads can deadlock the child). It
keeps at most ``max_in_flight`` jobs submitted but not yet handed back, so what the jobs leave on disk or in memory
stays bounded however long the input list is, and yields each item with its outcome, in input order or as completed.

A worker that dies (killed, out of memory, a crash in native code) breaks a :class:`ProcessPoolExecutor` and fails
every job it still held, and nothing says which one killed it. Instead of aborting the batch (or failing innocent
jobs), the held jobs that had not finished are run again one at a time in a fresh pool, so only the job that really
kills its worker ends as :class:`WorkerDied`; then the remaining items continue in parallel. (The price, paid only
after a crash: at most ``max_in_flight`` jobs run serially.) Jobs that *raise* are not caught: the batch functions
return their failures as values.

Every worker is set up the same way (:func:`_start_worker`): it dies with the parent (a killed run leaves no orphan
still writing) and runs one thread of torch and OpenCV (the workers are the parallelism).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["WorkerDied", "die_with_parent", "limit_threads", "run_jobs"]


@dataclass(frozen=True)
class WorkerDied:
    """The outcome of a job whose worker process died before returning; the caller turns it into a failed row."""

    message: str = "worker process died (killed, out of memory, or crashed)"


# ---- worker setup ----------------------------------------------------------------------------------------------------
def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a killed run leaves no orphan still writing.

    A no-op elsewhere. Exits at once if ``parent`` already died (nothing would deliver the signal any more).
    """
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)


def limit_threads(threads: int = 1) -> None:
    """Run torch (and OpenCV, when installed) with ``threads`` threads: N workers x all cores would oversubscribe."""
    import torch

    torch.set_num_threads(threads)
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(threads)


def _start_worker(parent: int, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
    """The initializer of every pool worker: die with the parent, one thread, then the caller's own set-up."""
    die_with_parent(parent)
    limit_threads(1)
    if initializer is not None:
        initializer(*initargs)


@dataclass(frozen=True)
class _Setup(Generic[T, R]):
    """What every pool of one :func:`run_jobs` call shares."""

    fn: Callable[[T], R]
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    parent: int

    def pool(self, workers: int) -> ProcessPoolExecutor:
        import multiprocessing as mp

        return ProcessPoolExecutor(
            workers,
            mp_context=mp.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self.parent, self.initializer, self.initargs),
        )


# ---- the pool --------------------------------------------------------------------------------------------------------
def run_jobs(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    ordered: bool = False,
    max_in_flight: int | None = None,
) -> Generator[tuple[T, R | WorkerDied], None, None]:
    """Yield ``(item, fn(item))`` for every item, computed here or in ``workers`` spawned processes.

    Args:
        fn: the job; with workers it must be picklable (a module-level function, or a ``functools.partial`` of one),
            and so must the items and results.
        items: read lazily, never more than ``max_in_flight`` ahead of what was yielded.
        workers: worker processes; ``<= 0`` runs every job inline, in this process, in input order (no set-up: the
            thread limits and ``initializer`` are for workers only).
        initializer, initargs: run once in every worker after the common set-up (see :func:`_start_worker`).
        ordered: yield in input order (a slow job holds back the ones after it) instead of as jobs complete.
        max_in_flight: jobs submitted but not yet yielded; default ``2 * workers`` (every worker busy while the caller
            handles a result, and what the jobs leave behind stays bounded).

    Yields:
        ``(item, result)``; the result is a :class:`WorkerDied` for a job that killed its worker process. An exception
        raised by ``fn`` propagates (and stops the batch). Closing the generator early cancels the jobs not started
        and waits for the running ones, so that no worker still writes once it returns.
    """
    if workers <= 0:
        for item in items:
            yield item, fn(item)
        return
    limit = 2 * workers if max_in_flight is None else max_in_flight
    if limit < 1:
        raise ValueError(f"max_in_flight must be >= 1, found {limit}")
    setup = _Setup(fn, initializer, initargs, os.getpid())
    source = enumerate(items)
    held: list[_Job[T, R]] | None = []
    while held is not None:  # one pass per pool: a worker's death ends the pass and breaks the pool
        held = yield from _pool_pass(setup, held, source, workers, limit, ordered)


_Job = tuple[int, T, Future[R]]  # (position in the input, item, its future)


def _pool_pass(
    setup: _Setup[T, R], held: list[_Job[T, R]], source: Iterator[tuple[int, T]], workers: int, limit: int,
    ordered: bool,
) -> Generator[tuple[T, R | WorkerDied], None, list[_Job[T, R]] | None]:  # fmt: skip
    """Run jobs in one fresh pool: first the ones a broken pool ``held``, then ``source`` until it runs dry.

    A held job that had finished is handed back as it is; one that had not is rerun *alone*, so that if its worker
    dies again it is the culprit: it becomes :class:`WorkerDied` and the rest waits for the next pool.

    Returns:
        None when ``source`` ran dry; else, a worker having died, the jobs still to hand back, in input order.
    """
    ex = setup.pool(workers)
    running: deque[_Job[T, R]] = deque()
    broken = False
    try:
        for k, (_, item, fut) in enumerate(held):
            if not fut.cancelled() and not isinstance(fut.exception(), BrokenProcessPool):
                yield item, fut.result()  # finished before the crash (or raised: propagate)
                continue
            try:
                result: R | WorkerDied = ex.submit(setup.fn, item).result()
            except BrokenProcessPool:
                broken, result = True, WorkerDied()
            yield item, result
            if broken:
                return held[k + 1 :]
        while True:
            while len(running) < limit and (nxt := next(source, None)) is not None:
                running.append((*nxt, ex.submit(setup.fn, nxt[1])))
            if not running:
                return None
            job = _next_done(running, ordered)
            try:
                result = job[2].result()
            except BrokenProcessPool:
                broken = True
                return sorted([job, *running], key=lambda j: j[0])
            yield job[1], result
    finally:  # a broken pool: wait for it to fail all its futures; a closed generator: drop the jobs not started
        ex.shutdown(wait=True, cancel_futures=not broken)


def _next_done(running: deque[_Job[T, R]], ordered: bool) -> _Job[T, R]:
    """Remove and return the next job to hand back: the oldest one (ordered), or the oldest completed one."""
    if not ordered:
        wait([fut for _, _, fut in running], return_when=FIRST_COMPLETED)
        for i, job in enumerate(running):
            if job[2].done():
                del running[i]
                return job
    return running.popleft()  # ordered: the caller blocks on its result
