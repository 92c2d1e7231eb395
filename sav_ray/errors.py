"""Turning failures into messages for users.

Errors a user can fix (a bad flag, manifest row, image, artifact) are ValueError or
LookupError subclasses raised by the core with a message naming the row, field, file or flag.
Ray re-raises them wrapped (RayTaskError, UserCodeException); `user_message` digs out the
original so a job prints one clear line instead of a remote traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """A flag or option has a bad value; the message names the flag."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, FileNotFoundError)


def user_message(exc: BaseException) -> str | None:
    """The message of the user-facing error inside `exc` (through Ray's wrappers), if any."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: the remote exception itself
        if isinstance(cause, BaseException):
            stack.append(cause)
            continue
        if isinstance(e, USER_ERRORS) and type(e).__module__.startswith("sav_ray"):
            return str(e)
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None


def job_main(body: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Decorate a job's `main(argv)`: a user's mistake becomes one `error: ...` line on stderr
    and exit code 2; anything else (a bug) propagates with its traceback."""

    @functools.wraps(body)
    def main(argv: list[str] | None = None) -> int:
        try:
            return body(argv)
        except Exception as e:
            message = user_message(e)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 2

    return main
