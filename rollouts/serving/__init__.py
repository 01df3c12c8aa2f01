"""The serving data plane: routing, model cache, request parsing and the invocations view."""
