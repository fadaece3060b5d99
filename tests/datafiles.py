"""Real data sets for the tests: found through one setting, ``ISAL_DATA_ROOT`` (default ``../shared/data``).

A user's clone has no ``../shared``: tests that need a data set skip with the reason. CI sets
``ISAL_REQUIRE_DATA=1`` (see ``.ci/run``), where a missing data set is a failure, so CI keeps testing
on real data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from isal_backend.bench.paths import DATA_ROOT_VARIABLE, resolve_data_root

REQUIRE_VARIABLE = "ISAL_REQUIRE_DATA"


def data_file(name: str) -> Path:
    """The data root's ``name``; skips the test (fails it under ISAL_REQUIRE_DATA=1) when it is missing."""
    path = resolve_data_root() / name
    if not path.exists():
        message = (f"{path} is missing: set {DATA_ROOT_VARIABLE} to the folder that holds {name} "
                   "(default ../shared/data beside the repository)")
        if os.environ.get(REQUIRE_VARIABLE) == "1":
            pytest.fail(f"{message}; {REQUIRE_VARIABLE}=1 makes that a failure", pytrace=False)
        pytest.skip(message)
    return path
