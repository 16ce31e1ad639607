"""CPU seconds of the test suite: pytest with a plugin that charges each test the CPU time of this process
and of the child processes it waited for, then the sums (docs/development.md's figures).

    python scripts/test_times.py -m "not slow"      # the fast tier
    python scripts/test_times.py                    # every test

Any argument this script does not know goes to pytest. CPU seconds depend far less on other jobs sharing
the machine than wall time does; both are printed, with the load average, so say which you quote.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import pytest


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuTimes:
    """Per test (setup, call and teardown): ``(node id, wall s, CPU s)``."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        wall, cpu = time.perf_counter(), cpu_seconds()
        yield
        self.rows.append((item.nodeid, time.perf_counter() - wall, cpu_seconds() - cpu))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15, metavar="N", help="list the N tests that took most CPU time")
    args, pytest_args = parser.parse_known_args()
    times = CpuTimes()
    wall, cpu = time.perf_counter(), cpu_seconds()
    code = pytest.main(["-q", "-p", "no:randomly", *pytest_args], plugins=[times])
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    print(f"\n{len(times.rows)} tests: {sum(r[2] for r in times.rows):.1f} CPU s in the tests; the whole run "
          f"{cpu:.1f} CPU s (imports and collection included), {wall:.1f} s wall; load average at the end "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for node, test_wall, test_cpu in sorted(times.rows, key=lambda r: -r[2])[:args.top]:
        print(f"{test_cpu:7.2f} CPU s {test_wall:7.2f} s wall  {node}")
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
