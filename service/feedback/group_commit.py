"""Group commit for feedback writes: votes that arrive while earlier ones are at the database go together in the
next statement, one transaction for the lot.

A vote is still acknowledged only after the transaction holding it has committed. What batching changes is the
cost: one round trip, one pool checkout and one commit (one WAL flush) for a whole batch instead of per vote, so the
ingest rate is limited neither by the pool size times the commit latency nor by per-statement overhead. Without load
a vote is written at once and alone, so batching adds no latency. Two writes to the same feedback row (message,
owner, kind) never share a batch, since one statement may change a row only once. If a batch fails, its writes are
retried one by one, so a bad write fails only its own request. This module knows nothing about callers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import asyncpg

from service.errors import Unavailable
from service.feedback import store
from service.feedback.store import Saved, Write

log = logging.getLogger(__name__)
Pending = tuple[Write, asyncio.Future]


class GroupCommit:
    """Writes feedback through ``store.save`` in batches, at most ``max_in_flight`` statements at a time (default:
    half the pool, so other requests keep connections of their own).

    Several statements in flight overlap their commits (a WAL flush each, milliseconds); until they are all busy a
    vote is written alone and at once, and under load the waiting votes pile into the next free statement. One
    statement alone made every vote wait out a whole flush before its own.
    """

    def __init__(self, pool: asyncpg.Pool, *, max_in_flight: int | None = None, max_batch: int = 256):
        self.pool, self.max_batch = pool, max_batch
        self.max_in_flight = max_in_flight or max(1, pool.get_max_size() // 2)
        self._waiting: deque[Pending] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    async def save(self, write: Write) -> Saved:
        """Store one write (with the next batch) and return what was found and done, once committed."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((write, future))
        self._start_batches()
        return await future

    def _start_batches(self) -> None:
        while self._waiting and self._in_flight < self.max_in_flight:
            batch = self._next_batch()
            if not batch:
                return
            self._in_flight += 1
            task = asyncio.create_task(self._write(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _next_batch(self) -> list[Pending]:
        """The waiting writes in arrival order, up to max_batch, one per feedback row; the rest keep waiting."""
        batch: list[Pending] = []
        rows: set = set()
        later: list[Pending] = []
        while self._waiting and len(batch) < self.max_batch:
            write, future = pending = self._waiting.popleft()
            if future.done():  # its request was cancelled before anything was written: nothing to do
                continue
            if write.row_key in rows:
                later.append(pending)
            else:
                rows.add(write.row_key)
                batch.append(pending)
        self._waiting.extendleft(reversed(later))
        return batch

    async def _write(self, batch: list[Pending]) -> None:
        try:
            await self._save(batch)
        except BaseException as exc:  # never leave a request waiting: it gets the error (503 on shutdown)
            stopped = not isinstance(exc, Exception)
            for _, future in batch:
                _settle(future, exception=Unavailable("the service is stopping; retry") if stopped else exc)
            if stopped:
                raise
        finally:
            self._in_flight -= 1
            self._start_batches()

    async def _save(self, batch: list[Pending]) -> None:
        try:
            results = await store.save(self.pool, [write for write, _ in batch])
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exception=exc)
                return
            log.warning("a batch of %d feedback writes failed (%s); writing them one by one", len(batch), exc)
            for pending in batch:  # the statement was atomic, nothing of it is stored
                await self._save([pending])
            return
        for (_, future), result in zip(batch, results, strict=True):
            _settle(future, result=result)


def _settle(future: asyncio.Future, *, result: Saved | None = None, exception: BaseException | None = None) -> None:
    if future.done():  # the request was cancelled meanwhile (the client went away)
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
