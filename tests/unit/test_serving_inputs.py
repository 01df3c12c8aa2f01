"""Every input to the serving route ends in an answer below 500 (issue 9, points 2 and 3):
deeply nested JSON, numbers too large for their column, and whatever a property-based
generator makes of bodies, content types and shapes; a model's or the server's own failure is
answered with a fixed message and an error id, its details logged under that id.

The route is driven through both transports: the Django view (test client) and the ASGI fast
path that production serves (:class:`rollouts.serving.asgi.ServingApp`)."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from rollouts.serving import invocation as inv
from rollouts.serving import views
from rollouts.serving.schema import InputError, json_depth, parse_request
from tests.unit import test_serving_api as view_tests
from tests.unit import test_serving_asgi as asgi_tests
from tests.unit.test_serving_api import JSON, _records, _split

# The serving tests' module fixtures: one deployment of v1 with a key, the held-out rows.
_fresh_routes = view_tests._fresh_routes
_module_deployment = view_tests._module_deployment
live = view_tests.live
rows = view_tests.rows
call = asgi_tests.call

SECRET = "secret-value-4431"


@pytest.fixture(params=["django", "asgi"])
def post(request, client, live):
    """``post(body, content_type=JSON)`` through one transport; the response has
    ``status_code``, ``json()`` and header lookup by ``[]``."""
    if request.param == "django":

        def via_django(body, content_type=JSON):
            # generic(): post() re-encodes a body for a charset named in the content type.
            return client.generic(
                "POST",
                live.url,
                body.encode() if isinstance(body, str) else body,
                content_type,
                headers={"Authorization": f"Bearer {live.key}"},
            )

        return via_django
    asgi_call = request.getfixturevalue("call")
    return lambda body, content_type=JSON: asgi_tests._post(asgi_call, live, body, content_type)


def _nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def _bad(response, *fragments: str) -> str:
    assert response.status_code == 400, response.content
    message = response.json()["message"]
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- point 2: nesting ---------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("where", ["body", "cell", "params"])
def test_json_nested_a_thousand_levels_is_400_not_a_recursion_error(post, rows, where):
    records = json.dumps(_records(rows.head(1)))
    body = {
        "body": _nested(1000),
        "cell": '{"dataframe_records": [{"mean area": ' + _nested(1000) + "}]}",
        "params": '{"dataframe_records": ' + records + ', "params": {"t": ' + _nested(1000) + "}}",
    }[where]
    _bad(post(body), "levels deep", "at most 64")


@pytest.mark.django_db
def test_the_depth_limit_is_a_setting(post, rows, settings):
    body = json.dumps({"dataframe_split": json.loads(_split(rows))["dataframe_split"]})
    settings.SERVING_JSON_MAX_DEPTH = 3
    _bad(post(body), "4 levels deep", "at most 3")  # object, object, rows, row
    settings.SERVING_JSON_MAX_DEPTH = 4
    assert post(body).status_code == 200


def test_depth_counts_brackets_outside_strings_only():
    assert json_depth('{"a": [1, {"b": "[[[[{{{{"}], "c": "\\"]]]"}') == 3
    assert json_depth("17") == 0
    assert json_depth(_nested(5000)) == 5000


# --- point 2: numbers too large for their column ------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "literal",
    ["1" * 310, "-" + "9" * 400, "1" * 5000, "1e400", "-2.5e309", "1" * 400 + ".5"],
    ids=["310-digits", "negative-400", "5000-digits", "1e400", "neg-exp", "long-fraction"],
)
def test_a_number_too_large_for_a_double_column_is_400_naming_the_column(post, rows, literal):
    records = _records(rows.head(2))
    body = json.dumps({"dataframe_records": records}).replace(
        json.dumps(records[1]["mean area"]), literal, 1
    )
    assert literal in body
    _bad(post(body), "'mean area'", "too large for a double column")


@pytest.mark.django_db
def test_a_number_too_large_in_a_csv_cell_is_400_naming_the_column(post, rows):
    frame = rows.head(2).astype(object)
    frame.iloc[1, frame.columns.get_loc("mean radius")] = "7" * 320
    _bad(post(frame.to_csv(index=False), "text/csv"), "'mean radius'", "too large")


@pytest.mark.django_db
def test_written_infinities_keep_their_policy(post, rows):
    """``Infinity`` is a value of a double column (the model decides); only a finite literal
    that overflows is refused."""
    records = _records(rows.head(1))
    body = json.dumps({"dataframe_records": records}).replace(
        json.dumps(records[0]["mean area"]), "Infinity", 1
    )
    response = post(body)
    assert response.status_code == 422  # logistic regression refuses infinity
    frame = rows.head(1).astype(object)
    frame.iloc[0, frame.columns.get_loc("mean area")] = "inf"
    assert post(frame.to_csv(index=False), "text/csv").status_code == 422


SIGNATURE = {
    "inputs": [
        {"name": "n", "type": "long"},
        {"name": "k", "type": "integer"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "s", "type": "string"},
        {"name": "b", "type": "boolean"},
        {"name": "t", "type": "datetime", "required": False},
    ],
    "params": [{"name": "p", "type": "long", "default": 1, "shape": None}],
}
ROW = {"n": 1, "k": 2, "f": 1.5, "d": 2.5, "s": "x", "b": True}


def _parse(row: dict, *, text: str | None = None, signature=SIGNATURE):
    body = text if text is not None else json.dumps({"dataframe_records": [row]})
    return parse_request(body.encode(), JSON, signature)


@pytest.mark.parametrize(
    "column,literal,fragment",
    [
        ("n", "9" * 5000, "too large for a long column"),
        ("n", "9" * 40, "out of range for a long column"),
        ("k", "-" + "9" * 5000, "too large for a integer column"),
        ("k", "1e400", "too large for a integer column"),
        ("f", "1e39", "too large for a float column"),
        ("f", "1" * 310, "too large for a float column"),
        ("d", "1" * 5000, "too large for a double column"),
        ("s", "1" * 5000, "too large for a string column"),
        ("b", "1e999", "too large for a boolean column"),
        ("t", "1" * 5000, "too large for a datetime column"),
    ],
)
def test_every_column_type_refuses_a_number_too_large_naming_the_column(column, literal, fragment):
    text = json.dumps({"dataframe_records": [{**ROW, column: "@"}]}).replace('"@"', literal)
    with pytest.raises(InputError) as err:
        _parse(ROW, text=text)
    assert f"column {column!r}" in err.value.message and fragment in err.value.message


@pytest.mark.parametrize("literal", ["9" * 5000, "1e400"])
def test_a_number_too_large_without_a_column_to_check_it_is_refused(literal):
    """In the params, or in the rows of a model with no column signature."""
    text = json.dumps({"dataframe_records": [ROW], "params": {"p": "@"}}).replace('"@"', literal)
    with pytest.raises(InputError, match="param that is a number too large"):
        _parse(ROW, text=text)
    text = json.dumps({"dataframe_records": [{"a": "@"}]}).replace('"@"', literal)
    with pytest.raises(InputError, match="value that is a number too large"):
        _parse(ROW, text=text, signature=None)


def test_in_range_numbers_and_infinities_still_parse():
    text = json.dumps({"dataframe_records": [ROW]}).replace('"d": 2.5', '"d": -Infinity')
    parsed = _parse(ROW, text=text)
    assert parsed.columns["d"][0] == float("-inf")
    big = {**ROW, "n": 2**63 - 1, "k": -(2**31), "f": 3.0e38, "d": 1.7e308}
    parsed = _parse(big)
    assert parsed.records[0]["n"] == 2**63 - 1 and parsed.records[0]["d"] == 1.7e308


# --- point 3: errors do not leak ----------------------------------------------------------------


class _Leaky:
    def predict(self, frame, params=None):
        raise ValueError(f"could not convert string to float: '{SECRET}'")


@pytest.mark.django_db
def test_a_model_error_is_422_with_an_error_id_and_no_exception_text(
    post, rows, monkeypatch, caplog
):
    monkeypatch.setattr(views.model_cache, "get", lambda name, version: _Leaky())
    monkeypatch.setattr(views.model_cache, "peek", lambda name, version: _Leaky())
    caplog.set_level(logging.INFO, logger="rollouts.serving.invocation")
    response = post(_split(rows))
    assert response.status_code == 422, response.content
    body = response.json()
    assert body["error_code"] == "MODEL_ERROR"
    assert SECRET not in response.content.decode() and "ValueError" not in body["message"]
    error_id = response["X-Request-Id"]
    assert error_id in body["message"]
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and SECRET in str(logged[0].exc_info[1])


@pytest.mark.django_db
def test_an_unexpected_failure_is_a_json_500_with_an_error_id(post, rows, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError(f"internals {SECRET}")

    monkeypatch.setattr(inv, "scored", broken)
    response = post(_split(rows))
    assert response.status_code == 500
    body = response.json()
    assert body["error_code"] == "INTERNAL_ERROR"
    assert SECRET not in response.content.decode()
    error_id = response["X-Request-Id"]
    assert error_id in body["message"]
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and SECRET in str(logged[0].exc_info[1])


# --- property-based: any body, any shape, any content type -> below 500 ------------------------


def _column_names() -> list[str]:
    from registry.demo_models import breast_cancer_split

    return list(breast_cancer_split().X_test.columns)


NAMES = _column_names()
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),  # any unicode, NUL and lone surrogates' neighbours included
    st.sampled_from(["1e400", "NaN", "", "\x00", "12", "true"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
rows_as_records = st.lists(
    st.dictionaries(st.sampled_from(NAMES), values, max_size=len(NAMES)), max_size=3
)
full_rows = st.lists(
    st.fixed_dictionaries({name: st.floats(allow_nan=True) | values for name in NAMES}),
    min_size=1,
    max_size=2,
)
payloads = st.one_of(
    values,
    st.fixed_dictionaries({"dataframe_records": rows_as_records | full_rows | values}),
    st.fixed_dictionaries(
        {
            "dataframe_split": st.fixed_dictionaries(
                {
                    "columns": st.just(NAMES) | st.lists(st.sampled_from(NAMES)) | values,
                    "data": st.lists(st.lists(values, max_size=31), max_size=3) | values,
                }
            )
        }
    ),
    st.fixed_dictionaries({"instances": rows_as_records | full_rows | values}),
    st.fixed_dictionaries({"inputs": rows_as_records | full_rows | values}),
    st.fixed_dictionaries(
        {"dataframe_records": full_rows, "params": st.dictionaries(st.text(max_size=5), values)}
    ),
    st.dictionaries(st.text(max_size=10), values, max_size=3),
)


def _to_json(payload) -> bytes:
    return json.dumps(payload, allow_nan=True).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    payloads.map(_to_json),
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.lists(
        st.lists(st.text(max_size=6) | st.sampled_from(["1" * 320, "inf", ""]), max_size=32),
        max_size=4,
    ).map(
        lambda table: "\n".join(",".join(cells) for cells in [NAMES, *table]).encode(
            "utf-8", "surrogatepass"
        )
    ),
    st.integers(min_value=1, max_value=300).map(lambda depth: _nested(depth).encode()),
)
content_types = st.sampled_from(
    [
        JSON,
        "text/csv",
        "application/json; charset=utf-8",
        "text/csv; charset=latin-1",
        "application/json; boundary=x",
        "text/plain",
        "",
        "APPLICATION/JSON",
        "multipart/form-data",
    ]
)


@pytest.mark.django_db
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
@hsettings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies, content_type=content_types)
def test_no_serving_input_ends_in_a_server_error(post, body, content_type):
    response = post(body, content_type)
    assert response.status_code < 500, (body[:300], response.content[:500])
    assert (
        response.json()["error_code" if response.status_code != 200 else "predictions"] is not None
    )
