"""Admission control for the server's request work, without Ray: bounded worker pools and a
budget of decoded pixels in flight.

- `BoundedPool`: a thread pool of its own with a queue limit. The Ingress runs requests that
  fetch images (URLs, files) in one pool and requests that only decode base64 in another, so a
  slow upstream can hold only fetch workers: it never delays a base64 request. Past
  `workers + queue` tasks admitted, `run` raises `Busy` at once (the server answers 503 with
  Retry-After) instead of queueing without bound.
- `PixelBudget`: decoded pixels (images and sampled video frames) that a replica holds at once,
  from decoding until the request's answer. A request reserves each image's pixels once its
  header is read, before the pixels are decoded; beyond the budget it waits up to `wait_s`
  for other requests to finish, then gets `Busy`.

    pool = BoundedPool("decode", workers=2, queue=32)
    with budget.lease() as lease:
        examples = await pool.run(to_examples, inputs, limits, sources, lease.reserve)
        ...  # classify; the pixels are released when the block ends
"""

from __future__ import annotations

import asyncio
import resource
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Busy(Exception):
    """The server is at a limit of concurrent work; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


class BoundedPool:
    """`workers` threads and at most `queue` tasks waiting for one."""

    def __init__(self, name: str, workers: int, queue: int) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"{name} pool: workers >= 1 and queue >= 0, got {workers}, {queue}")
        self.name, self.workers, self.capacity = name, workers, workers + queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"sav-{name}")
        self._lock = threading.Lock()
        self.admitted = 0  # running or waiting; counted down when the thread is done
        self.refused = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self.admitted >= self.capacity:
                self.refused += 1
                raise Busy(
                    f"the server is busy: its {self.name} pool holds {self.admitted} requests, "
                    "its limit; retry shortly"
                )
            self.admitted += 1
        # counted down when the work ends, not when the awaiting request is cancelled: the
        # thread keeps running and keeps its place until then
        future = self._executor.submit(fn, *args)
        future.add_done_callback(lambda _: self._done())
        return await asyncio.wrap_future(future)

    def _done(self) -> None:
        with self._lock:
            self.admitted -= 1

    def stats(self) -> dict[str, int]:
        return {
            "workers": self.workers,
            "capacity": self.capacity,
            "admitted": self.admitted,
            "refused": self.refused,
        }


class PixelBudget:
    """At most `pixels` decoded pixels held at once by the leases of this replica."""

    def __init__(self, pixels: int, wait_s: float) -> None:
        if pixels < 1 or wait_s < 0:
            raise ValueError(f"pixel budget: pixels >= 1 and wait_s >= 0, got {pixels}, {wait_s}")
        self.pixels, self.wait_s = pixels, wait_s
        self._cond = threading.Condition()
        self.used = 0
        self.peak = 0
        self.refused = 0

    def lease(self) -> Lease:
        return Lease(self)

    def _reserve(self, n: int) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + n <= self.pixels, self.wait_s):
                self.refused += 1
                raise Busy(
                    f"the server holds {self.used} decoded pixels of its budget of "
                    f"{self.pixels}; retry shortly",
                    retry_after_s=max(1, round(self.wait_s)),
                )
            self.used += n
            self.peak = max(self.peak, self.used)

    def _release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        return {
            "pixels": self.pixels,
            "used": self.used,
            "peak": self.peak,
            "refused": self.refused,
        }


class Lease:
    """One request's share of a `PixelBudget`: `reserve(n)` adds to it (thread-safe, may wait
    or raise Busy); leaving the `with` block gives it all back. A reservation made after the
    block has ended (the request was cancelled while its decoding thread went on) is given
    back at once and raises Busy, so no pixels stay held by a request that is gone."""

    def __init__(self, budget: PixelBudget) -> None:
        self._budget, self._lock = budget, threading.Lock()
        self.held, self._closed = 0, False

    def reserve(self, n: int) -> None:
        self._budget._reserve(n)
        with self._lock:
            if not self._closed:
                self.held += n
                return
        self._budget._release(n)
        raise Busy("the request ended before its images were decoded")

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            held, self.held, self._closed = self.held, 0, True
        if held:
            self._budget._release(held)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
