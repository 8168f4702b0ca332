"""Moving bytes between the two legs of a connection: splice(2) through a pipe, recv_into/send as the fallback.

:class:`EpollRelay` is one trio task relaying any number of connections from an edge-triggered epoll fd of its own,
each socket registered once: there is no task, nursery, cancel scope or timer per connection. A direction holds a
pipe (or a copy buffer) only while it has bytes in flight: it takes one from a small process-wide pool when the
source is readable, and gives it back once the pipe is empty again. An idle connection therefore costs its two
sockets and a :class:`Flow`, and the number of pipes is bounded by the number of directions moving data at the same
moment, not by the number of connections. :func:`relay` is the self-contained form for one connection.

What the caller can rely on (:class:`EpollRelay`, and :func:`relay`):

- every byte arrives once and in order, whatever the chunking;
- EOF on one side becomes ``shutdown(SHUT_WR)`` on the other while the other direction keeps flowing; the relay is
  done when both directions have seen EOF (outcome ``"ok"``). A flow whose ``on_done`` closes both sockets at once
  (``close_sends_fin``, the server's) skips the second shutdown: the close sends the same FIN;
- a reset (or any other error) on either side ends both directions at once (outcome ``"reset"``): the caller closes
  both sockets with SO_LINGER 0 so the other peer sees a reset too;
- :func:`abort` ends both directions at once (the idle check uses it: outcome ``"idle"``): the flow's relay is
  woken to end it;
- ``flow.on_done(flow)`` is called exactly once, by whichever direction ends last, however it ends (cancellation
  included: outcome ``"cancelled"``); that is where the caller closes the sockets.

Resource handling: the relay never closes the sockets (``on_done`` does). A pipe that still holds bytes when its
direction is cancelled or fails is closed rather than pooled, so a pooled pipe is always empty.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
from collections.abc import Callable, Collection
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
        "owner",
        "cfd",
        "ufd",
        "ipipe",
        "iheld",
        "opipe",
        "oheld",
        "state",
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
        # the epoll relay's state (see EpollRelay): who runs it, the two fds, per direction a pipe (or, copying, the
        # bytes not sent yet) and how many bytes it holds, the direction flags
        self.owner: EpollRelay | None = None
        self.cfd = -1
        self.ufd = -1
        self.ipipe: Any = None
        self.iheld = 0
        self.opipe: Any = None
        self.oheld = 0
        self.state = 0

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
        owner = flow.owner
        if owner is not None:
            owner.kick(flow)
        else:
            _notify_closing(flow.client)
            _notify_closing(flow.upstream)


def _eof(dst: socket.socket) -> None:
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the peer is gone already; its own direction reports that


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

    The self-contained form of :class:`EpollRelay` (an epoll relay of its own and an idle check, in a nursery of
    their own); the server shares one :class:`EpollRelay` between all its connections and checks idleness for every
    connection at once.

    Error handling: socket errors never escape; they end the relay with outcome ``"reset"`` (``flow.error`` says
    which). Cancellation propagates.
    """
    done = trio.Event()
    flow.client, flow.upstream = client, upstream
    flow.last = _current_time()
    flow.on_done = lambda _flow: done.set()
    ep: EpollRelay | None = None
    try:
        async with trio.open_nursery() as nursery:
            ep = EpollRelay(stats, nursery, use_splice=use_splice, pipes=pipes, buffers=buffers)
            ep.close_when_empty()
            ep.add(flow)
            nursery.start_soon(reap_idle, [flow], idle_timeout)
            await done.wait()
            nursery.cancel_scope.cancel()
    finally:
        if ep is not None:
            ep.close()
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


# -- the epoll relay: one task for every relaying connection

_EPOLL_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_RD = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WR = select.EPOLLOUT
_IN_DONE, _OUT_DONE, _IN_COPY, _OUT_COPY = 1, 2, 4, 8
_BOTH_DONE = _IN_DONE | _OUT_DONE
_WAIT, _MORE, _EOF, _FAIL, _NOSPLICE = 0, 1, 2, 3, 4
BUDGET = 16  # transfers per direction and wakeup before the other connections get their turn
_checkpoint = trio.lowlevel.checkpoint


