"""Moving bytes between the two legs of a connection: splice(2) through a pipe, recv_into/send as the fallback.

Two engines behind one interface (:class:`Engine`, chosen by ``proxy.relay``), each awaited by the connection's own
task with ``await engine.splice(flow)``:

- :class:`SharedRelay` (``"shared"``, the default): one trio task relays every connection from an edge-triggered
  epoll fd of its own, each socket registered once; the connection task sleeps until its flow ends. A direction
  holds a pipe (or a copy buffer) only while it has bytes in flight: it takes one from a small process-wide pool
  when the source is readable, and gives it back once the pipe is empty again. An idle connection therefore costs
  its two sockets, a :class:`Flow` and its parked task; the number of pipes is bounded by the number of directions
  moving data at the same moment, not by the number of connections.
- :class:`TaskRelay` (``"tasks"``): the textbook trio form, two child tasks per connection, each splicing one
  direction with ``wait_readable`` / ``wait_writable``. The readable reference, and the differential oracle of the
  tests.

What the caller can rely on, with either engine:

- every byte arrives once and in order, whatever the chunking;
- EOF on one side becomes ``shutdown(SHUT_WR)`` on the other while the other direction keeps flowing; the flow is
  done when both directions have seen EOF (outcome ``"ok"``). With ``close_sends_fin`` (the server: it closes both
  sockets as soon as the flow ends) the second shutdown is skipped: the close sends the same FIN;
- a reset (or any other error) on either side ends both directions at once (outcome ``"reset"``): the caller closes
  both sockets with SO_LINGER 0 so the other peer sees a reset too;
- :func:`abort` ends both directions at once (the idle check uses it: outcome ``"idle"``);
- bytes still in flight when a flow ends (an abort, a failure, a cancellation) are discarded and ``flow.lost`` is
  true: the caller must then close with a reset, never a FIN (the peer would take a short stream for a whole one);
- ``stats.relay_path`` counts each direction once, when it ends, by the path it ended on (a fallback from splice
  to copy is counted in ``stats.splice_fallbacks``): counters only go up.

Resource handling: the engines never close the sockets. A pipe that still holds bytes when its flow ends is closed
rather than pooled, so a pooled pipe is always empty.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
from collections.abc import Collection
from typing import Any, Protocol

import attrs
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
_current_task = trio.lowlevel.current_task
_reschedule = trio.lowlevel.reschedule
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_ABORT_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED
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


@attrs.define(slots=True, eq=False, weakref_slot=False)
class Flow:
    """One relayed connection as an engine sees it: the two sockets, bytes each way, outcome, last activity.

    The engine's own per-flow state follows (who relays it, the task or cancel scope to wake, the fds, per direction
    a pipe or unsent bytes and how many bytes it holds, the direction flags). Identity semantics (``eq=False``):
    flows live in sets.
    """

    client: socket.socket | None = None
    upstream: socket.socket | None = None
    bytes_in: int = 0  # client -> upstream
    bytes_out: int = 0  # upstream -> client
    outcome: str | None = None  # "reset" | "idle" | "cancelled" once decided; None: "ok" so far
    error: BaseException | None = None  # what ended a "reset" flow
    last: float = 0.0  # trio.current_time() of the last byte moved (or of the start)
    aborted: bool = False
    owner: Any = None  # the engine relaying it, while it does
    task: Any = None  # shared: the parked connection task; tasks: the cancel scope of the two directions
    cfd: int = -1
    ufd: int = -1
    ipipe: Any = None
    iheld: int = 0
    opipe: Any = None
    oheld: int = 0
    state: int = 0

    @property
    def lost(self) -> bool:
        """Whether bytes were in flight when it ended (they were discarded): the peers must see a reset."""
        return bool(self.state & LOST)


def abort(flow: Flow, outcome: str, error: BaseException | None = None) -> None:
    """End both directions of ``flow`` now; the first outcome given sticks. Idempotent. The engine relaying it
    ends it at its next turn (shared) or by cancelling its directions (tasks)."""
    if flow.outcome is None:
        flow.outcome = outcome
        flow.error = error
    if not flow.aborted:
        flow.aborted = True
        owner = flow.owner
        if owner is not None:
            owner.kick(flow)


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
    engine: str = "shared",
    use_splice: bool = True,
    pipes: PipePool = PIPES,
    buffers: BufferPool = BUFFERS,
) -> str:
    """Relay between two connected non-blocking sockets until both directions end; returns the outcome.

    The self-contained form for one connection: an engine of its own and an idle check, in a nursery of their own.
    The server shares one engine between all its connections and checks idleness for every connection at once.

    Error handling: socket errors never escape; they end the relay with outcome ``"reset"`` (``flow.error`` says
    which). Cancellation propagates (outcome ``"cancelled"``).
    """
    flow.client, flow.upstream = client, upstream
    flow.last = _current_time()
    eng: Engine | None = None
    try:
        async with trio.open_nursery() as nursery:
            eng = make_engine(engine, stats, nursery, use_splice=use_splice, pipes=pipes, buffers=buffers)
            eng.close_when_empty()
            nursery.start_soon(reap_idle, [flow], idle_timeout)
            outcome = await eng.splice(flow)
            nursery.cancel_scope.cancel()
    finally:
        if eng is not None:
            eng.close()
    return outcome


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


class Engine(Protocol):
    """What the server needs from a relay engine (``proxy.relay``).

    - ``await engine.splice(flow)``: relay ``flow`` (both sockets connected and non-blocking) in both directions
      until both have ended; returns the outcome (``"ok"``, ``"reset"``, ``"idle"``, ``"cancelled"``). EOF on one
      side becomes ``shutdown(SHUT_WR)`` on the other while the other direction keeps flowing; an error on either
      side ends both (``"reset"``); :func:`abort` ends both at once with its outcome; cancelling the caller ends
      the flow (``"cancelled"``) before the Cancelled propagates. ``flow.lost`` tells whether bytes in flight were
      discarded (the caller must close with a reset). The engine never closes the sockets.
    - ``kick(flow)``: used by :func:`abort`.
    - ``close_when_empty()`` (no new flows are coming: background work may end with the last flow) and
      ``close()`` (release what the engine holds; after every splice has returned).
    """

    name: str

    async def splice(self, flow: Flow) -> str: ...

    def kick(self, flow: Flow) -> None: ...

    def close_when_empty(self) -> None: ...

    def close(self) -> None: ...


def make_engine(name: str, stats: Stats, nursery: trio.Nursery, **options: Any) -> Engine:
    """The engine called ``name`` (``"shared"`` or ``"tasks"``); ``options`` are its constructor's (``use_splice``,
    ``pipes``, ``buffers``, ``close_sends_fin``: the caller closes both sockets as soon as :meth:`Engine.splice`
    returns, so the last EOF needs no ``shutdown``). ``nursery`` holds the shared engine's task."""
    if name == "shared":
        return SharedRelay(stats, nursery, **options)
    if name == "tasks":
        return TaskRelay(stats, **options)
    raise ValueError(f"unknown relay engine {name!r} (expected shared or tasks)")


