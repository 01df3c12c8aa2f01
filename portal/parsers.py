"""DRF parsers of every API view (``REST_FRAMEWORK["DEFAULT_PARSER_CLASSES"]``): JSON bounded in
depth and free of NUL characters, and form bodies free of NUL characters; anything else is a
400 ``{"detail": ...}`` (DRF's ParseError), never a 500."""

from __future__ import annotations

from rest_framework.exceptions import ParseError
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser

from portal.inputs import BadInput, find_nul, loads_bounded


class BoundedJSONParser(JSONParser):
    """``application/json`` through :func:`portal.inputs.loads_bounded`: at most
    ``API_JSON_MAX_DEPTH`` (64) levels, no NUL in strings or keys."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return loads_bounded(stream.read() if stream is not None else b"", strict=self.strict)
        except BadInput as exc:
            raise ParseError(str(exc)) from None


def _check_form(data) -> None:
    if (name := find_nul(data.lists())) is not None:
        raise ParseError(f"Form field {name!r} must not contain NUL (\\x00) characters.")


class NulFreeFormParser(FormParser):
    """``application/x-www-form-urlencoded`` without NUL characters in names or values."""

    def parse(self, stream, media_type=None, parser_context=None):
        data = super().parse(stream, media_type, parser_context)
        _check_form(data)
        return data


class NulFreeMultiPartParser(MultiPartParser):
    """``multipart/form-data`` without NUL characters in field names or values (file contents
    are bytes and not checked)."""

    def parse(self, stream, media_type=None, parser_context=None):
        result = super().parse(stream, media_type, parser_context)
        _check_form(result.data)
        return result
