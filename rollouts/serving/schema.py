"""Parse and validate scoring requests against a model version's MLflow signature.

Accepts the bodies of MLflow's scoring server (``mlflow/pyfunc/scoring_server``, MLflow >= 2.0):
JSON with exactly one of ``dataframe_split``, ``dataframe_records``, ``instances``, ``inputs``
and an optional ``params`` object, or ``text/csv`` with a header row. Values are typed from the
signature by one set of rules for JSON and CSV, so a column behaves the same in both.

Errors raise :class:`InputError` (or a subclass) whose ``status`` is the HTTP status and whose
message names the field at fault without echoing the client's data.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

FORMAT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
PARAMS_KEY = "params"
JSON_MAX_DEPTH = 64  # the default of settings.SERVING_JSON_MAX_DEPTH

# The objects that JSON's ``Infinity`` / ``-Infinity`` literals (and CSV's ``inf`` cells) parse
# to. An infinity that is not one of these came from a finite literal too large for a double
# (``1e400``, an integer of 310 digits): that is refused, a written infinity is not.
_INF = float("inf")
_NEG_INF = float("-inf")
_JSON_CONSTANTS = {"Infinity": _INF, "-Infinity": _NEG_INF, "NaN": math.nan}
_TEXT_INFINITIES = {"inf": _INF, "+inf": _INF, "infinity": _INF, "+infinity": _INF}
_TEXT_INFINITIES |= {"-inf": _NEG_INF, "-infinity": _NEG_INF}
_INT_MAX_DIGITS = sys.get_int_max_str_digits() or 4300
_INTEGER_TEXT = re.compile(r"\s*[+-]?[0-9_]+\s*")
# A JSON string (possessive, so an unterminated one cannot backtrack), and anything that is
# neither a string nor a bracket: what the depth check strips before counting brackets.
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]++")


class InputError(Exception):
    """The request body is not acceptable; ``status`` is the HTTP status to answer with."""

    status = 400
    error_code = "BAD_REQUEST"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnsupportedMediaType(InputError):
    status = 415
    error_code = "UNSUPPORTED_MEDIA_TYPE"


class TooLarge:
    """A numeric literal past what a double holds: an integer of more digits than Python
    converts (``sys.get_int_max_str_digits``), or a finite literal that overflows to infinity.
    Refused by :func:`_convert` for every column type, naming the column."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "TooLarge()"


TOO_LARGE = TooLarge()


@dataclass(frozen=True)
class ParsedInput:
    columns: dict[str, Any]  # column name -> typed values (numpy arrays for numeric types)
    params: dict[str, Any] | None
    records: list[dict[str, Any]]  # the validated rows, JSON-safe, for the prediction log

    @property
    def rows(self) -> int:
        return len(self.records)

    @property
    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.columns)


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: str
    required: bool


_NUMPY_DTYPES = {
    "double": np.float64,
    "float": np.float32,
    "long": np.int64,
    "integer": np.int32,
    "boolean": np.bool_,
}


def column_specs(signature: dict[str, Any] | None) -> list[ColumnSpec] | None:
    """Column specs of a column-based signature, or None when there is no usable schema."""
    inputs = (signature or {}).get("inputs") or []
    if not inputs or any("name" not in col or col.get("type") == "tensor" for col in inputs):
        return None
    return [ColumnSpec(c["name"], c["type"], bool(c.get("required", True))) for c in inputs]


def parse_content_type(content_type: str) -> str:
    """The media type of a Content-Type header; raises UnsupportedMediaType for what we can't
    read (anything but JSON or CSV, a charset other than UTF-8, unknown parameters)."""
    media_type, *raw_params = (part.strip() for part in (content_type or "").split(";"))
    media_type = media_type.lower()
    if media_type not in ("application/json", "text/csv"):
        shown = media_type or "none"
        raise UnsupportedMediaType(
            f"Content-Type {shown!r} is not supported; use application/json or text/csv."
        )
    for param in filter(None, raw_params):
        key, _, value = param.partition("=")
        key, value = key.strip().lower(), value.strip().strip('"').lower()
        if key != "charset":
            raise UnsupportedMediaType(f"Content-Type parameter {key!r} is not supported.")
        if value not in ("utf-8", "utf8"):
            raise UnsupportedMediaType(f"charset {value!r} is not supported; send UTF-8.")
    return media_type


