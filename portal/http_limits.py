"""Request-head limits for the production server (gunicorn with uvicorn's worker).

Gunicorn's ``limit_request_line``, ``limit_request_fields`` and ``limit_request_field_size``
only bind gunicorn's own HTTP parser; the uvicorn worker parses with httptools (llhttp),
which has no limit at all: a 64 MB header was buffered and handed to the app. This protocol
applies gunicorn's three limits, plus a bound on the whole head, inside uvicorn:

- a request line (method, target, version) over ``line`` bytes: 414;
- more than ``fields`` header fields, one field (``name: value``) over ``field_size`` bytes,
  or a head (request line and fields) over ``total`` bytes: 431.

The total is checked on the bytes as they arrive, before the parser buffers them, so an
endless header costs at most one socket read past the bound. With h11 (when httptools is not
installed) uvicorn's own ``h11_max_incomplete_event_size`` bounds the head instead.
"""

from __future__ import annotations

import http
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class HeadLimits:
    """Bytes, except ``fields`` (a count); gunicorn's defaults but a longer request line."""

    line: int = 8190
    fields: int = 100
    field_size: int = 8190
    total: int = 64 * 1024


class HeadRefused(Exception):
    """Raised from a parser callback; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`HeadLimits` (``config.head_limits``)."""

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: HeadLimits = getattr(config, "head_limits", None) or HeadLimits()
        self._reset_head()

    def _reset_head(self) -> None:
        self._in_head = True
        self._head_bytes = 0  # of the current head received so far
        self._tail = b""  # the last bytes of the previous read: a CRLFCRLF may span two
        self._fields = 0

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            window = self._tail + data
            end = window.find(b"\r\n\r\n")
            head = self._head_bytes - len(self._tail) + (end + 4 if end >= 0 else len(window))
            if head > self.limits.total:
                self._refuse(
                    431, f"The request head is over the limit of {self.limits.total} bytes."
                )
                return
            self._head_bytes += len(data)
            self._tail = window[-3:]
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadRefused):
                self._refuse(exc.__context__.status, exc.__context__.message)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _refuse(self, status: int, message: str) -> None:
        self.logger.warning("Refused a request head: %s", message)
        body = message.encode("ascii")
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._fields = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.line:
            raise HeadRefused(414, f"The request target is over {self.limits.line} bytes.")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self.limits.fields:
            raise HeadRefused(431, f"The request has more than {self.limits.fields} headers.")
        if len(name) + len(value) + 2 > self.limits.field_size:
            raise HeadRefused(
                431, f"A request header is over the limit of {self.limits.field_size} bytes."
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._tail = b""
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reset_head()
