"""Serve the OpenAPI 3.1 document (built in openapi_doc.py)."""

from flask import Blueprint

from .openapi_doc import document

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi():
    return document()