def parse_request(
    body: bytes,
    content_type: str,
    signature: dict[str, Any] | None,
    *,
    max_depth: int = JSON_MAX_DEPTH,
) -> ParsedInput:
    """Turn a scoring request into a typed DataFrame (and params) that the model can score.

    ``max_depth`` bounds the nesting of a JSON body (arrays and objects, the outer object
    counting 1); it is checked before the body is parsed.

    Raises:
        UnsupportedMediaType: unknown content type or charset (415).
        InputError: malformed body, nested deeper than ``max_depth``, wrong columns or types,
            a number too large for its column, or no rows (400).
    """
    media_type = parse_content_type(content_type)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"The body is not valid UTF-8 (byte {exc.start}).") from None
    specs = column_specs(signature)
    if media_type == "text/csv":
        header, rows = _read_csv(text)
        records = _rows_from_positional(header, rows, "csv")
        params = None
        from_text = True
    else:
        payload = _read_json(text, max_depth)
        records, params = _records_from_json(payload, specs)
        from_text = False
    if not records:
        raise InputError("The input has no rows.")
    params = _check_params(params, signature)
    if specs is None:
        if not from_text:
            _refuse_too_large(records, "a value")
        frame = pd.DataFrame.from_records(records)
        parsed = ParsedInput({c: frame[c].to_numpy() for c in frame.columns}, params, records)
    else:
        columns, typed_records = _typed_columns(records, specs, from_text=from_text)
        parsed = ParsedInput(columns, params, typed_records)
    _refuse_too_large(params, "a param")
    return parsed


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of a JSON text nest (0 for a scalar), counted
    without parsing and without recursion: strings are stripped, then the brackets left are
    summed (+1 opening, -1 closing) and the running maximum taken. Linear in the text; on a
    malformed text the figure is approximate, and the parser reports the text."""
    brackets = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _read_json(text: str, max_depth: int = JSON_MAX_DEPTH) -> dict[str, Any]:
    if not text.strip():
        raise InputError('The body is empty; send a JSON object such as {"dataframe_split": ...}.')
    if (depth := json_depth(text)) > max_depth:
        raise InputError(
            f"The body nests arrays and objects {depth} levels deep; at most {max_depth} are "
            "accepted."
        )
    try:
        payload = json.loads(text, parse_constant=_JSON_CONSTANTS.__getitem__)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"The body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}."
        ) from None
    except ValueError:
        # An integer literal longer than Python converts (a guard against quadratic-time
        # conversion): parse again, keeping such literals as TOO_LARGE for the column checks.
        payload = json.loads(
            text, parse_constant=_JSON_CONSTANTS.__getitem__, parse_int=_int_or_too_large
        )
    except RecursionError:  # a safety net below the depth check's bound
        raise InputError("The body nests arrays and objects too deeply.") from None
    if not isinstance(payload, dict):
        raise InputError(
            f"The body must be a JSON object with one of the fields {', '.join(FORMAT_KEYS)}; "
            f"got a JSON {type(payload).__name__}."
        )
    return payload


def _int_or_too_large(literal: str) -> int | TooLarge:
    return int(literal) if len(literal.lstrip("-")) <= _INT_MAX_DIGITS else TOO_LARGE


def _refuse_too_large(value: Any, what: str) -> None:
    """Refuse a number too large for a double left where no column type checks it (the rows
    of a model without a column signature, the params)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, TooLarge) or (
            isinstance(item, float)
            and math.isinf(item)
            and item is not _INF
            and item is not _NEG_INF
        ):
            raise InputError(f"The body has {what} that is a number too large for a double.")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _read_csv(text: str) -> tuple[list[str], list[list[str]]]:
    if not text.strip():
        raise InputError("The CSV body is empty; send a header row and at least one data row.")
    try:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        lines = [row for row in reader if row]
    except csv.Error as exc:
        raise InputError(f"The body is not valid CSV: {exc}.") from None
    header, rows = lines[0], lines[1:]
    # A leading unnamed column is the index that DataFrame.to_csv() writes by default.
    if header and header[0] == "" and all(len(r) == len(header) for r in rows):
        header, rows = header[1:], [r[1:] for r in rows]
    return header, rows


