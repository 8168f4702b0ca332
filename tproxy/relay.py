"""Moving bytes between the two legs of a connection: splice(2) through a pipe, recv_into/send as the fallback.

Each direction is its own task. A direction holds a pipe (or a copy buffer) only while it has bytes in flight: it
takes one from a small process-wide pool when the source is readable, and gives it back once the pipe is empty again.
An idle connection therefore costs its two sockets and no pipe, and the number of pipes is bounded by the number of
directions moving data at the same moment, not by the number of connections.

What the caller can rely on (:func:`relay`):

- every byte arrives once and in order, whatever the chunking;
- EOF on one side becomes ``shutdown(SHUT_WR)`` on the other while the other direction keeps flowing; the relay
  returns when both directions have seen EOF (outcome ``"ok"``);
- a reset (or any other error) on either side ends both directions at once (outcome ``"reset"``): the caller closes
  both sockets with SO_LINGER 0 so the other peer sees a reset too;
- no byte in either direction for ``idle_timeout`` seconds ends both directions (outcome ``"idle"``);
- cancellation from outside propagates; byte counts so far are in the :class:`Flow`.

Resource handling: :func:`relay` never closes the sockets (the caller owns them). A pipe that still holds bytes when
its direction is cancelled or fails is closed rather than pooled, so a pooled pipe is always empty.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

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
_splice = os.splice


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
    """The per-connection relay state the caller reads afterwards: bytes each way, outcome, error seen."""

    __slots__ = ("bytes_in", "bytes_out", "outcome", "error", "scope", "idle", "slack", "extended")

    def __init__(self) -> None:
        self.bytes_in = 0  # client -> upstream
        self.bytes_out = 0  # upstream -> client
        self.outcome: str | None = None  # "ok" | "reset" | "idle"; None while running or when cancelled
        self.error: OSError | None = None  # what ended a "reset" relay
        self.scope: trio.CancelScope | None = None
        self.idle = 0.0
        self.slack = 0.0
        self.extended = 0.0


def _touch(flow: Flow) -> None:
    # Push the idle deadline forward, at most once per `slack` seconds (a heap entry per extension, not per chunk).
    # The deadline is `extended + idle + slack`, so a connection never closes before `idle` seconds without a byte.
    now = _current_time()
    if now - flow.extended > flow.slack:
        flow.extended = now
        flow.scope.deadline = now + flow.idle + flow.slack


def _fail(flow: Flow, err: OSError) -> None:
    if flow.outcome is None:
        flow.outcome = "reset"
        flow.error = err
    flow.scope.cancel()


def _eof(dst: socket.socket) -> None:
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone already; its own direction reports that


async def _pump_splice(
    src: socket.socket,
    dst: socket.socket,
    flow: Flow,
    inbound: bool,
    stats: Stats,
    pipes: PipePool,
    buffers: BufferPool,
) -> None:
    # Awaits are kept out of `except` blocks: an exception being handled would stay alive (with its traceback) for
    # as long as the connection is idle.
    sfd = src.fileno()
    dfd = dst.fileno()
    moved = 0
    ready = True  # try reading before waiting; after a short read, wait first (the socket is most likely drained)
    stats.relay_path["splice"] += 1
    while True:
        if not ready:
            await _wait_readable(src)
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
                await _wait_writable(dst)
        except OSError as e:
            pipes.discard(pipe)
            _fail(flow, e)
            return
        except BaseException:
            pipes.discard(pipe)
            raise
        pipes.put(pipe)
        moved += n
        ready = n == PIPE_SIZE
        if inbound:
            flow.bytes_in += n
            stats.bytes_in += n
        else:
            flow.bytes_out += n
            stats.bytes_out += n
        _touch(flow)
    # the kernel refused to splice these files: copy instead
    paths = stats.relay_path
    paths["splice"] -= 1
    if not paths["splice"]:
        del paths["splice"]
    await _pump_copy(src, dst, flow, inbound, stats, pipes, buffers)


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
    ready = True
    stats.relay_path["copy"] += 1
    while True:
        if not ready:
            await _wait_readable(src)
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
                    await _wait_writable(dst)
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
        _touch(flow)


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
    """Relay between two connected non-blocking sockets until both directions end; returns ``flow.outcome``.

    ``use_splice=False`` forces the recv_into/send path (splice also falls back by itself when the kernel refuses a
    pair of files). Counts bytes into ``flow`` and ``stats`` as they move, and each direction's path into
    ``stats.relay_path``.

    Error handling: socket errors never escape; they end the relay with outcome ``"reset"`` (``flow.error`` says
    which). Cancellation propagates.
    """
    flow.idle = idle_timeout
    flow.slack = min(1.0, idle_timeout / 100)
    flow.extended = now = _current_time()
    pump = _pump_splice if use_splice else _pump_copy
    async with trio.open_nursery() as nursery:
        flow.scope = nursery.cancel_scope
        nursery.cancel_scope.deadline = now + idle_timeout + flow.slack
        nursery.start_soon(pump, upstream, client, flow, False, stats, pipes, buffers)
        await pump(client, upstream, flow, True, stats, pipes, buffers)
    if flow.outcome is None:
        flow.outcome = "idle" if nursery.cancel_scope.cancelled_caught else "ok"
    return flow.outcome
