"""What a data scientist does with the MLflow client, scripted for the demo and the tests: train
on scikit-learn's bundled breast-cancer data set (no download) and log the model with signature,
input example, test-split metrics and a reference sample of training rows.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import sklearn
from django.conf import settings
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

SPLIT_SEED = 42
TEST_SIZE = 0.3
#: Seed of the label permutation of the ``shuffled`` kind (deterministic: the same bad model on
#: every run; with it the model scores 0.53 accuracy on the test split, against 0.99 for v1).
SHUFFLE_SEED = 0
KINDS = ("logistic", "forest", "shuffled")
EXPERIMENT = "breast-cancer"

# skops (MLflow 3's default format for scikit-learn) refuses to load any type it does not trust.
# A tree ensemble holds ``sklearn.tree._tree.Tree`` objects, which skops does not trust by
# default, so we name exactly that type at logging time. We keep skops rather than switching to
# cloudpickle because loading a cloudpickle model executes arbitrary code from the artifact, and
# the serving processes load whatever data scientists register.
TREE_TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]


@dataclass(frozen=True)
class Split:
    X_train: pd.DataFrame
    X_test: pd.DataFrame
    y_train: pd.Series
    y_test: pd.Series


def breast_cancer_split() -> Split:
    """The fixed, stratified 70/30 split of the 569-row breast-cancer data (30 float features,
    target 0 = malignant, 1 = benign)."""
    data = load_breast_cancer(as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=data.target
    )
    return Split(X_train, X_test, y_train, y_test)


def make_estimator(kind: str):
    """``logistic`` (scaled logistic regression), ``forest`` (random forest) or ``shuffled``
    (the same logistic regression; :func:`training_labels` gives it shuffled labels)."""
    if kind in ("logistic", "shuffled"):
        return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])
    if kind == "forest":
        return RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")


def training_labels(kind: str, split: Split) -> pd.Series:
    """The labels ``kind`` is trained on: the true ones, except for ``shuffled``, a deliberately
    bad model for the demo's canary (the same rows and features, the labels permuted with
    :data:`SHUFFLE_SEED`, so that it learns nothing and still looks like a real model: same
    signature, same classes, same class balance)."""
    if kind != "shuffled":
        return split.y_train
    permuted = split.y_train.sample(frac=1.0, random_state=SHUFFLE_SEED)
    return permuted.set_axis(split.y_train.index)


def train_and_register(
    kind: str, registered_model_name: str, *, team: str | None = "diagnostics"
) -> int:
    """Train ``kind`` (see :func:`make_estimator`) on the train split, log it to MLflow and register it; returns the new
    version number. Metrics are computed on the held-out test split. ``team`` is set as the
    registered model's MLflow tag ``team``, which Rollgate reads as the owning team."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(settings.MLFLOW_TRACKING_URI)
    mlflow.set_registry_uri(settings.MLFLOW_REGISTRY_URI)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=settings.MLFLOW_ARTIFACT_ROOT)
    mlflow.set_experiment(EXPERIMENT)

    split = breast_cancer_split()
    model = make_estimator(kind)  # raises ValueError before anything is logged
    y_fit = training_labels(kind, split)
    model.fit(split.X_train, y_fit)
    predicted = model.predict(split.X_test)
    scores = model.predict_proba(split.X_test)[:, 1]
    metrics = {
        "accuracy": accuracy_score(split.y_test, predicted),
        "precision": precision_score(split.y_test, predicted),
        "recall": recall_score(split.y_test, predicted),
        "f1": f1_score(split.y_test, predicted),
        "roc_auc": roc_auc_score(split.y_test, scores),
    }
    with mlflow.start_run(run_name=f"{kind}-classifier"):
        mlflow.log_params({"model_kind": kind, "split_seed": SPLIT_SEED, "test_size": TEST_SIZE})
        if kind == "shuffled":
            mlflow.log_param("label_shuffle_seed", SHUFFLE_SEED)
        # The classes the model knows (its training labels): monitoring computes per-class and
        # macro figures over them and checks feedback labels against them.
        mlflow.log_param("classes", json.dumps(sorted(int(c) for c in split.y_train.unique())))
        mlflow.log_params(
            {k: v for k, v in model.get_params().items() if isinstance(v, int | float | str | bool)}
        )
        mlflow.log_metrics(metrics)
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(split.X_train, model.predict(split.X_train)),
            input_example=split.X_train.head(3),
            registered_model_name=registered_model_name,
            skops_trusted_types=TREE_TRUSTED_TYPES if kind == "forest" else None,
            # Pinning the requirement skips MLflow's inference, which imports the model in a
            # subprocess and costs seconds per version.
            pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
        )
        with tempfile.TemporaryDirectory() as tmp:
            # the whole training split (398 rows): drift figures on small samples are noisy
            reference = split.X_train
            path = Path(tmp) / "reference_sample.csv"
            reference.assign(target=y_fit.loc[reference.index]).to_csv(path, index=False)
            mlflow.log_artifact(str(path), artifact_path="reference")
    if team:
        mlflow.MlflowClient().set_registered_model_tag(registered_model_name, "team", team)
    return int(info.registered_model_version)
