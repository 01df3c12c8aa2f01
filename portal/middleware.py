"""Refuses a NUL character in the URL or a form body before any view runs (issue 9, point 2).

PostgreSQL text cannot hold a NUL, so a ``%00`` that reaches a query (``/api/models?q=%00``,
``/api/models/a%00b``, ``/registry/?q=%00``) used to end in a 500. Checking every view's
arguments in one place fixes the class: the path, every query parameter (names and values)
and, for form posts, every form field. JSON bodies are checked by the API's parser
(:mod:`portal.parsers`) and the webhook's loader; the serving route reads its own body.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse

from portal.inputs import NUL, find_nul

#: Routes that answer JSON (the rest are pages, which answer 400 inside the site's layout).
JSON_PREFIXES = (
    "/api/",
    "/serving/",
    "/registry/webhooks/",
    "/health",
    "/ping",
    "/version",
    "/metrics",
)
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def nul_problem(request: HttpRequest) -> str | None:
    """Why the request holds a NUL in its path, query or form body, or None."""
    if NUL in request.path:
        return "The URL path must not contain NUL (%00) characters."
    if (name := find_nul(request.GET.lists())) is not None:
        return f"Query parameter {name!r} must not contain NUL (%00) characters."
    if (
        request.method == "POST"
        and request.content_type in FORM_TYPES
        and not request.path.startswith("/serving/")  # bounded and parsed by the serving view
    ):
        if (name := find_nul(request.POST.lists())) is not None:
            return f"Form field {name!r} must not contain NUL (%00) characters."
    return None


def wants_json(request: HttpRequest, view_func) -> bool:
    return (
        hasattr(view_func, "cls")  # a DRF view
        or request.path.startswith(JSON_PREFIXES)
        or not request.accepts("text/html")
    )


class RejectNulMiddleware:
    """400 for a NUL in the path, a query parameter or a form field, as JSON ``{"detail"}`` on
    the API and as a page in the site's layout elsewhere. Runs in ``process_view`` (last in
    ``MIDDLEWARE``) so that the page knows the signed-in user; the CSRF check runs first."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs) -> HttpResponse | None:
        problem = nul_problem(request)
        if problem is None:
            return None
        if wants_json(request, view_func):
            return JsonResponse({"detail": problem}, status=400)
        from portal.views import bad_request_page

        return bad_request_page(request, problem, back_url="/")
