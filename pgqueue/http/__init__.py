"""The HTTP API: a Starlette app (app.py) of thin routes over enqueue, jobs, metrics and
admin; requests are read by parsing.py, callers known by auth.py, errors answered by
errors.py, and the routes described by openapi.py."""

from pgqueue.http.app import create_app, serve
from pgqueue.http.openapi import openapi_spec

__all__ = ["create_app", "openapi_spec", "serve"]
