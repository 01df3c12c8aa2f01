"""Bad input never ends in a 500 (issue 9, point 2): JSON nested past ``API_JSON_MAX_DEPTH`` on
every JSON route, a NUL character in any query parameter, path value, form field or JSON string
(keys too), and out-of-range numbers and dates in query parameters. API routes answer 400 with a
JSON ``detail``; pages answer 400 inside the site's layout."""

from __future__ import annotations

import json

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone
from rest_framework.test import APIClient

from monitoring.models import Rollup
from registry.models import ModelVersion, RegisteredModel
from rollouts import services
from rollouts.models import Environment

DEEP = 1000


def deep_json(depth: int = DEEP) -> bytes:
    return ("[" * depth + "]" * depth).encode()


def deep_object(depth: int = DEEP) -> bytes:
    return ('{"a":' * depth + "1" + "}" * depth).encode()


@pytest.fixture
def versions(team):
    now = timezone.now()
    registered = RegisteredModel.objects.create(name="churn", team=team, synced_at=now)
    return [
        ModelVersion.objects.create(
            registered_model=registered, version=n, status="READY", synced_at=now
        )
        for n in (1, 2)
    ]


@pytest.fixture
def endpoint(versions):
    return services.endpoint_for(
        model_version=versions[0], environment=Environment.objects.get(name="staging")
    )


@pytest.fixture
def admin_api(platform_admin):
    client = APIClient()
    client.force_authenticate(platform_admin)
    return client


def _is_layout_page(response) -> bool:
    text = response.content.decode()
    return 'class="brand"' in text and "<main>" in text


# --- the bounded loader -----------------------------------------------------------------------


def test_bounded_loader_accepts_ordinary_json_and_refuses_depth_and_nul():
    from portal import inputs

    assert inputs.loads_bounded('{"a": [1, {"b": "c"}]}') == {"a": [1, {"b": "c"}]}
    assert inputs.loads_bounded(deep_json(64)) is not None  # the bound itself is allowed
    for body in (deep_json(65), deep_json(), deep_object(), deep_json(100_000)):
        with pytest.raises(inputs.BadInput, match="nested deeper than 64"):
            inputs.loads_bounded(body)
    for body in ('{"environment": "st\\u0000"}', '{"a\\u0000": 1}', '["x", ["\\u0000"]]'):
        with pytest.raises(inputs.BadInput, match="NUL"):
            inputs.loads_bounded(body)


def test_every_api_view_parses_json_with_the_bounded_parser():
    """The class, not one route: every DRF view under /api/ reads JSON through the bounded
    parser (a view that set its own ``parser_classes`` would escape it)."""
    from rest_framework.parsers import JSONParser
    from rest_framework.views import APIView

    from portal.parsers import BoundedJSONParser

    views = []

    def walk(patterns):
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns)
            elif isinstance(p, URLPattern):
                cls = getattr(p.callback, "cls", None)
                if cls is not None and issubclass(cls, APIView):
                    views.append(cls)

    walk(get_resolver().url_patterns)
    assert len(views) > 20
    for cls in views:
        json_parsers = [p for p in cls().get_parsers() if isinstance(p, JSONParser)]
        assert json_parsers, cls
        assert all(isinstance(p, BoundedJSONParser) for p in json_parsers), cls


