"""Micro-batching and the buffered prediction log, with real threads."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from rollouts.serving.batching import MicroBatcher


class EchoModel:
    """Returns each row's ``x`` times 10; counts predict calls and rejects x < 0."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def predict(self, frame: pd.DataFrame, params=None):
        with self.lock:
            self.calls.append(len(frame))
        if (frame["x"] < 0).any():
            raise ValueError("negative x")
        return (frame["x"] * 10).to_numpy()


def _columns(values: list[int]) -> dict[str, np.ndarray]:
    return {"x": np.asarray(values, dtype=np.int64)}


def test_concurrent_requests_share_predict_calls_and_get_their_own_results():
    model = EchoModel()
    batcher = MicroBatcher(max_wait_s=0.005, max_rows=256)
    results: dict[int, list] = {}
    barrier = threading.Barrier(32)

    def client(i: int) -> None:
        rows = [i * 100 + j for j in range(i % 3 + 1)]  # 1 to 3 rows, distinct per client
        barrier.wait()
        withdraw = batcher.announce("m", 1, model)
        withdraw()
        results[i] = (rows, batcher.predict("m", 1, model, _columns(rows), len(rows), None)[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 32
    for rows, predictions in results.values():
        assert predictions == [r * 10 for r in rows]  # never mixed up between requests
    assert sum(model.calls) == sum(len(rows) for rows, _ in results.values())
    assert len(model.calls) < 32  # some requests were scored together


def test_one_bad_request_does_not_fail_its_batch_neighbours():
    model = EchoModel()
    batcher = MicroBatcher(max_wait_s=0.05, max_rows=256)
    outcomes: dict[int, object] = {}
    barrier = threading.Barrier(8)
    withdraws = [batcher.announce("m", 1, model) for _ in range(8)]  # all expected at once

    def client(i: int) -> None:
        rows = [-1] if i == 3 else [i]
        barrier.wait()
        withdraws[i]()
        try:
            outcomes[i] = batcher.predict("m", 1, model, _columns(rows), 1, None)[0]
        except ValueError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert isinstance(outcomes[3], ValueError)
    assert all(outcomes[i] == [i * 10] for i in range(8) if i != 3)


def test_a_lone_request_is_scored_alone_without_waiting_for_company():
    model = EchoModel()
    batcher = MicroBatcher(max_wait_s=5.0, max_rows=256)  # a long bound that must not be used
    assert batcher.predict("m", 1, model, _columns([7]), 1, None, timeout_s=2.0) == ([70], None)
    assert model.calls == [1]


def test_requests_with_different_params_are_never_batched_together():
    seen = []

    class ParamModel:
        def predict(self, frame, params=None):
            seen.append((len(frame), params))
            return np.zeros(len(frame))

    model, batcher = ParamModel(), MicroBatcher(max_wait_s=0.0, max_rows=256)
    batcher.predict("m", 1, model, _columns([1]), 1, {"t": 1})
    batcher.predict("m", 1, model, _columns([1]), 1, {"t": 2})
    assert seen == [(1, {"t": 1}), (1, {"t": 2})]


def test_evicted_versions_stop_their_dispatcher_threads():
    model = EchoModel()
    batcher = MicroBatcher(max_wait_s=0.0, max_rows=256)
    batcher.predict("m", 1, model, _columns([1]), 1, None)
    dispatcher = batcher._dispatchers[batcher.key("m", 1, None)]
    batcher.retain(set())
    dispatcher.thread.join(timeout=5)
    assert not dispatcher.thread.is_alive()


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_buffered_log_writes_every_row_in_bulk_and_flush_drains_it(settings, synced):
    from rollouts.models import Endpoint, Environment, PredictionLog
    from rollouts.serving.logbuffer import LogBuffer

    v1, _ = synced
    endpoint = Endpoint.objects.create(
        name="buffer-test",
        environment=Environment.objects.get(name="staging"),
        registered_model=v1.registered_model,
    )
    settings.SERVING_LOG_BUFFERED = True
    settings.SERVING_LOG_FLUSH_S = 60.0  # the writer thread would wait a minute; flush() must not
    buffer = LogBuffer()
    from django.utils import timezone

    rows = [
        PredictionLog(
            request_id=f"00000000-0000-4000-8000-{i:012d}",
            endpoint=endpoint,
            model_version=v1,
            features={"x": i},
            prediction=1,
            latency_ms=1.0,
            created_at=timezone.now(),
        )
        for i in range(2500)
    ]
    for start in range(0, 2500, 100):
        buffer.append(rows[start : start + 100])
    buffer.flush()
    assert PredictionLog.objects.count() == 2500
    assert buffer.pending() == 0


def test_the_event_loop_batcher_gives_each_request_its_own_results_and_isolates_bad_input():
    import asyncio

    from rollouts.serving.batching import LoopBatcher

    model = EchoModel()
    batcher = LoopBatcher(max_wait_s=0.005, max_rows=256)
    inputs = {i: [i * 100 + j for j in range(i % 3 + 1)] for i in range(32)}
    inputs[7] = [-1]  # the model refuses it

    async def run():
        async def one(i: int):
            try:
                predictions, scores = await batcher.predict(
                    "m", 1, model, _columns(inputs[i]), len(inputs[i]), None
                )
            except ValueError as exc:
                return str(exc)
            return predictions

        return await asyncio.gather(*(one(i) for i in inputs))

    results = dict(zip(inputs, asyncio.run(run()), strict=True))

    assert results.pop(7) == "negative x"
    assert results == {i: [v * 10 for v in inputs[i]] for i in results}
    assert model.calls[0] == sum(len(v) for v in inputs.values())  # one merged call first
    assert len(model.calls) < len(inputs) + 2  # then one by one, once, after it failed
