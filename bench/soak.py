"""The long fault runs, kept out of the default test suite (it excludes `@pytest.mark.slow`):

1. the slow fault tests: PostgreSQL down for the full 60 s, the flaky simulator with 2,000
   drivers for 3 minutes (`pytest -m slow tests/test_faults_*.py`);
2. bench/faults.py's long scenarios: the `--flaky` simulator with thousands of drivers for
   10 minutes, PostgreSQL down 60 s, Redis down 10 s, against `tracker serve` subprocesses.

    .venv/bin/python bench/soak.py                      # everything (about 20 minutes)
    .venv/bin/python bench/soak.py --skip-tests --flaky-drivers 5000 --flaky-minutes 10

The pytest part needs TRACKER_TEST_DATABASE_URL / TRACKER_TEST_REDIS_URL like the test suite (or
starts embedded servers). Exit status 0 only if every part passed with nothing lost or duplicated.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], timeout: float) -> int:
    print("$ " + " ".join(cmd), flush=True)
    started = time.monotonic()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    print(f"-> exit {rc} after {time.monotonic() - started:.0f} s", flush=True)
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-tests", action="store_true", help="skip the slow pytest fault tests")
    ap.add_argument("--flaky-drivers", type=int, default=3000)
    ap.add_argument("--flaky-minutes", type=float, default=10.0)
    ap.add_argument("--flaky-processes", type=int, default=2, help="simulator processes (2 on a 2-core machine)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = ap.parse_args()
    python = sys.executable
    codes = []
    if not args.skip_tests:
        codes.append(
            run(
                [
                    python,
                    "-m",
                    "pytest",
                    "-m",
                    "slow",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-o",
                    "timeout=900",
                    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_faults_*.py")),
                ],
                1800,
            )
        )
    codes.append(
        run(
            [
                python,
                "bench/faults.py",
                "flaky",
                "pg_down",
                "redis",
                "--flaky-drivers",
                str(args.flaky_drivers),
                "--flaky-s",
                str(args.flaky_minutes * 60),
                "--flaky-processes",
                str(args.flaky_processes),
                "--pg-down-s",
                "60",
                "--redis-down-s",
                "10",
                "--json",
                str(args.json),
            ],
            args.flaky_minutes * 60 + 1200,
        )
    )
    return 0 if all(rc == 0 for rc in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
