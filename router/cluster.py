"""Several replicas on one PostgreSQL: following the shared log, the notifications that wake a replica,
and the advisory locks that let one replica at a time train or write a snapshot.

The log is the database's own rows (`router.store`: decisions, outcomes, rewards and preferences, each
with a position assigned in commit order). A `LogFollower` applies it on the event loop, in position
order, exactly once: the replica's own writes too, so every replica applies the same sequence. It reads
when a notification arrives (`Listener`, a LISTEN connection in a thread), when its own write asks it to
(`sync`: read-your-writes), and every `cluster.poll_interval_s` whatever happens, so a notification
lost while the connection was down loses nothing: reading is by position, never by notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, text

from router.db import database_error, lock_key_sql
from router.store import LogEvent

log = logging.getLogger("llm_router")

APPLY_SLICE = 64  # events applied between two yields to the event loop


def psycopg_url(engine: Engine) -> str:
    """The engine's URL as psycopg takes it (no SQLAlchemy driver suffix)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    """LISTEN on channels over a dedicated connection, in a daemon thread; reconnects after a failure.

    `on_notify(channel)` and `on_connect()` are called on the event loop (`on_connect` after each
    (re)connection: whatever was notified while the connection was down must be read now).
    """

    def __init__(
        self, url: str, channels: list[str], loop: asyncio.AbstractEventLoop, on_notify: Callable[[str], None],
        on_connect: Callable[[], None],
    ) -> None:
        self.url = url
        self.channels = channels
        self.loop = loop
        self.on_notify = on_notify
        self.on_connect = on_connect
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-router-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed while the thread still ran
            self.loop.call_soon_threadsafe(callback, *args)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as connection:
                    for channel in self.channels:
                        connection.execute(f'LISTEN "{channel}"')
                    self.connected = True
                    self._call(self.on_connect)
                    while not self._stop.is_set():
                        for notification in connection.notifies(timeout=1.0):
                            self._call(self.on_notify, notification.channel)
            except Exception as exc:  # noqa: BLE001 - an outage: retry; the follower's polling covers the gap
                if self.connected:
                    log.warning("log notifications lost (%s); reconnecting", str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
                self.connected = False
                self._stop.wait(1.0)
        self.connected = False


class LogFollower:
    """Applies the shared log after position `applied`, in order, once per event, on the event loop.

    `read(after)` returns (events, more) from a worker thread; `apply(event)` runs on the loop. One task
    reads and applies, so nothing else ever applies concurrently.
    """

    def __init__(
        self, read: Callable[[int], tuple[list[LogEvent], bool]], apply: Callable[[LogEvent], None], applied: int, poll_s: float,
        replica: str | None = None,
    ) -> None:
        self._read = read
        self._apply = apply
        self.applied = applied
        self.poll_s = poll_s
        self.replica = replica
        self.ok = True  # the last catch-up read worked
        self.on_outage: Callable[[Exception], None] | None = None  # a read failed because the database is unreachable
        self.apply_errors = 0
        self.last_caught_up = time.monotonic()
        self._lags_ms: deque[float] = deque(maxlen=2000)  # another replica's write -> applied here
        self._wake: asyncio.Event | None = None
        self._waiting: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._applying: asyncio.Lock | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="llm-router-log")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for waiting in self._waiting:
            if not waiting.done():
                waiting.cancel()

    def wake(self, *_: Any) -> None:
        if self._wake is not None:
            self._wake.set()

    async def sync(self) -> None:
        """Return once a catch-up read that started after this call has been applied (read-your-writes:
        call it after a commit, and the committed rows are applied here). Raises DatabaseUnavailable if
        that read failed."""
        if self._task is None:  # not following (not started): catch up here
            await self.catch_up()
            return
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiting)
        self.wake()
        await asyncio.shield(waiting)

    def apply_all(self, events: list[LogEvent]) -> None:
        """Apply a batch synchronously (at start, before the loop serves)."""
        for event in events:
            self._apply_one(event)

    def _apply_one(self, event: LogEvent) -> None:
        if event.seq <= self.applied:
            return
        try:
            self._apply(event)
        except Exception:  # a bug in applying one event must not stop the replica from following the log
            self.apply_errors += 1
            log.exception("could not apply log event %s (%s of %s)", event.seq, event.kind, event.decision.record.decision_id)
        self.applied = event.seq
        if event.at is not None and event.replica is not None and event.replica != self.replica:
            at = event.at if event.at.tzinfo else event.at.replace(tzinfo=UTC)
            self._lags_ms.append(max(0.0, (datetime.now(UTC) - at).total_seconds() * 1000))

    async def catch_up(self) -> None:
        if self._applying is None:
            self._applying = asyncio.Lock()
        async with self._applying:
            await self._catch_up()

    async def _catch_up(self) -> None:
        while True:
            events, more = await asyncio.to_thread(self._read, self.applied)
            for index, event in enumerate(events):
                self._apply_one(event)
                if index % APPLY_SLICE == APPLY_SLICE - 1:
                    await asyncio.sleep(0)
            if not more:
                self.last_caught_up = time.monotonic()
                return

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            waiting, self._waiting = self._waiting, []
            try:
                await self.catch_up()
            except asyncio.CancelledError:
                for future in waiting:
                    future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - the database is away: waiters get a 503, the next round retries
                error = database_error(exc)
                if error is None:
                    log.exception("reading the log failed")
                else:
                    if self.ok:
                        log.warning("reading the log failed: %s", error.message)
                    if self.on_outage is not None:
                        self.on_outage(error)
                self.ok = False
                for future in waiting:
                    if not future.done():
                        future.set_exception(error or exc)
                        future.exception()  # retrieved here: a caller that went away must not leave it unobserved
                await asyncio.sleep(min(self.poll_s, 0.5))
                continue
            self.ok = True
            for future in waiting:
                if not future.done():
                    future.set_result(None)

    def lag(self) -> dict[str, Any]:
        """How far behind the log this replica may be: propagation delays of the latest (up to 2,000)
        events other replicas wrote (their row's write time -> applied here), and when it was last fully
        caught up."""
        lags = sorted(self._lags_ms)

        def percentile(q: float) -> float | None:
            return round(lags[min(len(lags) - 1, int(q * len(lags)))], 2) if lags else None

        return {
            "applied_seq": self.applied,
            "caught_up_s_ago": round(time.monotonic() - self.last_caught_up, 3),
            "propagation_ms": {"p50": percentile(0.5), "p99": percentile(0.99), "max": round(lags[-1], 2) if lags else None,
                               "samples": len(lags)},
            "apply_errors": self.apply_errors,
            "bound_s": self.poll_s,
        }


@contextlib.asynccontextmanager
async def advisory_lease(engine: Engine, name: str) -> AsyncIterator[bool]:
    """Hold the session-level advisory lock `name` (this schema) for the block, if no one else holds it:
    yields whether it was taken. A replica that dies releases it with its connection."""
    connection = await asyncio.to_thread(engine.connect)
    taken = False
    try:
        taken = bool(await asyncio.to_thread(
            lambda: connection.execute(text(f"SELECT pg_try_advisory_lock({lock_key_sql(name)})")).scalar()
        ))
        await asyncio.to_thread(connection.commit)
        yield taken
    finally:
        if taken:
            try:
                await asyncio.to_thread(lambda: (connection.execute(text(f"SELECT pg_advisory_unlock({lock_key_sql(name)})")),
                                                 connection.commit()))
            except Exception:  # noqa: BLE001 - the connection is gone, and the lock with it
                await asyncio.to_thread(connection.invalidate)
        await asyncio.to_thread(connection.close)


def notify(engine: Engine, channel: str) -> None:
    """NOTIFY `channel` (blocking)."""
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})
