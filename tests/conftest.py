"""pytest hooks for the whole suite.

``TYPSAMP_REQUIRE_CUDA=1`` (set by ``make gpu-check``) turns every skipped test into a
failure: on the GPU machine the CUDA tests, which skip elsewhere, must run, and a skip
there means the check did not check. The skip's reason is kept in the failure.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_CUDA = os.environ.get("TYPSAMP_REQUIRE_CUDA", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_CUDA and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under TYPSAMP_REQUIRE_CUDA=1 (make gpu-check), which allows no skips: {reason}"
