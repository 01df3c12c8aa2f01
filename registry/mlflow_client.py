"""The only module that talks to MLflow (tracking server and model registry).

Everything returned here is plain data (dataclasses, dicts, lists), so callers never hold MLflow
objects and never call MLflow inside a database transaction. The serving runtime loads models
through :func:`load_pyfunc` as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings

from portal.errors import ServiceUnavailable

logger = logging.getLogger(__name__)


class RegistryError(ServiceUnavailable):
    """MLflow could not be reached, or it does not have what was asked for."""


@dataclass(frozen=True)
class VersionInfo:
    """One model version as MLflow knows it, with the run data the portal mirrors."""

    name: str
    version: int
    run_id: str
    source: str
    status: str
    description: str
    tags: dict[str, str]
    created_at: datetime | None
    storage_location: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    signature: dict[str, Any] | None = None
    input_example: dict[str, Any] | None = None
    flavors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RegisteredModelInfo:
    name: str
    description: str
    tags: dict[str, str]
    aliases: dict[str, int]
    created_at: datetime | None
    updated_at: datetime | None
    versions: list[VersionInfo]


def _client():
    from mlflow import MlflowClient

    return MlflowClient(
        tracking_uri=settings.MLFLOW_TRACKING_URI, registry_uri=settings.MLFLOW_REGISTRY_URI
    )


def _ts(millis: int | None) -> datetime | None:
    return datetime.fromtimestamp(millis / 1000, tz=UTC) if millis else None


def _download_uri(client, name: str, version: int) -> str:
    """Where the version's artifacts are, asked through the client API with the name as a plain
    argument. Never a ``models:/<name>/<version>`` URI: MLflow allows names that such a URI
    misreads (``demo@prod`` is read as the alias ``prod`` of ``demo``), and never a filter
    string with the name in it (a quote in ``o'neil-model`` breaks it)."""
    return client.get_model_version_download_uri(name, str(int(version)))


#: How many rows one search page asks for (MLflow's own limit for registered models is 1,000).
PAGE_SIZE = 1000


def _pages(search, **kwargs):
    """Every item of a paged MLflow search (``search(max_results=..., page_token=...)``)."""
    token = None
    while True:
        page = search(max_results=PAGE_SIZE, page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def _configure() -> None:
    import mlflow

    mlflow.set_tracking_uri(settings.MLFLOW_TRACKING_URI)
    mlflow.set_registry_uri(settings.MLFLOW_REGISTRY_URI)


def list_registered_models() -> list[RegisteredModelInfo]:
    """Every registered model with its versions (without run details), whatever their names.

    Raises:
        RegistryError: MLflow is unreachable or answered with an error.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        # All versions of all models in one paged search with no filter string, grouped here:
        # no model name is ever spliced into a filter (see _download_uri).
        by_name: dict[str, list[VersionInfo]] = {}
        for mv in _pages(client.search_model_versions):
            by_name.setdefault(mv.name, []).append(
                VersionInfo(
                    name=mv.name,
                    version=int(mv.version),
                    run_id=mv.run_id or "",
                    source=mv.source or "",
                    status=mv.status or "",
                    description=mv.description or "",
                    tags=dict(mv.tags or {}),
                    created_at=_ts(mv.creation_timestamp),
                )
            )
        models = [
            RegisteredModelInfo(
                name=rm.name,
                description=rm.description or "",
                tags=dict(rm.tags or {}),
                aliases={alias: int(v) for alias, v in (rm.aliases or {}).items()},
                created_at=_ts(rm.creation_timestamp),
                updated_at=_ts(rm.last_updated_timestamp),
                versions=sorted(by_name.get(rm.name, []), key=lambda v: v.version),
            )
            for rm in _pages(client.search_registered_models)
        ]
        return models
    except MlflowException as exc:
        raise RegistryError(str(exc)) from exc
    except OSError as exc:
        raise RegistryError(f"MLflow is unreachable: {exc}") from exc


def version_details(base: VersionInfo) -> VersionInfo:
    """``base`` completed with run metrics and params, signature, input example and flavors.

    Raises:
        RegistryError: the version or its run cannot be read.
    """
    from mlflow.exceptions import MlflowException

    _configure()
    client = _client()
    try:
        storage_location = _download_uri(client, base.name, base.version)
        metrics: dict[str, float] = {}
        params: dict[str, str] = {}
        if base.run_id:
            run = client.get_run(base.run_id)
            metrics, params = dict(run.data.metrics), dict(run.data.params)
        info = _model_info(storage_location)
        signature = None
        if info.signature is not None:
            raw = info.signature.to_dict()
            signature = {
                key: json.loads(raw[key]) if raw.get(key) else None
                for key in ("inputs", "outputs", "params")
            }
        input_example = _serving_input_example(storage_location)
    except MlflowException as exc:
        raise RegistryError(str(exc)) from exc
    except OSError as exc:
        raise RegistryError(f"MLflow artifacts are unreachable: {exc}") from exc
    return VersionInfo(
        **{
            **base.__dict__,
            "storage_location": storage_location,
            "metrics": metrics,
            "params": params,
            "signature": signature,
            "input_example": input_example,
            "flavors": sorted(info.flavors),
        }
    )


def _model_info(storage_location: str):
    """The version's ``MLmodel`` (an ``mlflow.models.Model``), read from its artifact location.
    ``mlflow.models.get_model_info`` is not used: it misses the file behind a ``file://``
    location (MLflow 3.17), and a ``models:/`` URI misreads some names (see _download_uri)."""
    import mlflow.artifacts
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{storage_location.rstrip('/')}/MLmodel", dst_path=tmp
        )
        return Model.load(path)


def _serving_input_example(storage_location: str) -> dict[str, Any] | None:
    """The scoring payload MLflow saved with the model (``serving_input_example.json``)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{storage_location.rstrip('/')}/serving_input_example.json",
                dst_path=tmp,
            )
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text())