def _count_paths(stats: Stats, flow: Flow) -> None:
    """Count the flow's two directions by the path each ended on (a counter never goes down)."""
    paths = stats.relay_path
    paths["copy" if flow.state & _IN_COPY else "splice"] += 1
    paths["copy" if flow.state & _OUT_COPY else "splice"] += 1


# -- the epoll relay: one task for every relaying connection

_EPOLL_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_RD = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WR = select.EPOLLOUT
_IN_DONE, _OUT_DONE, _IN_COPY, _OUT_COPY = 1, 2, 4, 8
LOST = 16  # bytes in flight were discarded when the flow ended
_BOTH_DONE = _IN_DONE | _OUT_DONE
_WAIT, _MORE, _EOF, _FAIL, _NOSPLICE = 0, 1, 2, 3, 4
BUDGET = 16  # transfers per direction and wakeup before the other connections get their turn
_checkpoint = trio.lowlevel.checkpoint


class SharedRelay:
    """The ``shared`` engine: relays any number of flows from one trio task that waits on an epoll fd of its own
    (edge-triggered); the connection task that called :meth:`splice` sleeps until its flow ends and is woken
    directly (``trio.lowlevel.reschedule``: no Event, no wait queue per connection).

    Each socket is registered once (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET) when its flow is added; a wakeup drains
    ``epoll.poll(0)`` and moves each ready direction until EAGAIN (or :data:`BUDGET` transfers, after which the
    flow waits for its next turn behind a checkpoint). The semantics are the module's: every byte once and
    in order, EOF -> ``shutdown(SHUT_WR)`` on the other side, an error -> outcome ``"reset"`` for both directions,
    :func:`abort` ends the flow, the copy path when the kernel refuses to splice.

    Use: ``engine = SharedRelay(stats, nursery)``; set ``flow.client``, ``flow.upstream``, ``flow.last``, then
    ``await engine.splice(flow)``. The relay task runs in ``nursery`` while there are flows (it is started again
    when needed) and, after :meth:`close_when_empty`, ends with the last flow. When the relay task is cancelled
    every flow ends with outcome ``"cancelled"`` (and its connection task is woken); when a connection task is
    cancelled, its flow ends with outcome ``"cancelled"``.

    Resource handling: the relay never closes the sockets (the caller does, after :meth:`splice`); when
    ``close_sends_fin`` is false the sockets are unregistered from the epoll fd when the flow ends. :meth:`close`
    closes the epoll fd.
    """

    name = "shared"

    def __init__(
        self,
        stats: Stats,
        nursery: trio.Nursery,
        *,
        use_splice: bool = True,
        pipes: PipePool = PIPES,
        buffers: BufferPool = BUFFERS,
        close_sends_fin: bool = False,
    ) -> None:
        self.stats = stats
        self.close_sends_fin = close_sends_fin
        self.nursery = nursery
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

    async def splice(self, flow: Flow) -> str:
        """Relay ``flow`` until both directions end; returns the outcome (see :class:`Engine`)."""
        self.add(flow)
        if flow.owner is self:
            flow.task = _current_task()

            def unpark(_raise_cancel: Any) -> Any:  # the connection task is cancelled: end its flow first
                flow.task = None
                if flow.owner is self:
                    if flow.outcome is None:
                        flow.outcome = "cancelled"
                    self._end(flow)
                return _ABORT_SUCCEEDED

            await _wait_task_rescheduled(unpark)
        return flow.outcome or "ok"

    def add(self, flow: Flow) -> None:
        """Start relaying ``flow`` (its sockets connected and non-blocking); :meth:`splice` waits for it to end."""
        flow.owner = self
        flow.cfd = cfd = flow.client.fileno()
        flow.ufd = ufd = flow.upstream.fileno()
        if not self.use_splice:
            flow.state = _IN_COPY | _OUT_COPY
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
        except BaseException:
            self.running = False
            self._cancel_all()
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
                    if not flow.state & _OUT_DONE or not self.close_sends_fin:
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
                    if not flow.state & _IN_DONE or not self.close_sends_fin:
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
                self.stats.splice_fallbacks += 1
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
        state = flow.state
        if flow.iheld or flow.oheld:
            state |= LOST  # (a copy direction's unsent bytes are dropped with the flow)
        for pipe, held, copy in (
            (flow.ipipe, flow.iheld, state & _IN_COPY),
            (flow.opipe, flow.oheld, state & _OUT_COPY),
        ):
            if pipe is not None and not copy:
                if held:
                    self.pipes.discard(pipe)
                else:
                    self.pipes.put(pipe)
        flow.state = state
        flow.ipipe = flow.opipe = None
        flow.iheld = flow.oheld = 0
        _count_paths(self.stats, flow)
        if not self.close_sends_fin:  # the sockets stay open after the flow: take them out of the epoll set
            for fd in (flow.cfd, flow.ufd):
                try:
                    self.ep.unregister(fd)
                except OSError:
                    pass
        task = flow.task
        if task is not None:
            flow.task = None
            _reschedule(task)
        if self.closing and not self.count:
            self._wake()


