"""Adaptive micro-batching: concurrent requests to the same model version are scored in one
``predict`` call.

A pyfunc ``predict`` costs about as much for 64 rows as for one (per-call overhead dominates),
so under concurrency one call per batch multiplies throughput. Each (model, version, params)
key has a dispatcher thread that takes every request already queued; if more requests for the
key are being parsed at that moment it waits for them, but never longer than ``max_wait_s``.
At low load a request is therefore scored at once, with no added wait.

A dispatcher is stopped (a sentinel in its queue) when its version is evicted. A batch whose
``predict`` raises is re-scored request by request, so one bad input never fails
its neighbours.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rollouts.serving.schema import predictions_to_jsonable


@dataclass
class _Item:
    columns: dict[str, Any]
    rows: int
    future: Future = field(default_factory=Future)


def positive_class_scorer(model: Any) -> Any | None:
    """The binary scikit-learn classifier inside a pyfunc ``model`` (one with ``predict_proba``
    and two ``classes_``), or None for any other model."""
    estimator = getattr(getattr(model, "_model_impl", None), "sklearn_model", None)
    classes = getattr(estimator, "classes_", None)
    if classes is None or len(classes) != 2 or not hasattr(estimator, "predict_proba"):
        return None
    return estimator


def positive_class_scores(estimator: Any, records: list[dict[str, Any]]) -> list[float] | None:
    """Probability of ``classes_[1]`` (scikit-learn's positive class) for each logged input
    row, from :func:`positive_class_scorer`'s estimator; None if ``predict_proba`` fails.

    Called by the prediction-log writer on whole flushes, off the request path: one
    ``predict_proba`` per flush instead of one per micro-batch."""
    try:
        frame = pd.DataFrame.from_records(records)
        names = getattr(estimator, "feature_names_in_", None)
        if names is not None:
            frame = frame[list(names)]
        proba = estimator.predict_proba(frame)
    except Exception:  # noqa: BLE001 - scores are optional; predictions already succeeded
        return None
    return [float(p) for p in np.asarray(proba, dtype=float)[:, 1]]


def score(
    model: Any, params: dict[str, Any] | None, schema_enforced: bool, columns: dict[str, Any]
) -> tuple[list[Any], list[float] | None]:
    """(predictions, positive-class scores or None) of one ``predict`` call on ``columns``.

    ``schema_enforced``: the columns were validated and typed against a column-based signature,
    so the flavor's predict may be called without pyfunc's enforcement."""
    frame = pd.DataFrame(columns)
    target = model
    impl = getattr(model, "_model_impl", None)
    if schema_enforced:
        # Rollgate already typed every column to the signature (rollouts.serving.schema), so
        # pyfunc's own schema enforcement, most of a small predict's cost, would only do
        # the same work again: call the flavor's predict directly.
        if impl is not None and callable(getattr(impl, "predict", None)):
            target = impl
    raw = target.predict(frame, params=params) if params else target.predict(frame)
    return predictions_to_jsonable(raw), None  # scores: filled in by the log writer


Scored = tuple[list[Any], "list[float] | None"]


def score_batch(
    model: Any,
    params: dict[str, Any] | None,
    schema_enforced: bool,
    parts: list[tuple[dict[str, Any], int]],
) -> list[Scored | Exception]:
    """Score several requests' ``(columns, rows)`` in one ``predict`` call and split the result
    back, in order: each entry is that request's (predictions, scores) or the exception its own
    rows raised. If the merged call fails, each request is re-scored alone, so one bad input
    never fails its neighbours."""
    if len(parts) > 1:
        try:
            merged = {
                name: np.concatenate([columns[name] for columns, _ in parts])
                for name in parts[0][0]
            }
            predictions, scores = score(model, params, schema_enforced, merged)
            if len(predictions) != sum(rows for _, rows in parts):
                raise ValueError("the model returned a different number of predictions than rows")
        except Exception:  # noqa: BLE001 - re-scored one by one below
            pass
        else:
            results: list[Scored | Exception] = []
            start = 0
            for _, rows in parts:
                end = start + rows
                results.append(
                    (predictions[start:end], None if scores is None else scores[start:end])
                )
                start = end
            return results
    results = []
    for columns, _ in parts:
        try:
            results.append(score(model, params, schema_enforced, columns))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request
            results.append(exc)
    return results


class _Dispatcher:
    def __init__(
        self,
        model: Any,
        params: dict[str, Any] | None,
        *,
        max_wait_s: float,
        max_rows: int,
        on_batch: Callable[[int], None],
    ) -> None:
        self.model = model
        self.params = params
        self.schema_enforced = False  # set by MicroBatcher.predict for column-based signatures
        self.max_wait_s = max_wait_s
        self.max_rows = max_rows
        self.on_batch = on_batch
        self.queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self.incoming = 0  # requests that announced themselves and are still being parsed
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="rollgate-batcher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)  # type: ignore[arg-type]

    def _gather(self) -> list[_Item]:
        first = self.queue.get()
        if first is None:
            return []
        batch = [first]
        rows = batch[0].rows
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_rows:
            try:
                item = self.queue.get_nowait()
                if item is None:
                    self.queue.put(None)  # stop after this batch
                    break
            except queue.Empty:
                with self.lock:
                    expecting = self.incoming > 0
                remaining = deadline - time.monotonic()
                if not expecting or remaining <= 0:
                    break
                try:
                    item = self.queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)
                    break
            batch.append(item)
            rows += item.rows
        return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if not batch:
                return
            self.on_batch(sum(item.rows for item in batch))
            results = score_batch(
                self.model,
                self.params,
                self.schema_enforced,
                [(item.columns, item.rows) for item in batch],
            )
            for item, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)


class MicroBatcher:
    """Score requests through per-version dispatcher threads.

    Usage in a request: ``with batcher.expect(key):`` around parsing (so the dispatcher knows
    a request is coming), then ``batcher.predict(key, model, columns, rows, params)``.
    """

    def __init__(
        self, *, max_wait_s: float, max_rows: int, on_batch: Callable[[int], None] = lambda n: None
    ) -> None:
        self.max_wait_s = max_wait_s
        self.max_rows = max_rows
        self.on_batch = on_batch
        self._dispatchers: dict[tuple, _Dispatcher] = {}
        self._guard = threading.Lock()

    @staticmethod
    def key(model_name: str, version: int, params: dict[str, Any] | None) -> tuple:
        return (model_name, version, json.dumps(params, sort_keys=True) if params else None)

    def _dispatcher(self, key: tuple, model: Any, params: dict[str, Any] | None) -> _Dispatcher:
        dispatcher = self._dispatchers.get(key)
        if dispatcher is None or dispatcher.model is not model:
            with self._guard:
                dispatcher = self._dispatchers.get(key)
                if dispatcher is None or dispatcher.model is not model:
                    if dispatcher is not None:
                        dispatcher.stop()
                    dispatcher = _Dispatcher(
                        model,
                        params,
                        max_wait_s=self.max_wait_s,
                        max_rows=self.max_rows,
                        on_batch=self.on_batch,
                    )
                    self._dispatchers[key] = dispatcher
        return dispatcher

    def announce(self, model_name: str, version: int, model: Any) -> Callable[[], None]:
        """Tell the version's dispatcher a request is being parsed; returns the callable that
        withdraws the announcement (call it once, after submitting or on error)."""
        dispatcher = self._dispatcher(self.key(model_name, version, None), model, None)
        with dispatcher.lock:
            dispatcher.incoming += 1
        done = threading.Event()

        def withdraw() -> None:
            if not done.is_set():
                done.set()
                with dispatcher.lock:
                    dispatcher.incoming -= 1

        return withdraw

    def predict(
        self,
        model_name: str,
        version: int,
        model: Any,
        columns: dict[str, Any],
        rows: int,
        params: dict[str, Any] | None,
        *,
        schema_enforced: bool = False,
        timeout_s: float = 30.0,
    ) -> tuple[list[Any], list[float] | None]:
        """Predictions for this request's ``rows`` rows (a list, in row order), and the
        positive-class probability of each row when the model is a binary scikit-learn
        classifier (else None; see :func:`positive_class_scores`).

        ``schema_enforced``: the columns were validated and typed against a column-based
        signature, so the flavor's predict may be called without pyfunc's enforcement.

        Raises whatever the model's ``predict`` raised on this request's own rows, or
        TimeoutError after ``timeout_s``.
        """
        item = _Item(columns=columns, rows=rows)
        dispatcher = self._dispatcher(self.key(model_name, version, params), model, params)
        dispatcher.schema_enforced = schema_enforced
        dispatcher.queue.put(item)
        return item.future.result(timeout=timeout_s)

    def retain(self, keep: set[tuple[str, int]]) -> None:
        """Forget dispatchers of versions no longer routed (their threads idle on an empty
        queue and hold the model only until then)."""
        with self._guard:
            for key in [k for k in self._dispatchers if (k[0], k[1]) not in keep]:
                self._dispatchers.pop(key).stop()


@dataclass
class _LoopBatch:
    model: Any
    params: dict[str, Any] | None
    schema_enforced: bool
    parts: list[tuple[dict[str, Any], int, asyncio.Future]] = field(default_factory=list)
    rows: int = 0


class LoopBatcher:
    """Micro-batching inside one asyncio event loop (the ASGI serving path), without threads.

    A request's rows join the open batch of its (model, version, params) key. The batch is
    scored one loop turn after its first request arrived (so every request already readable in
    that turn joins it), later only while requests announced for the version are still
    receiving their bodies, and never later than ``max_wait_s``. Scoring runs in the loop:
    it is CPU work, and while it runs new requests gather in the sockets, which is what makes
    the next batch under load. Same results and the same one-bad-input rule as
    :class:`MicroBatcher` (:func:`score_batch`).
    """

    def __init__(
        self, *, max_wait_s: float, max_rows: int, on_batch: Callable[[int], None] = lambda n: None
    ) -> None:
        self.max_wait_s = max_wait_s
        self.max_rows = max_rows
        self.on_batch = on_batch
        self._open: dict[tuple, _LoopBatch] = {}
        self._incoming: dict[tuple[str, int], int] = {}

    def announce(self, model_name: str, version: int) -> Callable[[], None]:
        """Count a request of this version as on its way (its body is being received); returns
        the callable that withdraws it (idempotent)."""
        key = (model_name, version)
        self._incoming[key] = self._incoming.get(key, 0) + 1
        done = False

        def withdraw() -> None:
            nonlocal done
            if not done:
                done = True
                left = self._incoming[key] - 1
                if left:
                    self._incoming[key] = left
                else:
                    del self._incoming[key]

        return withdraw

    async def predict(
        self,
        model_name: str,
        version: int,
        model: Any,
        columns: dict[str, Any],
        rows: int,
        params: dict[str, Any] | None,
        *,
        schema_enforced: bool = False,
    ) -> tuple[list[Any], list[float] | None]:
        """As :meth:`MicroBatcher.predict`, awaited in the event loop."""
        loop = asyncio.get_running_loop()
        key = (*MicroBatcher.key(model_name, version, params), id(model), schema_enforced)
        batch = self._open.get(key)
        if batch is None:
            batch = _LoopBatch(model, params, schema_enforced)
            self._open[key] = batch
            loop.create_task(self._score(key, batch, (model_name, version)))
        future: asyncio.Future = loop.create_future()
        batch.parts.append((columns, rows, future))
        batch.rows += rows
        if batch.rows >= self.max_rows and self._open.get(key) is batch:
            del self._open[key]  # full: the next request opens a new batch
        return await future

    async def _score(self, key: tuple, batch: _LoopBatch, version_key: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        try:
            await asyncio.sleep(0)
            while self._incoming.get(version_key) and batch.rows < self.max_rows:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(remaining, 0.0005))
        finally:
            if self._open.get(key) is batch:
                del self._open[key]
        try:
            self.on_batch(batch.rows)
            results = score_batch(
                batch.model,
                batch.params,
                batch.schema_enforced,
                [(columns, rows) for columns, rows, _ in batch.parts],
            )
        except BaseException as exc:  # never leave a request waiting forever
            results = [exc if isinstance(exc, Exception) else RuntimeError(repr(exc))] * len(
                batch.parts
            )
        for (_, _, future), result in zip(batch.parts, results, strict=True):
            if future.done():  # the client went away
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
