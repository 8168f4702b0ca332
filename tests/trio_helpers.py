"""Helpers shared by the trio unit tests."""

from __future__ import annotations

import functools

import trio


def bounded(fn):
    """Fail, rather than hang, when a relay or server never ends (virtual seconds under autojump_clock)."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        with trio.fail_after(60):
            return await fn(*args, **kwargs)

    return wrapper
