"""Does tracker's connect rate depend on PostgreSQL? N drivers connect (load.js idle mode) while a
transaction holds a lock on `drivers` for 20 s: what a stalled or saturated PostgreSQL does to
the welcome's `drivers_hello` UPSERT. load.js prints its progress every 5 s; the server's log
(bench/results/server-pglock-*.log) has a line for every driver welcomed with last_seq 0 after
asyncpg's command timeout.

    .venv/bin/python bench/connect_pg_lock.py [drivers, default 6000]
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repo root: harness/ (not in the wheel)

import common

LOCK_S = 20


def main() -> int:
    drivers = sys.argv[1] if len(sys.argv) > 1 else "6000"
    common.ensure_node_modules()
    common.exit_on_sigterm()
    log_file = common.RESULTS / f"server-pglock-{time.strftime('%H%M%S')}.log"
    with common.private_redis() as (redis_url, _), common.start_server("tracker", redis_url, log_file=log_file) as srv:
        common.log(f"load {common.load_average()}")

        def lock() -> None:
            time.sleep(2.0)
            common.log(f"locking drivers for {LOCK_S} s")
            sql = f"BEGIN; LOCK TABLE drivers IN SHARE ROW EXCLUSIVE MODE; SELECT pg_sleep({LOCK_S}); COMMIT;"
            subprocess.run(["psql", srv.dsn, "-q", "-c", sql], capture_output=True, timeout=LOCK_S + 30)
            common.log("lock released")

        threading.Thread(target=lock, daemon=True).start()
        t0 = time.monotonic()
        load = [
            *("node", str(common.LOAD_JS), "--proto", "tracker", "--url", srv.url, "--secret", common.SECRET),
            *("--mode", "idle", "--drivers", drivers, "--dashboards", "0", "--connect-concurrency", "256"),
            *("--hold", "1"),
        ]
        proc = subprocess.Popen(load, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{time.monotonic() - t0:5.1f} s] {line.rstrip()[:300]}", flush=True)
        proc.wait(60)
    welcomed_0 = sum("welcoming with 0" in line for line in log_file.read_text().splitlines())
    print(f"welcomed with last_seq 0 after the command timeout: {welcomed_0} (server log {log_file})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