def artifact_digest(name: str, version: int) -> str:
    """sha256 hex over the model version's artifact files.

    Each file contributes ``<relative path>\\0<sha256 of its bytes>\\n``, in sorted path order,
    so the digest changes when any file is added, removed, renamed or edited.

    Raises:
        RegistryError: the artifacts cannot be downloaded.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    _configure()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            root = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=_download_uri(_client(), name, version), dst_path=tmp
                )
            )
        except (MlflowException, OSError) as exc:
            raise RegistryError(f"cannot download artifacts of {name} v{version}: {exc}") from exc
        outer = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            inner = hashlib.sha256()
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    inner.update(chunk)
            outer.update(f"{path.relative_to(root).as_posix()}\0{inner.hexdigest()}\n".encode())
        return outer.hexdigest()


def load_pyfunc(name: str, version: int):
    """Load a version as an ``mlflow.pyfunc.PyFuncModel``, pinned by number (never an alias).

    Raises:
        RegistryError: the model cannot be downloaded or loaded.
    """
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    _configure()
    try:
        return mlflow.pyfunc.load_model(_download_uri(_client(), name, version))
    except MlflowException as exc:
        raise RegistryError(f"cannot load {name} v{version}: {exc}") from exc
    except Exception as exc:  # a flavor's loader can raise anything (unpickling, skops, ...)
        raise RegistryError(f"cannot load {name} v{version}: {type(exc).__name__}: {exc}") from exc


#: Where a training run logs its drift reference: a CSV of training rows (feature columns, and
#: optionally the target column ``target``), as ``registry.demo_models`` does.
REFERENCE_SAMPLE_PATH = "reference/reference_sample.csv"


def reference_sample(run_id: str):
    """The run's reference sample (:data:`REFERENCE_SAMPLE_PATH`) as a pandas DataFrame, or None
    when the run logged none.

    Raises:
        RegistryError: the artifact exists but cannot be downloaded or read.
    """
    import mlflow.artifacts
    import pandas as pd
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    _configure()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            listed = _client().list_artifacts(run_id, path=REFERENCE_SAMPLE_PATH.rsplit("/", 1)[0])
            if not any(item.path == REFERENCE_SAMPLE_PATH for item in listed):
                return None
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=REFERENCE_SAMPLE_PATH, dst_path=tmp
            )
            return pd.read_csv(local)
        except (MlflowException, OSError, ValueError) as exc:
            raise RegistryError(f"cannot read the reference sample of run {run_id}: {exc}") from exc


def set_alias(name: str, alias: str, version: int) -> None:
    """Point the alias of a registered model at a version (idempotent).

    Raises:
        RegistryError: MLflow refused or is unreachable.
    """
    from mlflow.exceptions import MlflowException

    try:
        _client().set_registered_model_alias(name, alias, str(int(version)))
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"cannot set alias {alias!r} on {name} v{version}: {exc}") from exc


def delete_alias(name: str, alias: str) -> None:
    """Remove an alias of a registered model; nothing happens when it is not set.

    Raises:
        RegistryError: MLflow refused or is unreachable.
    """
    from mlflow.exceptions import MlflowException

    try:
        if alias in (_client().get_registered_model(name).aliases or {}):
            _client().delete_registered_model_alias(name, alias)
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"cannot remove alias {alias!r} of {name}: {exc}") from exc


# The model-registry events MLflow 3.17 emits (``mlflow.entities.webhook.VALID_ENTITY_ACTIONS``
# minus prompts and budget policies): each one can change what the portal mirrors.
REGISTRY_WEBHOOK_EVENTS: tuple[str, ...] = (
    "registered_model.created",
    "model_version.created",
    "model_version_tag.set",
    "model_version_tag.deleted",
    "model_version_alias.created",
    "model_version_alias.deleted",
)


@dataclass(frozen=True)
class WebhookInfo:
    """A webhook as MLflow stores it (never with its secret)."""

    webhook_id: str
    name: str
    url: str
    events: list[str]
    status: str
    created: bool  # True when ensure_webhook created it, False when it updated an existing one


def ensure_webhook(
    name: str, url: str, secret: str, events: list[str] | tuple[str, ...] = REGISTRY_WEBHOOK_EVENTS
) -> WebhookInfo:
    """Create the webhook ``name`` in MLflow, or bring the existing one to ``url``, ``secret``,
    ``events`` and status ACTIVE (idempotent by name).

    ``events`` are MLflow event strings (``"<entity>.<action>"``, e.g. ``"model_version.created"``).
    Webhooks need MLflow's SQL registry store; the MLflow server only delivers to http URLs and
    to loopback/private addresses when started with ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https``
    and ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true``. A running server caches its webhook list per
    event for ``MLFLOW_WEBHOOK_CACHE_TTL`` seconds (60 by default), so a change to an existing
    webhook may take that long to apply.

    Raises:
        RegistryError: MLflow is unreachable, refused the webhook (bad URL, scheme, event, or a
            file store), or already holds several webhooks with this name.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        same_name = []
        page_token = None
        while True:
            page = client.list_webhooks(max_results=100, page_token=page_token)
            same_name.extend(w for w in page if w.name == name)
            page_token = page.token
            if not page_token:
                break
        if len(same_name) > 1:
            ids = ", ".join(w.webhook_id for w in same_name)
            raise RegistryError(
                f"MLflow has {len(same_name)} webhooks named {name!r} ({ids}); delete all but one"
            )
        if same_name:
            webhook = client.update_webhook(
                same_name[0].webhook_id,
                url=url,
                events=list(events),
                secret=secret,
                status="ACTIVE",
            )
        else:
            webhook = client.create_webhook(
                name=name,
                url=url,
                events=list(events),
                secret=secret,
                status="ACTIVE",
                description="Rollgate: mirror the model registry when it changes",
            )
    except MlflowException as exc:
        raise RegistryError(f"cannot set up webhook {name!r}: {exc}") from exc
    except OSError as exc:
        raise RegistryError(f"MLflow is unreachable: {exc}") from exc
    return WebhookInfo(
        webhook_id=webhook.webhook_id,
        name=webhook.name,
        url=webhook.url,
        events=[str(e) for e in webhook.events],
        status=str(webhook.status),
        created=not same_name,
    )