@pytest.mark.parametrize("body", [deep_json(), deep_object()], ids=["array", "object"])
@pytest.mark.parametrize(
    "method,url",
    [
        ("post", "/api/feedback"),
        ("post", "/api/requests"),
        ("post", "/api/teams"),
        ("post", "/api/api-keys"),
        ("patch", "/api/environments/staging"),
        ("post", "/api/environments/staging/freeze-windows"),
    ],
)
def test_deep_json_is_a_400_on_json_routes(admin_api, method, url, body):
    response = getattr(admin_api, method)(url, body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert "nested deeper than 64" in response.json()["detail"]


def test_deep_json_is_a_400_on_the_mlflow_webhook(client, settings):
    import time

    from registry.webhooks import delivery_signature

    settings.MLFLOW_WEBHOOK_SECRET = "s3cret"
    ts = str(int(time.time()))
    body = deep_object()
    response = client.post(
        "/registry/webhooks/mlflow",
        body,
        content_type="application/json",
        headers={
            "X-MLflow-Delivery-Id": "d1",
            "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": delivery_signature("s3cret", "d1", ts, body),
        },
    )
    assert response.status_code == 400
    assert "nested deeper than 64" in response.json()["detail"]


# --- NUL characters ---------------------------------------------------------------------------


NUL_API_URLS = [
    "/api/models?q=%00",
    "/api/models?team=%00",
    "/api/models/a%00b",
    "/api/models/a%00b/versions/1",
    "/api/models/a%00b/compare",
    "/api/audit?action=%00",
    "/api/audit?model=%00",
    "/api/audit?actor=%00&environment=%00",
    "/api/audit.csv?action=%00",
    "/api/requests?status=%00",
    "/api/environments/staging?x%00=1",
    "/api/teams/diagnostics/members/a%00b",
]
NUL_PAGE_URLS = [
    "/registry/?q=%00",
    "/registry/?team=%00",
    "/registry/a%00b/",
    "/registry/a%00b/compare",
    "/rollouts/requests/?model=%00",
    "/rollouts/requests/new/a%00b/1/",
    "/monitoring/alerts/?endpoint=%00",
    "/audit/?action=%00",
    "/?q=%00",
]


@pytest.mark.parametrize("url", NUL_API_URLS)
def test_nul_in_query_or_path_is_a_400_on_the_api(admin_api, url):
    response = admin_api.get(url)
    assert response.status_code == 400, (url, response.content)
    assert "NUL" in response.json()["detail"]


@pytest.mark.parametrize("url", NUL_PAGE_URLS)
def test_nul_in_query_or_path_is_a_400_page_with_the_layout(client, platform_admin, url):
    client.force_login(platform_admin)
    response = client.get(url)
    assert response.status_code == 400, url
    assert _is_layout_page(response)
    assert b"NUL" in response.content


def test_nul_anywhere_in_the_url_is_never_a_500_on_any_route(client, platform_admin):
    """Every route of the URLconf, with a NUL in a query parameter: 400 (the class)."""
    client.force_login(platform_admin)
    checked = 0

    def walk(patterns, prefix=""):
        nonlocal checked
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns, prefix + str(p.pattern))
                continue
            route = prefix + str(p.pattern)
            if route.startswith("admin/") or "^" in route:
                continue
            path = "/" + route
            for conv in ("<int:", "<slug:", "<str:", "<path:"):
                while conv in path:
                    start = path.index(conv)
                    end = path.index(">", start)
                    path = path[:start] + ("1" if conv == "<int:" else "x") + path[end + 1 :]
            response = client.get(path + "?q=%00")
            assert response.status_code == 400, (path, response.status_code)
            checked += 1

    walk(get_resolver().url_patterns)
    assert checked > 40


def test_nul_in_a_json_string_or_key_is_a_400(admin_api, synced):
    for body in (
        {
            "model": "breast-cancer-classifier",
            "version": 1,
            "environment": "st\u0000",
            "justification": "x",
        },
        {
            "model": "breast-cancer-classifier",
            "version": 1,
            "environment": "staging",
            "justification": "x",
            "k\u0000": 1,
        },
    ):
        response = admin_api.post("/api/requests", body, format="json")
        assert response.status_code == 400, response.content
        assert "NUL" in response.json()["detail"]


