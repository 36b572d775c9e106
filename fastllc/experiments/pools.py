"""Where a sweep's tasks run: this process, local worker processes, or a Ray cluster.

A pool takes tasks (``submit(key, function, args, gpus)``) and hands back the next one that ended
(``next() -> (key, (outcome, value, seconds))``, what the task returned); a task that raised or whose
worker died more often than ``retries`` allows comes back as ("failed", a one-line reason, None). ``shared``:
whether the tasks see the driver's files (local processes do; Ray tasks may run on other machines).
"""

from __future__ import annotations

import os
from typing import Callable

from ..errors import FastLLCError

RAY_MISSING = "--executor ray needs Ray, an optional extra: pip install -e '.[ray]'"


class InProcessPool:
    """Runs each task in this process when its result is asked for, in the order they were submitted."""

    shared = True

    def __init__(self):
        self.pending: list[tuple[object, Callable, tuple]] = []

    def submit(self, key, fn, args, gpus: float = 0) -> None:
        self.pending.append((key, fn, args))

    def busy(self) -> int:
        return len(self.pending)

    def next(self) -> tuple[object, tuple[str, object]]:
        key, fn, args = self.pending.pop(0)
        return key, fn(*args)

    def close(self) -> None:
        self.pending.clear()


class ProcessPool:
    """``workers`` spawned processes on this machine; a task whose process dies is resubmitted to a new
    pool, up to ``retries`` times (a dead worker breaks a ``ProcessPoolExecutor`` and every task in it)."""

    shared = True

    def __init__(self, workers: int, retries: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.context, self.workers, self.retries = multiprocessing.get_context("spawn"), workers, retries
        self.factory = ProcessPoolExecutor
        self.executor = self.factory(workers, mp_context=self.context)
        self.futures: dict = {}  # future -> (key, fn, args, attempt)
        self.given_up: list = []  # (key, outcome) of tasks whose process died more than ``retries`` times

    def submit(self, key, fn, args, gpus: float = 0, attempt: int = 0) -> None:
        self.futures[self.executor.submit(fn, *args)] = (key, fn, args, attempt)

    def busy(self) -> int:
        return len(self.futures) + len(self.given_up)

    def next(self):
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        while not self.given_up:
            done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
            for future in done:
                if not isinstance(future.exception(), BrokenProcessPool):
                    key, *_ = self.futures.pop(future)
                    if future.exception() is not None:
                        return key, ("failed", f"{type(future.exception()).__name__}: {future.exception()}", None)
                    return key, future.result()
            # a worker died: every task still in the broken pool runs again in a fresh one
            lost = [self.futures.pop(f) for f in list(self.futures)
                    if not f.done() or isinstance(f.exception(), BrokenProcessPool)]
            self.executor.shutdown(wait=True, cancel_futures=True)  # its processes are gone already
            self.executor = self.factory(self.workers, mp_context=self.context)
            for key, fn, args, attempt in lost:
                if attempt < self.retries:
                    self.submit(key, fn, args, attempt=attempt + 1)
                else:
                    self.given_up.append((key, ("failed", f"its worker process died {attempt + 1} times (a script "
                                                          "that runs jobs in workers needs if __name__ == '__main__':)", None)))
        return self.given_up.pop(0)

    def close(self) -> None:
        if not self.futures:  # all done: let the processes exit on their own
            self.executor.shutdown(wait=True)
            return
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:  # an interrupted driver does not wait for the jobs in flight
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)


class RayPool:
    """One Ray task per job; Ray reruns a task whose worker died, up to ``retries`` times."""

    shared = False

    def __init__(self, address: str | None, workers: int | None, retries: int, cpus: float, quiet: bool):
        import logging

        try:
            import ray
        except ImportError:
            raise FastLLCError(RAY_MISSING) from None
        self.ray, self.retries, self.cpus, self.refs = ray, retries, cpus, {}
        self.started = not ray.is_initialized()
        if self.started:
            address = address or os.environ.get("RAY_ADDRESS") or None
            options = dict(logging_level=logging.ERROR if quiet else logging.WARNING, log_to_driver=not quiet)
            if address is None:  # a Ray instance of our own, for this run
                options.update(num_cpus=workers, include_dashboard=False)
            else:
                _check_reachable(address)
            # Ray's notice that the instance it starts uses token authentication is not something a user of a
            # private, per-sweep instance can act on: quieted for that instance only, never for a cluster joined
            token_notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
            level = token_notice.level
            if address is None:
                token_notice.setLevel(logging.ERROR)
            try:
                ray.init(address=address, **options)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise FastLLCError(f"cannot join the Ray cluster at {address}: {str(err).splitlines()[0]} "
                                   "(start one with `ray start --head`, or give no --address for a local one)") from None
            finally:
                token_notice.setLevel(level)
        self.remote = {}
        self.puts: dict[str, object] = {}

    def require_gpus(self, needing: list[str]) -> None:
        """Jobs on CUDA ask for a GPU share: refuse now, not hang, on a cluster without GPUs."""
        if needing and not self.ray.cluster_resources().get("GPU", 0):
            raise FastLLCError(f"job {needing[0]} runs on CUDA, but the Ray cluster has no GPU; start its nodes "
                               "on GPU machines (ray start detects their GPUs), or run the job on the CPU")

    def put(self, name: str, files) -> object:
        """One object-store copy of a run's files per run, shared by every job that needs it."""
        if name not in self.puts:
            self.puts[name] = self.ray.put(files)
        return self.puts[name]

    def submit(self, key, fn, args, gpus: float = 0) -> None:
        if fn not in self.remote:
            self.remote[fn] = self.ray.remote(fn)
        task = self.remote[fn].options(num_cpus=self.cpus, num_gpus=gpus, max_retries=self.retries,
                                       retry_exceptions=False)
        self.refs[task.remote(*args)] = key

    def busy(self) -> int:
        return len(self.refs)

    def next(self):
        (ref,), _ = self.ray.wait(list(self.refs), num_returns=1)
        key = self.refs.pop(ref)
        try:
            return key, self.ray.get(ref)
        except self.ray.exceptions.RayError as err:  # a worker or node died more often than retries allow
            return key, ("failed", f"{type(err).__name__} after {self.retries} retries: "
                                   f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}", None)

    def close(self) -> None:
        for ref in list(self.refs):  # an interrupted driver: queued jobs never start, running ones are interrupted
            self.ray.cancel(ref)
        self.refs.clear()
        if self.started:
            self.ray.shutdown()


def _check_reachable(address: str, seconds: float = 10) -> None:
    """Refuse at once a host:port where nothing listens (ray.init would retry it for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not host or not port.isdigit():
        return  # "auto" (ray finds the local cluster or says none runs), ray:// clients: Ray's own check
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as err:
        raise FastLLCError(f"cannot join the Ray cluster at {address}: nothing answers there "
                           f"({(err.strerror or str(err)).lower()}); start its head with `ray start --head`, "
                           "or give no --address for a local Ray instance") from None


def open_pool(executor: str, workers: int | None, address: str | None, retries: int, cpus: float, quiet: bool):
    if executor == "ray":
        return RayPool(address, workers, retries, cpus, quiet)
    return ProcessPool(workers, retries) if workers else InProcessPool()
