"""The OpenAPI 3.1 document of the API."""


def document() -> dict:
    return {"openapi": "3.1.0", "info": {"title": "convq", "version": "0.1.0"}, "paths": {}}
