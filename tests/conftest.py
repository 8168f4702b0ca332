"""Shared test setup.

Tests marked ``root`` build network namespaces and install real rules: they need root (CAP_NET_ADMIN). Elsewhere
they skip and say why; in CI (``CI=true``), where we are root, a missing privilege is an error, never a skip.
"""

from __future__ import annotations

import os

import pytest

IS_ROOT = os.geteuid() == 0
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    for item in items:
        if item.get_closest_marker("root"):
            if IN_CI:
                raise pytest.UsageError(f"CI=true but not root: {item.nodeid} needs root and would be skipped")
            item.add_marker(pytest.mark.skip(reason="needs root: builds network namespaces and installs real rules"))