def _records_from_json(
    payload: dict[str, Any], specs: list[ColumnSpec] | None
) -> tuple[list[dict[str, Any]], Any]:
    keys = [k for k in FORMAT_KEYS if k in payload]
    if len(keys) != 1:
        if not keys and ("columns" in payload or "data" in payload):
            raise InputError(
                "The bare {columns, data} body of MLflow < 2.0 is not accepted; wrap it as "
                '{"dataframe_split": {"columns": [...], "data": [...]}}.'
            )
        found = f"got {', '.join(keys)}" if keys else "got none"
        raise InputError(f"The body must have exactly one of {', '.join(FORMAT_KEYS)}; {found}.")
    unknown = sorted(set(payload) - {keys[0], PARAMS_KEY})
    if unknown:
        raise InputError(f"Unknown field(s) in the body: {', '.join(unknown)}.")
    key = keys[0]
    data = payload[key]
    if key == "dataframe_split":
        if not isinstance(data, dict):
            raise InputError("dataframe_split must be an object with 'columns' and 'data'.")
        extra = sorted(set(data) - {"columns", "data", "index"})
        if extra:
            raise InputError(f"dataframe_split has unknown field(s): {', '.join(extra)}.")
        columns, rows = data.get("columns"), data.get("data")
        if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
            raise InputError("dataframe_split.columns must be a list of column names.")
        if not isinstance(rows, list):
            raise InputError("dataframe_split.data must be a list of rows.")
        records = _rows_from_positional(columns, rows, "dataframe_split.data")
    elif key == "dataframe_records":
        records = _rows_from_records(data, key)
    else:
        records = _rows_from_tensor_input(data, key, specs)
    return records, payload.get(PARAMS_KEY)


def _rows_from_positional(columns: list[str], rows: list[Any], where: str) -> list[dict[str, Any]]:
    if len(set(columns)) != len(columns):
        dupes = sorted({c for c in columns if columns.count(c) > 1})
        raise InputError(f"Duplicate column(s): {', '.join(dupes)}.")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise InputError(f"{where}[{i}] must be a list of values.")
        if len(row) != len(columns):
            raise InputError(
                f"{where}[{i}] has {len(row)} values but there are {len(columns)} columns."
            )
        records.append(dict(zip(columns, row, strict=True)))
    return records


