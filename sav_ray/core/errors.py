"""Turning failures into messages for users.

Errors a user can fix (a bad flag, manifest row, image, artifact) are ValueError or
LookupError subclasses raised by the core with a message naming the row, field, file or flag.
Ray re-raises them wrapped (RayTaskError, UserCodeException); `user_message` digs out the
original so a job prints one clear line instead of a remote traceback.

Any other exception that comes out of Ray (a model actor's bug, CUDA out of memory, a model
that loads differently than preflight saw) is also one line, the remote exception's own
message, with Ray's full traceback written to a log file whose path the line names:

    error: OutOfMemoryError: CUDA out of memory ... (full traceback: /tmp/sav-ray-logs/fit-...log)

Ray Data reports an actor whose constructor raised only as `ActorDiedError`, without the
original exception; `report_init_errors` makes a model actor keep that exception and raise
it from its first call instead, so its message reaches the driver.

A job stopped by SIGTERM (`ray job stop`, a scheduler) or SIGINT (Ctrl-C) raises `JobStopped`
where it is; the blocks it unwinds clean up (the MLflow run ends KILLED, a registered version
of the run is deleted, a half-written artifact removed), and the job exits 128 + the signal.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A flag or option has a bad value; the message names the flag."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, FileNotFoundError)

LOG_DIR_ENV = "SAV_RAY_LOG_DIR"  # where job tracebacks go; default <tmp>/sav-ray-logs
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours actor names in its messages


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception inside it: Ray's `cause`, then `__cause__`/`__context__`."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)  # RayTaskError: the remote exception itself
        if isinstance(cause, BaseException):
            stack.append(cause)
            continue
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def user_message(exc: BaseException) -> str | None:
    """The message of the user-facing error inside `exc` (through Ray's wrappers), if any."""
    for e in _chain(exc):
        if isinstance(e, USER_ERRORS) and type(e).__module__.startswith("sav_ray"):
            return str(e)
    return None


def _is_ray_error(e: BaseException) -> bool:
    """Raised by Ray or Ray Data (RayTaskError, ActorDiedError, ActorUnavailableError,
    SystemException, UserCodeException, ...), recognised without importing Ray."""
    return any(cls.__module__.split(".")[0] == "ray" for cls in type(e).__mro__)


def remote_message(exc: BaseException) -> str | None:
    """One line for an exception that came out of Ray: the innermost non-Ray exception's type
    and first line (Ray Data appends retry advice below it), else the Ray error's first line."""
    chain = list(_chain(exc))
    if not any(_is_ray_error(e) for e in chain):
        return None
    own = [e for e in chain if not _is_ray_error(e)]
    e = own[-1] if own else chain[0]
    lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def write_traceback(exc: BaseException, job: str) -> Path:
    """Write `exc`'s full traceback (Ray's remote one included) to a new log file."""
    folder = Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "sav-ray-logs")
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"{job}-{stamp}-{os.getpid()}.log"
    path.write_text(
        f"{' '.join(sys.argv)}\n\n" + "".join(traceback.format_exception(exc)), encoding="utf-8"
    )
    return path


def job_main(body: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Decorate a job's `main(argv)`: a user's mistake becomes one `error: ...` line on stderr
    and exit code 2, and so does an exception out of Ray (its traceback goes to a log file);
    anything else (a bug on the driver) propagates with its traceback."""
    job = Path(body.__code__.co_filename).stem

    @functools.wraps(body)
    def main(argv: list[str] | None = None) -> int:
        try:
            with stopping_on_signals():
                return body(argv)
        except JobStopped as e:
            print(f"stopped by {e}", file=sys.stderr)
            return 128 + e.signum
        except Exception as e:
            message = user_message(e)
            if message is None:
                message = remote_message(e)
                if message is None:
                    raise
                message += f" (full traceback: {write_traceback(e, job)})"
            print(f"error: {message}", file=sys.stderr)
            return 2

    return main


class JobStopped(KeyboardInterrupt):
    """The job was asked to stop by a signal. A KeyboardInterrupt, so whatever already cleans
    up after Ctrl-C cleans up after SIGTERM too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_stopping_on_signals = False


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise `JobStopped` in the main thread; a second
    signal while the first one's cleanup runs ends the process at once. The handlers and the
    signal mask the process had come back after the block, so a job run in-process (a test, a
    notebook) leaves its caller's as they were."""
    global _stopping_on_signals
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    # `ray job submit` starts the entrypoint with SIGINT blocked (Ray blocks it in its own
    # processes): unblock it, so Ctrl-C in a job's terminal and RAY_JOB_STOP_SIGNAL=SIGINT work.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _install_stop_handlers()
    _stopping_on_signals = True
    try:
        yield
    finally:
        _stopping_on_signals = False
        for s, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _install_stop_handlers() -> None:
    def handler(signum: int, frame: Any) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        raise JobStopped(signum)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)


def restore_stop_handlers() -> None:
    """After `ray.init`, which sets its own SIGTERM handler (a bare `sys.exit`) on the driver:
    put back the job's, inside `stopping_on_signals` (a library caller keeps its own)."""
    if _stopping_on_signals:
        _install_stop_handlers()


class _WithoutTraceback(logging.Formatter):
    """Formats a record as `inner` does, leaving out its traceback."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def quiet_ray_data_tracebacks() -> None:
    """Ray Data logs a failed task's traceback on the console before it raises the error; in a
    job that prints the error as one line (its traceback in the job's log file), keep that
    traceback off the console. Ray Data's own log file (ray-data.log) still has it."""
    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler)
        if console and not isinstance(handler, logging.FileHandler):
            if not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter))


Actor = TypeVar("Actor", bound=type)


def report_init_errors(cls: Actor) -> Actor:
    """Class decorator for a Ray Data actor (a callable class): an exception raised by its
    constructor is kept and raised by its first `__call__`, where Ray Data passes it on to the
    driver unchanged (from the constructor Ray would report only that the actor died)."""
    init, call = cls.__init__, cls.__call__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        self._init_error = None
        try:
            init(self, *args, **kwargs)
        except Exception as e:
            self._init_error = e

    @functools.wraps(call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._init_error is not None:
            raise self._init_error
        return call(self, *args, **kwargs)

    cls.__init__, cls.__call__ = __init__, __call__
    return cls