# -- the tasks engine: two trio tasks per connection, the textbook form


class TaskRelay:
    """The ``tasks`` engine: :meth:`splice` runs one child task per direction in a nursery of the connection's own.

    Each direction loops: splice (or recv) from its source into a pipe (or buffer), wait for ``wait_readable`` when
    there is nothing, drain into the other socket, wait for ``wait_writable`` when it is full. EOF shuts down the
    other side's write half; an error fails the flow and cancels the other direction; :func:`abort` cancels both.
    """

    name = "tasks"

    def __init__(
        self,
        stats: Stats,
        *,
        use_splice: bool = True,
        pipes: PipePool = PIPES,
        buffers: BufferPool = BUFFERS,
        close_sends_fin: bool = False,
    ) -> None:
        self.stats = stats
        self.use_splice = use_splice
        self.pipes = pipes
        self.buffers = buffers
        self.close_sends_fin = close_sends_fin

    async def splice(self, flow: Flow) -> str:
        """Relay ``flow`` until both directions end; returns the outcome (see :class:`Engine`)."""
        flow.owner = self
        flow.cfd, flow.ufd = flow.client.fileno(), flow.upstream.fileno()
        if not self.use_splice:
            flow.state |= _IN_COPY | _OUT_COPY
        try:
            async with trio.open_nursery() as nursery:
                flow.task = nursery.cancel_scope
                if flow.aborted:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._direction, flow, True)
                nursery.start_soon(self._direction, flow, False)
        except BaseException:
            if flow.outcome is None:
                flow.outcome = "cancelled"
            raise
        finally:
            flow.owner = flow.task = None
            _count_paths(self.stats, flow)
        return flow.outcome or "ok"

    def kick(self, flow: Flow) -> None:
        scope = flow.task
        if scope is not None:
            scope.cancel()

    def close_when_empty(self) -> None:
        pass  # no task outlives its connection

    def close(self) -> None:
        pass

    async def _direction(self, flow: Flow, inbound: bool) -> None:
        src, dst = (flow.client, flow.upstream) if inbound else (flow.upstream, flow.client)
        copy_bit, done_bit, other_bit = (_IN_COPY, _IN_DONE, _OUT_DONE) if inbound else (_OUT_COPY, _OUT_DONE, _IN_DONE)
        pipe: tuple[int, int] | None = None
        held = 0  # bytes read from src and not yet written to dst (in the pipe, or in ``pending``)
        pending = b""
        try:
            while True:
                if flow.state & copy_bit:
                    buf = self.buffers.get()
                    try:
                        n = src.recv_into(buf)
                    except BlockingIOError:
                        n = -1
                    else:
                        pending = bytes(buf[:n])
                    finally:
                        self.buffers.put(buf)
                    if n < 0:
                        await _wait_readable(src)
                        continue
                    if n == 0:
                        break
                    held = n
                    while held:
                        try:
                            sent = dst.send(pending)
                        except BlockingIOError:
                            await _wait_writable(dst)
                            continue
                        pending = pending[sent:]
                        held -= sent
                        self._moved(flow, inbound, sent)
                    continue
                if pipe is None:
                    pipe = self.pipes.get()
                try:
                    n = _splice(src.fileno(), pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    self.pipes.put(pipe)  # an idle direction holds no pipe
                    pipe = None
                    await _wait_readable(src)
                    continue
                except OSError as e:
                    moved = flow.bytes_in if inbound else flow.bytes_out
                    if e.errno in _NO_SPLICE and not moved:  # the kernel will not splice these files: copy
                        self.pipes.put(pipe)
                        pipe = None
                        self.stats.splice_fallbacks += 1
                        flow.state |= copy_bit
                        continue
                    raise
                if n == 0:
                    break
                held = n
                while held:
                    try:
                        sent = _splice(pipe[0], dst.fileno(), held, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        await _wait_writable(dst)
                        continue
                    held -= sent
                    self._moved(flow, inbound, sent)
            flow.state |= done_bit
            if flow.aborted:  # the other direction failed first (its error consumed the reset): no FIN before it
                return
            if not flow.state & other_bit or not self.close_sends_fin:
                _eof(dst)
        except OSError as e:
            if flow.outcome is None:
                flow.outcome, flow.error = "reset", e
            flow.aborted = True
            flow.task.cancel()
        finally:
            if held:
                flow.state |= LOST
            if pipe is not None:
                if held:
                    self.pipes.discard(pipe)
                else:
                    self.pipes.put(pipe)

    def _moved(self, flow: Flow, inbound: bool, n: int) -> None:
        if inbound:
            flow.bytes_in += n
            self.stats.bytes_in += n
        else:
            flow.bytes_out += n
            self.stats.bytes_out += n
        flow.last = _current_time()
