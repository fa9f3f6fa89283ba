"""Fixtures of the API tests: each store the API can keep job data in."""

from __future__ import annotations

import pytest

from tests.integration.apikit import STORES


def _blob_dir(kind: str, tmp_path_factory) -> str | None:
    return str(tmp_path_factory.mktemp("blobs")) if kind == "files" else None


@pytest.fixture(params=STORES)
def blob_dir(request, tmp_path_factory) -> str | None:
    """None (job data in Redis), or a fresh CONVQ_BLOB_DIR (job data in files)."""
    return _blob_dir(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=STORES)
def module_blob_dir(request, tmp_path_factory) -> str | None:
    """blob_dir for a module-scoped API: one per store kind."""
    return _blob_dir(request.param, tmp_path_factory)
