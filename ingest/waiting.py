"""Waiting by polling: the one loop every part of the system (and its tests) waits with.

    recorded = poll(count_recorded, until=lambda n: n >= wanted, timeout=60, interval=0.2,
                    what="task runs recorded")

`read` is called at once, then every `interval` seconds until `until(value)` holds, and
that value is returned. After `timeout` seconds (None: never) `TimedOut` is raised; it
carries the last value read, for callers that go on with what they have. An exception
from `read` is not retried: it propagates, as it would from a plain loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import AsyncRetrying, Retrying, retry_if_result, stop_after_delay, stop_never, wait_fixed

T = TypeVar("T")


class TimedOut(TimeoutError):
    def __init__(self, what: str, timeout: float, last: Any):
        super().__init__(f"{what}: not after {timeout:g}s")
        self.what = what
        self.timeout = timeout
        self.last = last


def _policy(until: Callable[[Any], bool], timeout: float | None, interval: float, what: str) -> dict:
    def give_up(state) -> None:
        raise TimedOut(what, timeout, state.outcome.result())

    return {
        "retry": retry_if_result(lambda value: not until(value)),
        "stop": stop_never if timeout is None else stop_after_delay(timeout),
        "wait": wait_fixed(interval),
        "retry_error_callback": give_up,
    }


def poll(read: Callable[[], T], *, until: Callable[[T], bool] = bool, timeout: float | None = None,
         interval: float = 1.0, what: str = "condition") -> T:
    """Call `read` until `until(value)`; return that value (see the module docstring)."""
    return Retrying(**_policy(until, timeout, interval, what))(read)


async def apoll(read: Callable[[], Awaitable[T]], *, until: Callable[[T], bool] = bool,
                timeout: float | None = None, interval: float = 1.0, what: str = "condition") -> T:
    """`poll()` for a coroutine function, sleeping with asyncio."""
    return await AsyncRetrying(**_policy(until, timeout, interval, what))(read)
