"""Moving bytes between the two legs of a connection: splice(2) through a pipe, recv_into/send as the fallback.

Each direction is its own task, and there is nothing else per connection: no nursery, no cancel scope, no timer. A
direction holds a pipe (or a copy buffer) only while it has bytes in flight: it takes one from a small process-wide
pool when the source is readable, and gives it back once the pipe is empty again. An idle connection therefore costs
its two sockets, two suspended tasks and a :class:`Flow`, and the number of pipes is bounded by the number of
directions moving data at the same moment, not by the number of connections.

What the caller can rely on (:func:`run_direction`, and :func:`relay` which runs both directions and the idle check):

- every byte arrives once and in order, whatever the chunking;
- EOF on one side becomes ``shutdown(SHUT_WR)`` on the other while the other direction keeps flowing; the relay is
  done when both directions have seen EOF (outcome ``"ok"``). A flow whose ``on_done`` closes both sockets at once
  (``close_sends_fin``, the server's) skips the second shutdown: the close sends the same FIN;
- a reset (or any other error) on either side ends both directions at once (outcome ``"reset"``): the caller closes
  both sockets with SO_LINGER 0 so the other peer sees a reset too;
- :func:`abort` ends both directions at once (the idle check uses it: outcome ``"idle"``): a direction waiting on
  either socket is woken (``trio.lowlevel.notify_closing``), one that has not started yet does not start;
- ``flow.on_done(flow)`` is called exactly once, by whichever direction ends last, however it ends (cancellation
  included: outcome ``"cancelled"``); that is where the caller closes the sockets.

Resource handling: the relay never closes the sockets (``on_done`` does). A pipe that still holds bytes when its
direction is cancelled or fails is closed rather than pooled, so a pooled pipe is always empty.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Callable, Collection, Coroutine
from typing import Any

import trio

from tproxy.stats import Stats

PIPE_SIZE = 256 * 1024  # F_SETPIPE_SZ: bytes per splice; pages are referenced, not copied
COPY_SIZE = 64 * 1024  # recv_into buffer of the fallback path
POOL_KEEP = 64  # idle pipes (and copy buffers) kept for reuse; more are closed when returned

_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# splice(2) errors meaning "this pair of files cannot be spliced": use recv_into/send instead
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_current_time = trio.current_time
_current_clock = trio.lowlevel.current_clock
_splice = os.splice
_notify_closing = trio.lowlevel.notify_closing


class PipePool:
    """Non-blocking pipes sized ``size``, reused; at most ``keep`` idle ones are kept open.

    Resource handling: :meth:`get` returns an empty pipe (read fd, write fd); give it back with :meth:`put` only when
    it is empty, else :meth:`discard` it. :meth:`close` closes the idle ones (pipes out on loan are their holder's).
    """

    def __init__(self, size: int = PIPE_SIZE, keep: int = POOL_KEEP) -> None:
        self.size = size
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.created = 0  # pipes ever created (for tests and measurements)

    def get(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default 64 KiB
        self.created += 1
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            self.discard(pipe)

    @staticmethod
    def discard(pipe: tuple[int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        while self.free:
            self.discard(self.free.pop())


class BufferPool:
    """Copy buffers (memoryviews of ``size`` bytes) for the fallback path, reused like pipes (no fds involved)."""

    def __init__(self, size: int = COPY_SIZE, keep: int = POOL_KEEP) -> None:
        self.size = size
        self.keep = keep
        self.free: list[memoryview] = []

    def get(self) -> memoryview:
        return self.free.pop() if self.free else memoryview(bytearray(self.size))

    def put(self, buf: memoryview) -> None:
        if len(self.free) < self.keep:
            self.free.append(buf)


PIPES = PipePool()
BUFFERS = BufferPool()


class Flow:
    """One relayed connection: its two sockets, bytes each way, outcome, last activity, who to call when done."""

    __slots__ = (
        "client",
        "upstream",
        "bytes_in",
        "bytes_out",
        "outcome",
        "error",
        "last",
        "aborted",
        "running",
        "on_done",
    )

    def __init__(self) -> None:
        self.client: socket.socket | None = None
        self.upstream: socket.socket | None = None
        self.bytes_in = 0  # client -> upstream
        self.bytes_out = 0  # upstream -> client
        self.outcome: str | None = None  # "reset" | "idle" | "cancelled" once decided; None: "ok" so far
        self.error: BaseException | None = None  # what ended a "reset" relay
        self.last = 0.0  # trio.current_time() of the last byte moved (or of the start)
        self.aborted = False
        self.running = 0  # directions not yet ended
        self.on_done: Callable[[Flow], None] | None = None

    # True when on_done closes both sockets at once: the last EOF is then passed on by close() (same FIN), not by a
    # shutdown. A class attribute (no per-connection memory); the server's connections set it.
    close_sends_fin = False


def abort(flow: Flow, outcome: str, error: BaseException | None = None) -> None:
    """End both directions of ``flow`` now; the first outcome given sticks. Idempotent."""
    if flow.outcome is None:
        flow.outcome = outcome
        flow.error = error
    if not flow.aborted:
        flow.aborted = True
        _notify_closing(flow.client)
        _notify_closing(flow.upstream)


def _fail(flow: Flow, err: BaseException) -> None:
    abort(flow, "reset", err)


def _eof(dst: socket.socket) -> None:
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone already; its own direction reports that


async def _splice_direction(
    src: socket.socket,
    dst: socket.socket,
    flow: Flow,
    inbound: bool,
    stats: Stats,
    pipes: PipePool,
    buffers: BufferPool,
) -> None:
    # One frame per idle direction: the loop, the fallback and the end-of-direction bookkeeping live here together.
    # Awaits are kept out of `except` blocks: an exception being handled would stay alive (with its traceback) for
    # as long as the connection is idle.
    try:
        sfd = src.fileno()
        dfd = dst.fileno()
        now = _current_clock().current_time  # (trio.current_time() is two calls more per transfer)
        moved = 0
        ready = True  # try reading before waiting; after a short read, wait first (the socket is most likely drained)
        stats.relay_path["splice"] += 1
        while not flow.aborted:
            if not ready:
                try:
                    await _wait_readable(src)
                except trio.ClosedResourceError:
                    return
            pipe = pipes.get()
            try:
                n = _splice(sfd, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                n = -1
            except OSError as e:
                pipes.put(pipe)  # nothing entered it
                if e.errno in _NO_SPLICE and moved == 0:
                    break
                _fail(flow, e)
                return
            if n <= 0:
                pipes.put(pipe)
                if n == 0:
                    if flow.running > 1 or not flow.close_sends_fin:
                        _eof(dst)
                    return
                ready = False
                continue
            left = n
            try:
                while left:
                    try:
                        left -= _splice(pipe[0], dfd, left, flags=_SPLICE_FLAGS)
                        continue
                    except BlockingIOError:
                        pass
                    if flow.aborted:  # aborted after this task was woken: no one would wake this wait
                        raise trio.ClosedResourceError
                    await _wait_writable(dst)
            except trio.ClosedResourceError:
                pipes.discard(pipe)
                return
            except OSError as e:
                pipes.discard(pipe)
                _fail(flow, e)
                return
            except BaseException:
                pipes.discard(pipe)
                raise
            pipes.put(pipe)
            moved += n
            # a full pipe: more is waiting. An application's first answer is often its last (HTTP with Connection:
            # close), its EOF right behind it: one more read catches it without a wait (one failed read otherwise).
            ready = n == PIPE_SIZE or (moved == n and not inbound)
            if inbound:
                flow.bytes_in += n
                stats.bytes_in += n
            else:
                flow.bytes_out += n
                stats.bytes_out += n
            flow.last = now()
        else:
            return
        # the kernel refused to splice these files: copy instead
        paths = stats.relay_path
        paths["splice"] -= 1
        if not paths["splice"]:
            del paths["splice"]
        await _pump_copy(src, dst, flow, inbound, stats, pipes, buffers)
    except Exception as e:
        _fail(flow, e)
    except BaseException:
        if flow.outcome is None:
            flow.outcome = "cancelled"
        raise
    finally:
        _end(flow)


async def _pump_copy(
    src: socket.socket,
    dst: socket.socket,
    flow: Flow,
    inbound: bool,
    stats: Stats,
    pipes: PipePool,
    buffers: BufferPool,
) -> None:
    recv_into = src.recv_into
    send = dst.send
    size = buffers.size
    now = _current_clock().current_time
    ready = True
    stats.relay_path["copy"] += 1
    while not flow.aborted:
        if not ready:
            try:
                await _wait_readable(src)
            except trio.ClosedResourceError:
                return
        buf = buffers.get()
        try:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                n = -1
            except OSError as e:
                _fail(flow, e)
                return
            if n <= 0:
                if n == 0:
                    if flow.running > 1 or not flow.close_sends_fin:
                        _eof(dst)
                    return
                ready = False
                continue
            sent = 0
            try:
                while sent < n:
                    try:
                        sent += send(buf[sent:n])
                        continue
                    except BlockingIOError:
                        pass
                    if flow.aborted:
                        raise trio.ClosedResourceError
                    await _wait_writable(dst)
            except trio.ClosedResourceError:
                return
            except OSError as e:
                _fail(flow, e)
                return
        finally:
            buffers.put(buf)
        ready = n == size
        if inbound:
            flow.bytes_in += n
            stats.bytes_in += n
        else:
            flow.bytes_out += n
            stats.bytes_out += n
        flow.last = now()


async def _copy_direction(
    src: socket.socket,
    dst: socket.socket,
    flow: Flow,
    inbound: bool,
    stats: Stats,
    pipes: PipePool,
    buffers: BufferPool,
) -> None:
    try:
        await _pump_copy(src, dst, flow, inbound, stats, pipes, buffers)
    except Exception as e:
        _fail(flow, e)
    except BaseException:
        if flow.outcome is None:
            flow.outcome = "cancelled"
        raise
    finally:
        _end(flow)


def _end(flow: Flow) -> None:
    flow.running -= 1
    if flow.running == 0 and flow.on_done is not None:
        flow.on_done(flow)


def run_direction(
    src: socket.socket,
    dst: socket.socket,
    flow: Flow,
    inbound: bool,
    stats: Stats,
    use_splice: bool = True,
    pipes: PipePool = PIPES,
    buffers: BufferPool = BUFFERS,
) -> Coroutine[Any, Any, None]:
    """Relay ``src`` -> ``dst`` until EOF, a failure or :func:`abort`; the last direction to end calls ``on_done``.

    Set ``flow.client``, ``flow.upstream``, ``flow.running = 2``, ``flow.last`` and ``flow.on_done`` first, then
    run one direction per task (``inbound``: client -> upstream): ``await run_direction(...)`` or
    ``nursery.start_soon(run_direction, ...)``.

    Error handling: never raises but ``Cancelled`` (the outcome is then ``"cancelled"``); an unexpected exception
    ends the relay as a reset, kept in ``flow.error``.
    """
    direction = _splice_direction if use_splice else _copy_direction
    return direction(src, dst, flow, inbound, stats, pipes, buffers)


async def relay(
    client: socket.socket,
    upstream: socket.socket,
    flow: Flow,
    stats: Stats,
    *,
    idle_timeout: float,
    use_splice: bool = True,
    pipes: PipePool = PIPES,
    buffers: BufferPool = BUFFERS,
) -> str:
    """Relay between two connected non-blocking sockets until both directions end; returns the outcome.

    The self-contained form of :func:`run_direction` (both directions and an idle check, in a nursery of their own);
    the server runs the directions in its own nursery instead and checks idleness for every connection at once.

    Error handling: socket errors never escape; they end the relay with outcome ``"reset"`` (``flow.error`` says
    which). Cancellation propagates.
    """
    done = trio.Event()
    flow.client, flow.upstream = client, upstream
    flow.running = 2
    flow.last = _current_time()
    flow.on_done = lambda _flow: done.set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_direction, upstream, client, flow, False, stats, use_splice, pipes, buffers)
        nursery.start_soon(reap_idle, [flow], idle_timeout)
        await run_direction(client, upstream, flow, True, stats, use_splice, pipes, buffers)
        await done.wait()
        nursery.cancel_scope.cancel()
    return flow.outcome or "ok"


def idle_tick(idle_timeout: float) -> float:
    """How often :func:`reap_idle` looks: a connection closes between ``idle`` and ``idle + tick`` seconds."""
    return min(1.0, idle_timeout / 10)


async def reap_idle(flows: Collection[Flow], idle_timeout: float) -> None:
    """Forever: abort every flow in ``flows`` (a live collection) without a byte for ``idle_timeout`` seconds."""
    tick = idle_tick(idle_timeout)
    while True:
        await trio.sleep(tick)
        oldest = _current_time() - idle_timeout
        for flow in [f for f in flows if f.last <= oldest and not f.aborted]:
            abort(flow, "idle")
