"""Pure unit tests of the scoring-request parser (``rollouts.serving.schema``), on a hand-written
signature that has every scalar type the parser converts and one optional column."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from rollouts.serving.schema import (
    InputError,
    UnsupportedMediaType,
    parse_content_type,
    parse_request,
    predictions_to_jsonable,
)

SIGNATURE = {
    "inputs": [
        {"name": "age", "type": "long", "required": True},
        {"name": "rooms", "type": "integer", "required": True},
        {"name": "active", "type": "boolean", "required": True},
        {"name": "city", "type": "string", "required": True},
        {"name": "score", "type": "double", "required": True},
        {"name": "note", "type": "string", "required": False},
    ],
    "outputs": None,
    "params": [{"name": "threshold", "type": "double", "default": 0.5, "shape": None}],
}
COLUMNS = ["age", "rooms", "active", "city", "score"]  # the required ones, in signature order
ROWS = [
    {"age": 41, "rooms": 3, "active": True, "city": "Oslo", "score": 0.25},
    {"age": 7, "rooms": 1, "active": False, "city": "Lima", "score": -1.5},
]
CSV = "age,rooms,active,city,score\n41,3,true,Oslo,0.25\n7,1,false,Lima,-1.5\n"
JSON = "application/json"
# A value no error message may repeat back to the client.
TOKEN = "Zq7731secret"


def parse_json(payload: object, signature: dict | None = SIGNATURE):
    return parse_request(json.dumps(payload).encode(), JSON, signature)


def parse_csv(text: str, signature: dict | None = SIGNATURE):
    return parse_request(text.encode(), "text/csv", signature)


def with_row0(**changes: object) -> list[dict]:
    return [{**ROWS[0], **changes}, ROWS[1]]


def expected_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": np.array([41, 7], dtype=np.int64),
            "rooms": np.array([3, 1], dtype=np.int32),
            "active": np.array([True, False], dtype=np.bool_),
            "city": ["Oslo", "Lima"],
            "score": np.array([0.25, -1.5], dtype=np.float64),
        }
    )


# --- every body format gives the same typed frame --------------------------------------------


JSON_BODIES = {
    "dataframe_split": {
        "dataframe_split": {
            "index": [10, 11],
            "columns": COLUMNS,
            "data": [[r[c] for c in COLUMNS] for r in ROWS],
        }
    },
    "dataframe_records": {"dataframe_records": ROWS},
    "dataframe_records_shuffled_keys": {
        "dataframe_records": [dict(reversed(list(r.items()))) for r in ROWS]
    },
    "instances_records": {"instances": ROWS},
    "inputs_records": {"inputs": ROWS},
    "inputs_columns": {"inputs": {c: [r[c] for r in ROWS] for c in COLUMNS}},
}


@pytest.mark.parametrize("payload", JSON_BODIES.values(), ids=JSON_BODIES.keys())
def test_json_formats_give_the_same_typed_frame(payload):
    parsed = parse_json(payload)

    pd.testing.assert_frame_equal(parsed.frame, expected_frame())
    assert parsed.records == ROWS
    assert parsed.params is None


def test_positional_rows_need_every_signature_column():
    """``instances`` as lists is positional over the whole signature, optional column too."""
    full = [[41, 3, True, "Oslo", 0.25, "n"], [7, 1, False, "Lima", -1.5, "m"]]
    parsed = parse_json({"instances": full})
    assert list(parsed.frame.columns) == [*COLUMNS, "note"]
    assert parsed.frame["age"].dtype == np.int64 and parsed.frame["rooms"].dtype == np.int32
    assert parsed.records[1] == {**ROWS[1], "note": "m"}

    with pytest.raises(InputError) as err:
        parse_json({"instances": [row[:5] for row in full]})
    assert "instances[0] has 5 values but there are 6 columns" in err.value.message


def test_positional_rows_without_a_signature_are_refused():
    with pytest.raises(InputError) as err:
        parse_json({"inputs": [[1, 2]]}, signature=None)
    assert err.value.status == 400
    assert "signature with column names" in err.value.message


def test_no_signature_passes_records_through():
    parsed = parse_json({"dataframe_records": [{"a": 1, "b": "x"}]}, signature=None)
    assert parsed.records == [{"a": 1, "b": "x"}]
    assert list(parsed.frame.columns) == ["a", "b"]


@pytest.mark.parametrize(
    "text",
    [CSV, ",age,rooms,active,city,score\n0,41,3,true,Oslo,0.25\n1,7,1,false,Lima,-1.5\n"],
    ids=["plain", "leading_index"],
)
def test_csv_is_typed_like_json(text):
    parsed = parse_csv(text)
    pd.testing.assert_frame_equal(parsed.frame, expected_frame())
    assert parsed.records == ROWS
    assert parsed.records == parse_json({"dataframe_records": ROWS}).records


@pytest.mark.parametrize(
    ("cell", "value"),
    [("true", True), ("false", False), ("TRUE", True), ("False", False), (" true ", True)],
)
def test_csv_true_and_false_are_booleans(cell, value):
    parsed = parse_csv(f"age,rooms,active,city,score\n41,3,{cell},Oslo,0.25\n")
    assert parsed.frame["active"].dtype == np.bool_
    assert parsed.records[0]["active"] is value


# --- type rules ----------------------------------------------------------------------------


def test_integral_float_is_accepted_in_a_long_column():
    parsed = parse_json({"dataframe_records": with_row0(age=41.0, rooms=3.0)})
    assert parsed.frame["age"].dtype == np.int64
    assert parsed.frame["rooms"].dtype == np.int32
    assert parsed.records[0]["age"] == 41 and isinstance(parsed.records[0]["age"], int)


@pytest.mark.parametrize("cell", ["41.0", "4.1e1"])
def test_csv_integral_float_is_accepted_in_a_long_column_as_in_json(cell):
    """JSON 41.0 is a valid long; the same number written in a CSV cell must be too."""
    parsed = parse_csv(f"age,rooms,active,city,score\n{cell},3,true,Oslo,0.25\n")
    assert parsed.records[0]["age"] == 41
    assert parsed.frame["age"].dtype == np.int64


def test_fractional_number_in_a_long_column_is_rejected_the_same_in_json_and_csv():
    with pytest.raises(InputError) as from_json:
        parse_json({"dataframe_records": with_row0(age=41.5)})
    with pytest.raises(InputError) as from_csv:
        parse_csv("age,rooms,active,city,score\n41.5,3,true,Oslo,0.25\n")
    assert from_json.value.message == "column 'age' (row 0): expected an integer, got a number."
    assert from_csv.value.message == from_json.value.message


@pytest.mark.parametrize(
    ("parse", "column"),
    [
        (lambda: parse_json({"dataframe_records": with_row0(age=None)}), "age"),
        (lambda: parse_json({"dataframe_records": with_row0(rooms=None)}), "rooms"),
        (lambda: parse_json({"dataframe_records": with_row0(active=None)}), "active"),
        (lambda: parse_csv("age,rooms,active,city,score\n,3,true,Oslo,0.25\n"), "age"),
    ],
    ids=["json_long", "json_integer", "json_boolean", "csv_empty_long_cell"],
)
def test_null_in_a_non_float_column_is_rejected(parse, column):
    with pytest.raises(InputError) as err:
        parse()
    assert err.value.status == 400
    assert f"column {column!r} (row 0)" in err.value.message
    assert "null is not allowed" in err.value.message


def test_null_in_a_double_column_is_nan_and_logged_as_null():
    parsed = parse_json({"dataframe_records": with_row0(score=None)})
    assert math.isnan(parsed.frame["score"][0])
    assert parsed.records[0]["score"] is None


@pytest.mark.parametrize(
    "parse",
    [
        lambda: parse_json({"dataframe_records": with_row0(active="yes")}),
        lambda: parse_csv("age,rooms,active,city,score\n41,3,yes,Oslo,0.25\n"),
        lambda: parse_json({"dataframe_records": with_row0(active=1)}),
    ],
    ids=["json_yes", "csv_yes", "json_one"],
)
def test_non_boolean_in_a_boolean_column_is_rejected(parse):
    with pytest.raises(InputError) as err:
        parse()
    assert err.value.status == 400
    assert "column 'active' (row 0): expected true or false" in err.value.message


@pytest.mark.parametrize(
    ("changes", "column", "expected"),
    [
        ({"score": "high"}, "score", "expected a number, got a string"),
        ({"score": True}, "score", "expected a number, got a boolean"),
        ({"age": False}, "age", "expected an integer, got a boolean"),
        ({"age": [41]}, "age", "expected an integer, got a list"),
        ({"city": 12}, "city", "expected a string, got a number"),
        ({"rooms": 2**31}, "rooms", "integer out of range for a integer column"),
        ({"age": 2**63}, "age", "integer out of range for a long column"),
    ],
)
def test_wrong_types_are_rejected_naming_the_column(changes, column, expected):
    with pytest.raises(InputError) as err:
        parse_json({"dataframe_records": with_row0(**changes)})
    assert err.value.status == 400
    assert err.value.message == f"column {column!r} (row 0): {expected}."


def test_integer_range_edges_are_accepted():
    parsed = parse_json({"dataframe_records": with_row0(age=-(2**63), rooms=2**31 - 1)})
    assert parsed.frame["age"][0] == -(2**63)
    assert parsed.frame["rooms"][0] == 2**31 - 1


# --- columns -------------------------------------------------------------------------------


def test_optional_column_may_be_missing():
    parsed = parse_json({"dataframe_records": ROWS})
    assert "note" not in parsed.frame.columns


def test_optional_column_is_kept_when_sent():
    rows = [{**r, "note": "n"} for r in ROWS]
    parsed = parse_json({"dataframe_records": rows})
    assert list(parsed.frame["note"]) == ["n", "n"]
    assert parsed.records == rows


def test_missing_required_column_is_rejected():
    rows = [{k: v for k, v in r.items() if k != "city"} for r in ROWS]
    with pytest.raises(InputError) as err:
        parse_json({"dataframe_records": rows})
    assert err.value.message == "Missing required column(s) 'city' (row 0)."


def test_unknown_column_is_rejected():
    with pytest.raises(InputError) as err:
        parse_json({"dataframe_records": with_row0(colour="red")})
    assert err.value.message == "Unknown column(s) 'colour' (row 0)."


def test_duplicate_columns_are_rejected():
    with pytest.raises(InputError) as err:
        parse_csv("age,age,rooms,active,city,score\n1,1,3,true,Oslo,0.25\n")
    assert "Duplicate column(s): age" in err.value.message


# --- body shape ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"", JSON, "The body is empty"),
        (b"  \n", "text/csv", "The CSV body is empty"),
        (b'{"dataframe_records": [', JSON, "The body is not valid JSON"),
        (b"[1, 2]", JSON, "got a JSON list"),
        (b'{"columns": ["age"], "data": [[1]]}', JSON, "bare {columns, data} body"),
        (
            b'{"params": {}}',
            JSON,
            "exactly one of dataframe_split, dataframe_records, instances, inputs; got none",
        ),
        (b'{"instances": [], "inputs": []}', JSON, "; got instances, inputs"),
        (b'{"inputs": [], "extra": 1}', JSON, "Unknown field(s) in the body: extra"),
        (b'{"dataframe_split": {"columns": ["age"], "data": []}}', JSON, "The input has no rows"),
        (
            b'{"dataframe_split": {"columns": ["age"], "rows": []}}',
            JSON,
            "dataframe_split has unknown field(s): rows",
        ),
        (b'{"dataframe_split": [[1]]}', JSON, "dataframe_split must be an object"),
        (b'{"dataframe_records": {"age": 1}}', JSON, "dataframe_records must be a list of objects"),
        (b'{"dataframe_records": [[1]]}', JSON, "dataframe_records[0] must be an object"),
        (b'{"instances": {"age": [1]}}', JSON, "instances must be a list of rows"),
        (b'{"inputs": {"age": [1, 2], "rooms": [1]}}', JSON, "list of equal length"),
        (b'{"inputs": [{"age": 1}, [1]]}', JSON, "only row objects or only lists"),
        (b"age,rooms\n", "text/csv", "The input has no rows"),
        (b'age,rooms\n"1,2\n', "text/csv", "The body is not valid CSV"),
        (b"\xff\xfe{}", JSON, "not valid UTF-8 (byte 0)"),
    ],
)
def test_malformed_bodies_are_rejected(body, content_type, expected):
    with pytest.raises(InputError) as err:
        parse_request(body, content_type, SIGNATURE)
    assert err.value.status == 400
    assert not isinstance(err.value, UnsupportedMediaType)
    assert expected in err.value.message


def test_row_length_mismatch_names_the_row():
    payload = {"dataframe_split": {"columns": COLUMNS, "data": [[41, 3, True, "Oslo", 0.25], [7]]}}
    with pytest.raises(InputError) as err:
        parse_json(payload)
    assert err.value.message == "dataframe_split.data[1] has 1 values but there are 5 columns."


# --- content type --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "media_type"),
    [
        ("application/json", "application/json"),
        ("Application/JSON; charset=UTF-8", "application/json"),
        ('text/csv; charset="utf8"', "text/csv"),
        ("text/csv;", "text/csv"),
    ],
)
def test_accepted_content_types(header, media_type):
    assert parse_content_type(header) == media_type


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("text/plain", "Content-Type 'text/plain' is not supported"),
        ("", "Content-Type 'none' is not supported"),
        ("application/json; charset=latin-1", "charset 'latin-1' is not supported; send UTF-8"),
        ("text/csv; header=present", "Content-Type parameter 'header' is not supported"),
    ],
)
def test_unsupported_content_types_are_415(header, expected):
    with pytest.raises(UnsupportedMediaType) as err:
        parse_request(json.dumps({"dataframe_records": ROWS}).encode(), header, SIGNATURE)
    assert err.value.status == 415
    assert expected in err.value.message


# --- params --------------------------------------------------------------------------------


def test_declared_params_are_passed_on():
    parsed = parse_json({"dataframe_records": ROWS, "params": {"threshold": 0.3}})
    assert parsed.params == {"threshold": 0.3}


def test_empty_params_are_none():
    assert parse_json({"dataframe_records": ROWS, "params": {}}).params is None


def test_unknown_params_are_rejected_naming_them():
    with pytest.raises(InputError) as err:
        parse_json({"dataframe_records": ROWS, "params": {"temperature": 2}})
    assert err.value.message == "Unknown param(s) temperature; this model accepts: threshold."


def test_params_must_be_an_object():
    with pytest.raises(InputError) as err:
        parse_json({"dataframe_records": ROWS, "params": [1]})
    assert "params must be an object" in err.value.message


# --- no echo of client data -------------------------------------------------------------------


ECHO_CASES = {
    "string_in_long": lambda: parse_json({"dataframe_records": with_row0(age=TOKEN)}),
    "string_in_double": lambda: parse_json({"dataframe_records": with_row0(score=TOKEN)}),
    "string_in_boolean": lambda: parse_json({"dataframe_records": with_row0(active=TOKEN)}),
    "list_in_integer": lambda: parse_json({"dataframe_records": with_row0(rooms=[TOKEN])}),
    "number_in_string": lambda: parse_json({"dataframe_records": with_row0(city=77310042)}),
    "long_out_of_range": lambda: parse_json(
        {"dataframe_records": with_row0(age=77310042 * 10**12)}
    ),
    "csv_string_in_long": lambda: parse_csv(f"age,rooms,active,city,score\n{TOKEN},3,true,x,1\n"),
    "csv_string_in_double": lambda: parse_csv(f"age,rooms,active,city,score\n1,3,true,x,{TOKEN}\n"),
    "csv_string_in_boolean": lambda: parse_csv(f"age,rooms,active,city,score\n1,3,{TOKEN},x,1\n"),
    "csv_short_row": lambda: parse_csv(f"age,rooms,active,city,score\n1,{TOKEN}\n"),
    "short_row": lambda: parse_json({"dataframe_split": {"columns": COLUMNS, "data": [[TOKEN]]}}),
    "bad_json": lambda: parse_request(f'{{"inputs": [{TOKEN}]}}'.encode(), JSON, SIGNATURE),
    "non_utf8": lambda: parse_request(TOKEN.encode() + b"\xff", JSON, SIGNATURE),
}


@pytest.mark.parametrize("parse", ECHO_CASES.values(), ids=ECHO_CASES.keys())
def test_error_messages_never_echo_submitted_values(parse):
    with pytest.raises(InputError) as err:
        parse()
    assert TOKEN not in err.value.message
    assert "7731" not in err.value.message
    assert "77310042" not in err.value.message


# --- what goes to the prediction log -----------------------------------------------------------


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_logged_records_are_strict_json_for_non_finite_floats(value):
    """The records go to a JSONField: ``Infinity``/``NaN`` are not JSON and a database that
    checks JSON (SQLite's JSON_VALID, PostgreSQL's jsonb) would refuse the row. The model
    still sees the value itself."""
    parsed = parse_json({"dataframe_records": with_row0(score=value)})
    json.dumps(parsed.records, allow_nan=False)
    assert parsed.records[0]["score"] is None
    seen = parsed.frame["score"][0]
    assert (math.isnan(seen) and math.isnan(value)) or seen == value


def test_csv_inf_cell_is_logged_as_null():
    parsed = parse_csv("age,rooms,active,city,score\n41,3,true,Oslo,inf\n")
    json.dumps(parsed.records, allow_nan=False)
    assert parsed.frame["score"][0] == math.inf


# --- predictions_to_jsonable -------------------------------------------------------------------


def test_predictions_to_jsonable_shapes():
    assert predictions_to_jsonable(np.array([1, 0], dtype=np.int64)) == [1, 0]
    assert predictions_to_jsonable(np.array([0.5, np.nan, np.inf], dtype=np.float32)) == [
        0.5,
        None,
        None,
    ]
    assert predictions_to_jsonable(pd.Series([True, False])) == [True, False]
    assert predictions_to_jsonable(pd.DataFrame({"p": [0.25, None]})) == [{"p": 0.25}, {"p": None}]
    assert predictions_to_jsonable(np.float64(2.5)) == [2.5]
    assert predictions_to_jsonable(np.array([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