def _rows_from_records(data: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise InputError(f"{where} must be a list of objects, one per row.")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise InputError(f"{where}[{i}] must be an object mapping column names to values.")
    return data


def _rows_from_tensor_input(
    data: Any, where: str, specs: list[ColumnSpec] | None
) -> list[dict[str, Any]]:
    """``instances`` / ``inputs``: a list of row objects, a list of positional rows (in the
    signature's column order), or (``inputs`` only, as in TF serving) an object of columns."""
    if isinstance(data, dict):
        if where == "instances":
            raise InputError("instances must be a list of rows.")
        lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
        if -1 in lengths or len(lengths) > 1:
            raise InputError(
                f"{where} as an object must map each column to a list of equal length."
            )
        n = lengths.pop() if lengths else 0
        return [{col: values[i] for col, values in data.items()} for i in range(n)]
    if not isinstance(data, list):
        raise InputError(f"{where} must be a list of rows.")
    if all(isinstance(row, dict) for row in data):
        return data
    if all(isinstance(row, list) for row in data):
        if specs is None:
            raise InputError(
                f"{where} as lists of values needs a model signature with column names."
            )
        names = [s.name for s in specs]
        return _rows_from_positional(names, data, where)
    raise InputError(f"{where} must hold only row objects or only lists of values.")


def _typed_columns(
    records: list[dict[str, Any]], specs: list[ColumnSpec], *, from_text: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check the column names of every row and convert each column to its signature type."""
    known = {s.name for s in specs}
    required = [s.name for s in specs if s.required]
    for i, row in enumerate(records):
        extra = [c for c in row if c not in known]
        if extra:
            raise InputError(f"Unknown column(s) {', '.join(map(repr, extra[:5]))} (row {i}).")
        missing = [c for c in required if c not in row]
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise InputError(f"Missing required column(s) {shown} (row {i}).")
    present = [s for s in specs if any(s.name in row for row in records)]
    columns: dict[str, Any] = {}
    typed_records: list[dict[str, Any]] = [{} for _ in records]
    for spec in present:
        values = [_convert(row.get(spec.name), spec, i, from_text) for i, row in enumerate(records)]
        for rec, value in zip(typed_records, values, strict=True):
            # NaN and +-inf are not JSON: the log's JSONField would refuse the row (the model
            # still gets the value itself in ``columns``).
            finite = not isinstance(value, float) or math.isfinite(value)
            rec[spec.name] = value if finite else None
        dtype = _NUMPY_DTYPES.get(spec.type)
        columns[spec.name] = np.asarray(values, dtype=dtype if dtype else object)
    return columns, typed_records


def _convert(value: Any, spec: ColumnSpec, row: int, from_text: bool) -> Any:
    where = f"column {spec.name!r} (row {row})"
    kind = spec.type
    if from_text and isinstance(value, str):
        value = _from_text(value, kind)
    if value is None:
        if kind in ("double", "float"):
            return math.nan  # a missing float is NaN, as in pandas and MLflow
        raise InputError(f"{where}: null is not allowed in a {kind} column.")
    if isinstance(value, TooLarge) or (
        isinstance(value, float)
        and math.isinf(value)
        and value is not _INF
        and value is not _NEG_INF
    ):
        raise InputError(f"{where}: the number is too large for a {kind} column.")
    if kind in ("double", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"{where}: expected a number, got {_json_type(value)}.")
        try:
            number = float(value)
        except OverflowError:  # an integer of 310 digits or more
            raise InputError(f"{where}: the number is too large for a {kind} column.") from None
        if kind == "float" and math.isfinite(number) and abs(number) > _FLOAT32_MAX:
            raise InputError(f"{where}: the number is too large for a float column.")
        return number
    if kind in ("long", "integer"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {_json_type(value)}.")
        bits = 63 if kind == "long" else 31
        if not -(2**bits) <= value < 2**bits:
            raise InputError(f"{where}: integer out of range for a {kind} column.")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {_json_type(value)}.")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {_json_type(value)}.")
        return value
    return value  # datetime, binary and other types are left to MLflow's own enforcement


_TEXT_BOOLEANS = {"true": True, "false": False}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _from_text(text: str, kind: str) -> Any:
    """A CSV cell typed like its JSON counterpart; an empty cell is null; a written infinity
    (``inf``, ``-Infinity``) is one, a finite number too large for a double is TOO_LARGE."""
    if text == "" and kind != "string":
        return None
    if kind in ("double", "float", "long", "integer"):
        if (infinity := _TEXT_INFINITIES.get(text.strip().lower())) is not None:
            return infinity
        if _INTEGER_TEXT.fullmatch(text) and len(text.strip().lstrip("+-")) > _INT_MAX_DIGITS:
            return TOO_LARGE
    try:
        if kind in ("double", "float"):
            return float(text)
        if kind in ("long", "integer"):
            try:
                return int(text)
            except ValueError:
                return float(text)  # "41.0" is a long in JSON, so it is one in CSV too
    except ValueError:
        return text  # reported by _convert as "expected a number, got a string"
    if kind == "boolean":
        return _TEXT_BOOLEANS.get(text.strip().lower(), text)
    return text


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float | TooLarge):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_params(params: Any, signature: dict[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InputError("params must be an object of parameter names to values.")
    allowed = {p["name"] for p in ((signature or {}).get("params") or [])}
    unknown = sorted(set(params) - allowed)
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "none"
        raise InputError(f"Unknown param(s) {', '.join(unknown)}; this model accepts: {accepted}.")
    return params or None


def predictions_to_jsonable(raw: Any) -> list[Any]:
    """Model output as a JSON-ready list, one entry per input row (MLflow's response shape)."""
    if isinstance(raw, pd.DataFrame):
        return json.loads(raw.to_json(orient="records"))
    if isinstance(raw, pd.Series):
        raw = raw.to_numpy()
    if isinstance(raw, np.ndarray):
        raw = raw.tolist()
    if isinstance(raw, list):
        return [_scalar(v) for v in raw]
    return [_scalar(raw)]


def _scalar(value: Any) -> Any:
    if isinstance(value, list):
        return [_scalar(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _scalar(value.item())
    return value
