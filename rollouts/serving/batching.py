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


def positive_class_scores(impl: Any, frame: pd.DataFrame) -> list[float] | None:
    """Probability of the second of two classes (``classes_[1]``, scikit-learn's positive
    class) for each row of ``frame``, when ``impl`` wraps a binary scikit-learn classifier with
    ``predict_proba``; None for any other model, or if ``predict_proba`` fails. Logged so that
    monitoring can compute ROC AUC."""
    estimator = getattr(impl, "sklearn_model", None)
    classes = getattr(estimator, "classes_", None)
    if classes is None or len(classes) != 2 or not hasattr(estimator, "predict_proba"):
        return None
    try:
        proba = estimator.predict_proba(frame)
    except Exception:  # noqa: BLE001 - scores are optional; predictions already succeeded
        return None
    return [float(p) for p in np.asarray(proba, dtype=float)[:, 1]]


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

    def _predict(self, columns: dict[str, Any]) -> tuple[list[Any], list[float] | None]:
        """(predictions, positive-class scores or None) for the merged columns."""
        frame = pd.DataFrame(columns)
        target = self.model
        impl = getattr(self.model, "_model_impl", None)
        if self.schema_enforced:
            # Rollgate already typed every column to the signature (rollouts.serving.schema), so
            # pyfunc's own schema enforcement, most of a small predict's cost, would only do
            # the same work again: call the flavor's predict directly.
            if impl is not None and callable(getattr(impl, "predict", None)):
                target = impl
        raw = target.predict(frame, params=self.params) if self.params else target.predict(frame)
        scores = None
        if self.schema_enforced and not self.params:
            scores = positive_class_scores(impl, frame)
        return predictions_to_jsonable(raw), scores

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if not batch:
                return
            self.on_batch(sum(item.rows for item in batch))
            if len(batch) == 1:
                self._score_alone(batch[0])
                continue
            try:
                merged = {
                    name: np.concatenate([item.columns[name] for item in batch])
                    for name in batch[0].columns
                }
                predictions, scores = self._predict(merged)
                if len(predictions) != sum(item.rows for item in batch):
                    raise ValueError(
                        "the model returned a different number of predictions than rows"
                    )
            except Exception:  # noqa: BLE001 - re-score one by one, so only the culprit fails
                for item in batch:
                    self._score_alone(item)
                continue
            start = 0
            for item in batch:
                end = start + item.rows
                item.future.set_result(
                    (predictions[start:end], None if scores is None else scores[start:end])
                )
                start = end

    def _score_alone(self, item: _Item) -> None:
        try:
            item.future.set_result(self._predict(item.columns))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request
            item.future.set_exception(exc)


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