class EpollRelay:
    """Relays any number of flows from one trio task that waits on an epoll fd of its own (edge-triggered).

    Each socket is registered once (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET) when its flow is added; a wakeup drains
    ``epoll.poll(0)`` and moves each ready direction until EAGAIN (or :data:`BUDGET` transfers, after which the
    flow waits for its next turn behind a checkpoint). The semantics are the module's: every byte once and
    in order, EOF -> ``shutdown(SHUT_WR)`` on the other side, an error -> outcome ``"reset"`` for both directions,
    :func:`abort` ends the flow, the copy path when the kernel refuses to splice, ``on_done(flow)`` exactly once.

    Use: ``relay = EpollRelay(stats, nursery)``; set ``flow.client``, ``flow.upstream``, ``flow.last``,
    ``flow.on_done``, then :meth:`add`. The task runs in ``nursery`` while there are flows (it is started again by
    :meth:`add` when needed) and, after :meth:`close_when_empty`, ends with the last flow. When the task is
    cancelled every flow ends with outcome ``"cancelled"``. ``after_turn()``, if given, is called after every turn
    (the flows that ended in it have had their ``on_done``) and when the task is cancelled: the server writes its
    log lines there, once per turn.

    Resource handling: the relay never closes the sockets (``on_done`` does); when ``close_sends_fin`` is false
    the sockets are unregistered from the epoll fd before ``on_done``. :meth:`close` closes the epoll fd.
    """

    def __init__(
        self,
        stats: Stats,
        nursery: trio.Nursery,
        *,
        use_splice: bool = True,
        pipes: PipePool = PIPES,
        buffers: BufferPool = BUFFERS,
        after_turn: Callable[[], None] | None = None,
    ) -> None:
        self.stats = stats
        self.nursery = nursery
        self.after_turn = after_turn
        self.use_splice = use_splice
        self.pipes = pipes
        self.buffers = buffers
        self.ep = select.epoll()
        self.epfd = self.ep.fileno()
        self.wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep.register(self.wakefd, select.EPOLLIN | select.EPOLLET)
        self.fds: dict[int, Flow] = {}
        self.count = 0  # flows relaying
        self.pending: list[tuple[Flow, int]] = []  # (flow, directions) to run at the next turn
        self.running = False
        self.closing = False
        self.woken = False
        self._now = _current_time

    def add(self, flow: Flow) -> None:
        """Start relaying ``flow`` (its sockets connected and non-blocking)."""
        flow.owner = self
        flow.cfd = cfd = flow.client.fileno()
        flow.ufd = ufd = flow.upstream.fileno()
        flow.running = 2
        if self.use_splice:
            self.stats.relay_path["splice"] += 2
        else:
            flow.state = _IN_COPY | _OUT_COPY
            self.stats.relay_path["copy"] += 2
        self.fds[cfd] = flow
        self.fds[ufd] = flow
        self.count += 1
        try:
            self.ep.register(cfd, _EPOLL_MASK)
            self.ep.register(ufd, _EPOLL_MASK)
        except OSError as e:
            self._fail(flow, e)
            self._end(flow)
            return
        if not self.running:
            self.running = True
            self.nursery.start_soon(self.run, name="tproxy.relay")
        # (the registration reports what is ready already: the first turn reads both sides)

    def kick(self, flow: Flow) -> None:
        """Have ``flow`` looked at on the next turn (after :func:`abort`)."""
        self.pending.append((flow, 0))
        self._wake()

    def close_when_empty(self) -> None:
        """The task ends once no flow is left (it starts again if one is added)."""
        self.closing = True
        self._wake()

    def _wake(self) -> None:
        if not self.woken and self.running:
            self.woken = True
            os.eventfd_write(self.wakefd, 1)

    def close(self) -> None:
        self.ep.close()
        os.close(self.wakefd)

    async def run(self) -> None:
        """The relay task: until :meth:`close_when_empty` and no flow left."""
        self._now = _current_clock().current_time  # (the run's clock; one call less per transfer)
        try:
            while self.count or not self.closing:
                if self.pending:
                    await _checkpoint()
                else:
                    await _wait_readable(self.epfd)
                self._turn()
                if self.after_turn is not None:
                    self.after_turn()
        except BaseException:
            self.running = False
            self._cancel_all()
            if self.after_turn is not None:
                self.after_turn()
            raise
        self.running = False

    def _cancel_all(self) -> None:
        self.pending = []
        for flow in list(self.fds.values()):
            if flow.owner is self:
                if flow.outcome is None:
                    flow.outcome = "cancelled"
                self._end(flow)

    def _turn(self) -> None:
        pending = self.pending
        if pending:
            self.pending = []
        fds = self.fds
        step = self._step
        for fd, ev in self.ep.poll(0):
            flow = fds.get(fd)
            if flow is None:
                if fd == self.wakefd:
                    self.woken = False
                    try:
                        os.eventfd_read(self.wakefd)
                    except BlockingIOError:
                        pass
                continue
            if fd == flow.cfd:
                which = (1 if ev & _RD else 0) | (2 if ev & _WR and flow.oheld else 0)
            else:
                which = (2 if ev & _RD else 0) | (1 if ev & _WR and flow.iheld else 0)
            if which or flow.aborted:
                step(flow, which)
        for flow, which in pending:
            if flow.owner is self:
                step(flow, which)

    def _step(self, flow: Flow, which: int) -> None:
        if flow.aborted:
            self._end(flow)
            return
        more = 0
        try:
            if which & 1 and not flow.state & _IN_DONE:
                r = self._move(flow, True)
                if r == _MORE:
                    more = 1
                elif r == _EOF:
                    flow.state |= _IN_DONE
                    if not flow.state & _OUT_DONE or not flow.close_sends_fin:
                        _eof(flow.upstream)
                elif r == _FAIL:
                    self._end(flow)
                    return
            if which & 2 and not flow.state & _OUT_DONE:
                r = self._move(flow, False)
                if r == _MORE:
                    more |= 2
                elif r == _EOF:
                    flow.state |= _OUT_DONE
                    if not flow.state & _IN_DONE or not flow.close_sends_fin:
                        _eof(flow.client)
                elif r == _FAIL:
                    self._end(flow)
                    return
        except Exception as e:  # a bug, not a socket error: this flow ends as a reset, the others go on
            self._fail(flow, e)
            self._end(flow)
            return
        if flow.state & _BOTH_DONE == _BOTH_DONE:
            self._end(flow)
        elif more:
            self.pending.append((flow, more))

    def _fail(self, flow: Flow, err: BaseException) -> None:
        if flow.outcome is None:
            flow.outcome = "reset"
            flow.error = err
        flow.aborted = True

    def _move(self, flow: Flow, inbound: bool) -> int:
        if inbound:
            copy = flow.state & _IN_COPY
            pipe, held = flow.ipipe, flow.iheld
        else:
            copy = flow.state & _OUT_COPY
            pipe, held = flow.opipe, flow.oheld
        if copy:
            pipe, held, r = self._copy(flow, inbound, pipe, held)
        else:
            pipe, held, r = self._splice(flow, inbound, pipe, held)
            if r == _NOSPLICE:  # the kernel refused to splice these files: copy instead
                paths = self.stats.relay_path
                paths["splice"] -= 1
                if not paths["splice"]:
                    del paths["splice"]
                paths["copy"] += 1
                flow.state |= _IN_COPY if inbound else _OUT_COPY
                pipe, held, r = self._copy(flow, inbound, None, 0)
        if inbound:
            flow.ipipe, flow.iheld = pipe, held
        else:
            flow.opipe, flow.oheld = pipe, held
        return r

    def _count(self, flow: Flow, inbound: bool, n: int) -> None:
        if inbound:
            flow.bytes_in += n
            self.stats.bytes_in += n
        else:
            flow.bytes_out += n
            self.stats.bytes_out += n

    def _splice(self, flow: Flow, inbound: bool, pipe: Any, held: int) -> tuple[Any, int, int]:
        if inbound:
            sfd, dfd = flow.cfd, flow.ufd
        else:
            sfd, dfd = flow.ufd, flow.cfd
        pipes = self.pipes
        budget = BUDGET
        moved = 0
        try:
            while True:
                if held:
                    try:
                        n = _splice(pipe[0], dfd, held, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        return pipe, held, _WAIT
                    held -= n
                    moved += n
                    if held:
                        continue
                    budget -= 1
                    if not budget:
                        pipes.put(pipe)
                        return None, 0, _MORE
                if pipe is None:
                    pipe = pipes.get()
                try:
                    n = _splice(sfd, pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    pipes.put(pipe)
                    return None, 0, _WAIT
                except OSError as e:
                    pipes.put(pipe)  # nothing entered it
                    if e.errno in _NO_SPLICE and not (flow.bytes_in if inbound else flow.bytes_out) and not moved:
                        return None, 0, _NOSPLICE
                    raise
                if n == 0:
                    pipes.put(pipe)
                    return None, 0, _EOF
                held = n
        except OSError as e:
            if pipe is not None and held:
                pipes.discard(pipe)
            self._fail(flow, e)
            return None, 0, _FAIL
        finally:
            if moved:
                self._count(flow, inbound, moved)
                flow.last = self._now()

    def _copy(self, flow: Flow, inbound: bool, data: Any, held: int) -> tuple[Any, int, int]:
        if inbound:
            src, dst = flow.client, flow.upstream
        else:
            src, dst = flow.upstream, flow.client
        buffers = self.buffers
        budget = BUDGET
        moved = 0
        try:
            while True:
                if held:
                    try:
                        s = dst.send(data)
                    except BlockingIOError:
                        return data, held, _WAIT
                    moved += s
                    held -= s
                    if held:
                        data = data[s:]
                        continue
                    data = None
                    budget -= 1
                    if not budget:
                        return None, 0, _MORE
                buf = buffers.get()
                try:
                    try:
                        n = src.recv_into(buf)
                    except BlockingIOError:
                        return None, 0, _WAIT
                    if n == 0:
                        return None, 0, _EOF
                    try:
                        s = dst.send(buf[:n])
                    except BlockingIOError:
                        s = 0
                    moved += s
                    if s < n:
                        data = memoryview(bytes(buf[s:n]))
                        held = n - s
                    else:
                        budget -= 1
                        if not budget:
                            return None, 0, _MORE
                finally:
                    buffers.put(buf)
        except OSError as e:
            self._fail(flow, e)
            return None, 0, _FAIL
        finally:
            if moved:
                self._count(flow, inbound, moved)
                flow.last = self._now()

    def _end(self, flow: Flow) -> None:
        if flow.owner is not self:
            return
        flow.owner = None
        fds = self.fds
        fds.pop(flow.cfd, None)
        fds.pop(flow.ufd, None)
        self.count -= 1
        for pipe, held, copy in (
            (flow.ipipe, flow.iheld, flow.state & _IN_COPY),
            (flow.opipe, flow.oheld, flow.state & _OUT_COPY),
        ):
            if pipe is not None and not copy:
                if held:
                    self.pipes.discard(pipe)
                else:
                    self.pipes.put(pipe)
        flow.ipipe = flow.opipe = None
        flow.iheld = flow.oheld = 0
        if not flow.close_sends_fin:  # the sockets stay open after on_done: take them out of the epoll set
            for fd in (flow.cfd, flow.ufd):
                try:
                    self.ep.unregister(fd)
                except OSError:
                    pass
        flow.running = 0
        if flow.on_done is not None:
            flow.on_done(flow)
        if self.closing and not self.count:
            self._wake()
