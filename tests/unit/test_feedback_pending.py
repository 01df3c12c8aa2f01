"""Issue 9, points 12, 6 (labels) and 11: feedback that arrives before its prediction is logged
is kept and matched; labels must fit the version's output; multiclass figures are over the
classes the model knows."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from sklearn.metrics import precision_recall_fscore_support

from monitoring import metrics
from monitoring.models import GroundTruth, PendingFeedback
from monitoring.rollups import mark_logged_rows, rollups_refresh
from monitoring.tasks import match_pending_feedback
from registry.models import ModelVersion, RegisteredModel
from rollouts import services
from rollouts.models import Environment, PredictionLog

FEEDBACK = "/api/feedback"
REGRESSOR_SIGNATURE = {"inputs": [], "outputs": [{"type": "double"}]}


@pytest.fixture
def world(team, platform_admin):
    now = timezone.now()
    registered = RegisteredModel.objects.create(name="iris", team=team, synced_at=now)
    classifier = ModelVersion.objects.create(
        registered_model=registered,
        version=1,
        status="READY",
        synced_at=now,
        tags={"rollgate.classes": '["setosa", "versicolor", "virginica"]'},
    )
    regressor = ModelVersion.objects.create(
        registered_model=registered,
        version=2,
        status="READY",
        synced_at=now,
        signature=REGRESSOR_SIGNATURE,
    )
    endpoint = services.endpoint_for(
        model_version=classifier, environment=Environment.objects.get(name="staging")
    )
    key = services.api_key_create(name="web", endpoints=[endpoint], created_by=platform_admin)[1]
    return {"classifier": classifier, "regressor": regressor, "endpoint": endpoint, "key": key}


def _rows(world, version, predictions, *, request_id=None, inference_id=""):
    request_id = request_id or uuid.uuid4()
    return [
        PredictionLog(
            request_id=request_id,
            row_index=i,
            endpoint=world["endpoint"],
            model_version=version,
            inference_id=inference_id,
            features={"x": i},
            prediction=p,
            latency_ms=5.0,
            created_at=timezone.now(),
        )
        for i, p in enumerate(predictions)
    ]


def _write(rows):
    """What the serving log writer does after a flush: write, then call its hook."""
    PredictionLog.objects.bulk_create(rows)
    mark_logged_rows(rows)
    return rows


def _post(client, world, payload):
    return client.post(
        FEEDBACK,
        payload,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {world['key']}",
    )


# --- 12: labels ahead of the log --------------------------------------------------------------


def test_a_label_sent_before_its_row_is_written_is_kept_and_matched(client, world):
    rows = _rows(world, world["classifier"], ["setosa"])  # answered, still in the buffer
    rid = str(rows[0].request_id)
    response = _post(client, world, {"request_id": rid, "label": "versicolor"})
    assert response.status_code == 200, response.content
    assert response.json() == {"accepted": 0, "pending": 1, "unknown": [rid]}
    assert PendingFeedback.objects.count() == 1 and not GroundTruth.objects.exists()

    _write(rows)  # the buffer flushes: the hook matches the pending label
    assert GroundTruth.objects.get().label == "versicolor"
    assert not PendingFeedback.objects.exists()


def test_inference_ids_and_multi_row_labels_are_matched_too(client, world):
    rows = _rows(world, world["classifier"], ["setosa"] * 3, inference_id="order-7")
    response = _post(
        client, world, {"inference_id": "order-7", "label": ["setosa", "virginica", "setosa"]}
    )
    assert response.json()["pending"] == 1
    _write(rows)
    labels = dict(GroundTruth.objects.values_list("prediction__row_index", "label"))
    assert labels == {0: "setosa", 1: "virginica", 2: "setosa"}


def test_the_periodic_task_matches_labels_the_hook_missed_and_drops_expired_ones(client, world):
    rows = _rows(world, world["classifier"], ["setosa"])
    _post(client, world, {"request_id": str(rows[0].request_id), "label": "setosa"})
    PredictionLog.objects.bulk_create(rows)  # written, but the hook ran before the label came
    stale = _rows(world, world["classifier"], ["setosa"])
    _post(client, world, {"request_id": str(stale[0].request_id), "label": "setosa"})
    PendingFeedback.objects.filter(request_id=stale[0].request_id).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert match_pending_feedback() == {"accepted": 1, "pending": 0}
    assert GroundTruth.objects.get().prediction.request_id == rows[0].request_id
    assert not PendingFeedback.objects.exists()


def test_a_pending_label_respects_the_senders_scope(client, world, platform_admin):
    other = services.endpoint_for(
        model_version=world["classifier"], environment=Environment.objects.get(name="production")
    )
    rows = _rows(world, world["classifier"], ["setosa"])
    for row in rows:
        row.endpoint = other  # the key only covers the staging endpoint
    _post(client, world, {"request_id": str(rows[0].request_id), "label": "setosa"})
    _write(rows)
    assert not GroundTruth.objects.exists()
    assert PendingFeedback.objects.count() == 1  # until it expires


# --- 6: labels must fit the version's output --------------------------------------------------


@pytest.mark.parametrize(
    ("version", "label", "why"),
    [
        ("classifier", {"a": 1}, "not an object"),
        ("classifier", [["setosa"]], "not a list"),
        ("classifier", "tulip", "is not one of them"),
        ("classifier", 1.5, "is not a class"),
        ("regressor", "12.5", "must be a number"),
        ("regressor", True, "must be a number"),
        ("regressor", {"value": 3}, "not an object"),
    ],
)
def test_a_label_that_does_not_fit_the_output_is_400_naming_the_item(
    client, world, version, label, why
):
    good = _write(_rows(world, world["classifier"], ["setosa"]))
    bad = _write(_rows(world, world[version], ["setosa" if version == "classifier" else 1.0]))
    payload = [
        {"request_id": str(good[0].request_id), "label": "setosa"},
        {"request_id": str(bad[0].request_id), "label": label},
    ]
    response = _post(client, world, payload)
    assert response.status_code == 400, response.content
    assert list(response.json()) == ["[1].label"]
    assert why in response.json()["[1].label"][0]
    assert not GroundTruth.objects.exists()


def test_an_object_label_is_refused_even_before_the_row_is_logged(client, world):
    response = _post(client, world, {"request_id": str(uuid.uuid4()), "label": {"k": "v"}})
    assert response.status_code == 400 and "[0].label" in response.json()
    assert not PendingFeedback.objects.exists()


def test_labels_that_fit_are_accepted(client, world):
    cls = _write(_rows(world, world["classifier"], ["setosa"]))
    reg = _write(_rows(world, world["regressor"], [1.0]))
    payload = [
        {"request_id": str(cls[0].request_id), "label": "virginica"},
        {"request_id": str(reg[0].request_id), "label": 12},
    ]
    assert _post(client, world, payload).json()["accepted"] == 2


# --- 11: figures over the classes the model knows ---------------------------------------------


def test_a_window_with_two_of_three_classes_is_still_macro_over_three():
    confusion = metrics.Confusion()
    pairs = [(0, 0), (0, 1), (1, 1), (1, 1), (0, 0)]  # class 2 is absent from this window
    for label, prediction in pairs:
        confusion.add(label, prediction)
    quality = metrics.classification_quality(confusion, classes=["0", "1", "2"])
    assert quality.average == "macro"  # not "binary" for the positive class 1
    assert [c["label"] for c in quality.per_class] == ["0", "1", "2"]
    assert quality.per_class[2] == {
        "label": "2",
        "precision": None,
        "recall": None,
        "f1": None,
        "support": 0,
    }
    # scikit-learn over the known labels, undefined classes left out (zero_division=nan)
    y_true, y_pred = zip(*pairs, strict=True)
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=float("nan")
    )
    assert (quality.precision, quality.recall, quality.f1) == pytest.approx((p, r, f))


def test_the_metrics_api_lists_every_known_class(client, world, manager):
    rows = _write(_rows(world, world["classifier"], ["setosa", "versicolor"]))
    _post(client, world, {"request_id": str(rows[0].request_id), "label": ["setosa", "setosa"]})
    rollups_refresh(with_drift=False)
    client.force_login(manager)
    data = client.get(f"/api/endpoints/{world['endpoint'].name}/metrics").json()
    v1 = next(v for v in data if v["version"] == 1)
    assert [c["label"] for c in v1["per_class"]] == ["setosa", "versicolor", "virginica"]
    assert v1["average"] == "macro"
    assert v1["confusion"]["labels"] == ["setosa", "versicolor", "virginica"]


def test_the_serving_log_buffer_matches_pending_labels_when_it_flushes(client, world, settings):
    from rollouts.serving.logbuffer import LogBuffer

    settings.SERVING_LOG_BUFFERED = True
    settings.SERVING_LOG_FLUSH_S = 3600  # only the explicit flush below writes
    buffer = LogBuffer()
    rows = _rows(world, world["classifier"], ["virginica"])
    buffer.append(rows)  # answered: the row waits in the buffer
    rid = str(rows[0].request_id)
    assert _post(client, world, {"request_id": rid, "label": "virginica"}).json()["pending"] == 1
    assert buffer.flush() == 1
    assert GroundTruth.objects.get().label == "virginica"
    assert not PendingFeedback.objects.exists()


def test_a_skipped_feature_is_a_grey_cell_that_says_why():
    from monitoring.figures import drift_heatmaps
    from monitoring.selectors import DriftWindow

    reason = "skipped: a date/time column"
    window = DriftWindow(
        id=1,
        version=1,
        window_start=timezone.now(),
        rows=100,
        reference="training sample",
        drifted=False,
        share_drifted=0.0,
        result={
            "features": [
                {"name": "when", "status": "skipped", "psi": None, "reason": reason},
                {"name": "x", "status": "ok", "psi": 0.01, "reason": ""},
            ],
            "prediction": None,
        },
    )
    trace = drift_heatmaps([window], {1: "stable"})[0]["data"][0]
    assert trace["y"] == ["when", "x"]
    assert trace["z"] == [[None], [0]]
    assert "skipped" in trace["text"][0][0] and reason in trace["text"][0][0]
