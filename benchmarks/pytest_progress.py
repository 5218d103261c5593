"""A pytest plugin that writes each test's result as it comes (``-p pytest_progress --progress-jsonl=FILE``): one
JSON line per test (node id, outcome, seconds, the first line of a failure), appended and flushed at once, so a
run cut short (the GPU playbook's time limits) still says which tests passed and which failed. With pytest-xdist
the lines come from the controller as the workers report."""
from __future__ import annotations

import json
import time


def pytest_addoption(parser):
    parser.addoption("--progress-jsonl", default=None, help="append one JSON line per test result to this file")


def pytest_configure(config):
    path = config.getoption("--progress-jsonl")
    if path and not hasattr(config, "workerinput"):  # on the controller only (xdist workers report to it)
        config.pluginmanager.register(Progress(path), "progress-jsonl")


class Progress:
    def __init__(self, path: str):
        self.out = open(path, "a")

    def pytest_runtest_logreport(self, report):
        if not (report.when == "call" or report.outcome != "passed"):
            return  # one line per test: its call, or the setup / teardown that failed or skipped it
        line = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                "seconds": round(report.duration, 3), "time": round(time.time(), 1)}
        if report.failed:
            line["error"] = (str(report.longrepr).strip().splitlines() or [""])[-1][:300]
        self.out.write(json.dumps(line) + "\n")
        self.out.flush()

    def pytest_unconfigure(self, config):
        self.out.close()
