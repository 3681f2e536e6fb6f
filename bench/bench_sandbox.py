"""Per-candidate cost of the code sandbox: ``run_program`` on a passing HumanEval-like
candidate, inside bubblewrap against the same runner with the sandbox switched off (the
pre-sandbox path: own session, resource limits, process-group kill). Interleaved rounds,
medians. Usage: ``python bench/bench_sandbox.py [--rounds 20]``; prints a Markdown table."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

from fedmerge_plugins.evaluation import code_runner
from fedmerge_plugins.evaluation.sandbox import ALLOW_ENV, Isolation, require_isolation

CANDIDATE = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n"


def one(sandboxed: bool) -> float:
    started = time.perf_counter()
    if sandboxed:
        result = code_runner.run_program(CANDIDATE)
    else:
        bare = Isolation(False, (), "switched off for the benchmark")
        with mock.patch.object(code_runner, "require_isolation", return_value=bare):
            result = code_runner.run_program(CANDIDATE)
    assert result.status == "passed", result
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    rounds = parser.parse_args().rounds
    os.environ[ALLOW_ENV] = "1"
    require_isolation()  # the one-time probe is start-up, not per candidate
    one(True), one(False)  # warm-up
    times = {True: [], False: []}
    for _ in range(rounds):
        for sandboxed in (True, False):
            times[sandboxed].append(one(sandboxed))
    sandbox, bare = (statistics.median(times[k]) * 1000 for k in (True, False))
    print("| runner | median ms per candidate |\n|---|---|")
    print(f"| bubblewrap sandbox | {sandbox:.1f} |\n| no sandbox (limits only) | {bare:.1f} |")
    print(f"| ratio | {sandbox / bare:.2f}× |")


if __name__ == "__main__":
    main()