def test_nul_in_a_form_post_is_a_400(client, admin_api, platform_admin):
    response = admin_api.post("/api/teams", {"name": "a\u0000", "slug": "a"}, format="multipart")
    assert response.status_code == 400
    response = admin_api.post(
        "/api/teams", "name=a%00&slug=a", content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 400
    client.force_login(platform_admin)
    response = client.post("/registry/sync", {"next": "/\u0000"})
    assert response.status_code == 400
    assert _is_layout_page(response)


# --- numbers and dates in query parameters ------------------------------------------------------


BAD_DAYS = ["1000000000", "99999999999999999999", "-5", "0", "1e9", "ten", "nan", "1.5"]


@pytest.mark.parametrize("days", BAD_DAYS)
def test_metrics_api_days_out_of_range_is_a_400_with_the_range(admin_api, endpoint, days):
    response = admin_api.get(f"/api/endpoints/{endpoint.name}/metrics", {"days": days})
    assert response.status_code == 400, (days, response.content)
    assert "731" in json.dumps(response.json())


@pytest.mark.parametrize("days", BAD_DAYS)
def test_dashboard_days_out_of_range_is_a_400_inside_the_page(
    client, endpoint, platform_admin, days
):
    client.force_login(platform_admin)
    response = client.get(f"/monitoring/endpoints/{endpoint.name}/", {"days": days})
    assert response.status_code == 400, days
    assert _is_layout_page(response)
    assert b"731" in response.content


def test_metrics_range_still_defaults_and_accepts_the_bounds(admin_api, endpoint):
    assert Rollup.objects.count() == 0
    url = f"/api/endpoints/{endpoint.name}/metrics"
    for params in ({}, {"days": 1}, {"days": 731}, {"window": "hour", "days": 31}):
        assert admin_api.get(url, params).status_code == 200, params
    response = admin_api.get(url, {"window": "hour", "days": 32})
    assert response.status_code == 400
    assert "choose window=day" in response.json()["detail"]


@pytest.mark.parametrize(
    "params",
    [
        {"since": "9999-12-31"},
        {"until": "9999-12-31"},
        {"since": "0001-01-01"},
        {"since": "2025-02-30"},
        {"until": "yesterday"},
        {"offset": "100000000000000000000"},
        {"offset": "-1"},
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "x"},
    ],
)
def test_audit_dates_and_paging_out_of_range_are_400(admin_api, client, platform_admin, params):
    response = admin_api.get("/api/audit", params)
    assert response.status_code == 400, (params, response.content)
    if set(params) <= {"since", "until"}:
        assert admin_api.get("/api/audit.csv", params).status_code == 400
        client.force_login(platform_admin)
        page = client.get("/audit/", params)
        assert page.status_code == 400
        assert _is_layout_page(page)


@pytest.mark.parametrize("params", [{"a": "99999999999999999999"}, {"b": "-1"}, {"a": "x"}])
def test_compare_version_numbers_out_of_range_are_400(
    admin_api, client, platform_admin, versions, params
):
    response = admin_api.get("/api/models/churn/compare", params)
    assert response.status_code == 400, response.content
    client.force_login(platform_admin)
    page = client.get("/registry/churn/compare", params)
    assert page.status_code == 400
    assert _is_layout_page(page)


# --- the schema documents errors and limits ---------------------------------------------------


def test_schema_documents_error_statuses_bodies_and_limits(admin_api):
    schema = admin_api.get("/api/schema", HTTP_ACCEPT="application/json").json()
    writes = ("post", "put", "patch", "delete")
    operations = 0
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if method not in ("get", *writes):
                continue
            operations += 1
            codes = set(op["responses"])
            assert {"400", "401", "403"} <= codes, (method, path)
            if "{" in path:
                assert "404" in codes, (method, path)
            if method in writes:
                assert "409" in codes, (method, path)
            ref = op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorOut"), (method, path)
    assert operations >= 30
    components = schema["components"]["schemas"]
    assert components["RejectInput"]["required"] == ["comment"]
    assert "enum" in components["StrategyEnum"]
    days = next(
        p
        for p in schema["paths"]["/api/endpoints/{name}/metrics"]["get"]["parameters"]
        if p["name"] == "days"
    )
    assert (days["schema"]["minimum"], days["schema"]["maximum"]) == (1, 731)
    limit = next(
        p for p in schema["paths"]["/api/audit"]["get"]["parameters"] if p["name"] == "limit"
    )
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 1000)
