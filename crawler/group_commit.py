"""Group commit: entries submitted while a transaction runs share the next transaction.

No timer: when entries come one at a time each gets its own transaction at once; when they come
faster than a transaction takes, the ones that piled up meanwhile go together (up to
``max_batch``). One transaction at a time, run in a worker thread off the event loop.

A batch that fails with an error ``isolate`` says belongs to one entry (bad data, not an outage)
is committed again one entry at a time, so that only the culprit fails.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Generic, TypeVar

Entry = TypeVar("Entry")
Result = TypeVar("Result")


class GroupCommit(Generic[Entry, Result]):
    def __init__(self, commit: Callable[[list[Entry]], list[Result]], max_batch: int = 200,
                 isolate: Callable[[Exception], bool] | None = None):
        """``commit(entries)`` is blocking and returns one result per entry, in order;
        ``isolate(error)``: whether a failed batch is retried entry by entry (default: never)."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._commit = commit
        self._max_batch = max_batch
        self._isolate = isolate
        self._pending: list[tuple[Entry, asyncio.Future]] = []
        self._draining: asyncio.Task | None = None
        self.transactions = 0

    async def submit(self, entry: Entry) -> Result:
        """Wait until ``entry`` is committed; its result, or the exception its batch raised."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    results = await asyncio.to_thread(self._commit, [e for e, _ in batch])
                except asyncio.CancelledError:
                    self._pending[:0] = batch
                    raise
                except Exception as exc:
                    if len(batch) > 1 and self._isolate is not None and self._isolate(exc):
                        await self._commit_one_by_one(batch)
                    else:  # the whole batch failed: each waiter gets the error
                        for _, future in batch:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                self.transactions += 1
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        except asyncio.CancelledError:
            for _, future in self._pending:
                future.cancel()
            self._pending.clear()
            raise
        finally:
            self._draining = None

    async def _commit_one_by_one(self, batch: list[tuple[Entry, asyncio.Future]]) -> None:
        for index, (entry, future) in enumerate(batch):
            try:
                (result,) = await asyncio.to_thread(self._commit, [entry])
            except asyncio.CancelledError:
                self._pending[:0] = batch[index:]
                raise
            except Exception as exc:  # this entry's own error
                if not future.done():
                    future.set_exception(exc)
                continue
            self.transactions += 1
            if not future.done():
                future.set_result(result)
