"""A pytest plugin the GPU check's pytest stages load (-p gpucheck.pytest_live): each failure is written as one
line the moment it happens, `LIVE FAILED <node id> - <its first error line>`, so a run cut at the stage's cap still
says which tests failed and why (pytest's own summary comes only at the end); each passed test as `DONE PASSED
<node id>` (the H200's records held counts only, and which tests had passed was read from the file's order)."""

from __future__ import annotations

import pytest

PREFIX = "LIVE "
PASSED = "DONE PASSED "


def describe(report: pytest.TestReport) -> str:
    """`LIVE FAILED <node id> - <first 'E ' line>` (ERROR for a setup or teardown failure)."""
    kind = "FAILED" if report.when == "call" else "ERROR"
    text = report.longreprtext or ""
    first = next((line[1:].strip() for line in text.splitlines() if line.startswith("E ")), "")
    first = first or next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    return f"{PREFIX}{kind} {report.nodeid} - {first}"[:300]


class LiveFailures:
    def __init__(self, terminal):
        self.terminal = terminal

    @pytest.hookimpl(trylast=True)  # after the terminal's own progress mark
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.terminal.write("\n")  # -q's progress marks leave the line open
            self.terminal.write_line(describe(report))  # the stages run pytest with PYTHONUNBUFFERED=1
        elif report.when == "call" and report.passed:
            self.terminal.write("\n")
            self.terminal.write_line(f"{PASSED}{report.nodeid}"[:300])


@pytest.hookimpl(trylast=True)  # after the terminal reporter registers itself
def pytest_configure(config: pytest.Config) -> None:
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        config.pluginmanager.register(LiveFailures(terminal), "gpucheck-live-failures")
