"""Which Label Studio a test runs against: the session's servers of conftest.py, by database."""

from __future__ import annotations

from typing import Any

import pytest

#: The databases the key e2e tests run Label Studio on; ``label_studio_on(request, database)`` gives its server.
DATABASES = ("sqlite", "postgres")


def label_studio_on(request: pytest.FixtureRequest, database: str) -> Any:
    """The session's Label Studio on that database (started on first use)."""
    return request.getfixturevalue({"sqlite": "label_studio", "postgres": "label_studio_pg"}[database])
