"""`make faults`: the fault suite against the real stack, on private PostgreSQL and RabbitMQ.

Starts a PostgreSQL cluster and a RabbitMQ node of its own (the suite restarts them, so
never the shared ones), then the stack as production runs it (`ingest up`: supervisord,
Prefect server, a worker, two consumers) on fresh databases. Per scenario a producer
publishes records with confirms while the fault is injected; once every queue has drained
and every flow run is final, it prints one line:

    scenario: lost=0 duplicated=0 unexpected=0 misdead=0 attempted=... confirmed=... ...

and exits 1 if any count is not 0 or a scenario failed. Everything it started is removed
at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from faults import scenarios
from faults.audit import Observer
from faults.services import PrivatePostgres, PrivateRabbit
from ingest.pipelines import load_pipelines
from tests.fixtures.supervised import SupervisedStack


# Small batches, so that every scenario makes many flow runs and faults land in the middle of some.
PIPELINE = """
[pipelines.faults_{name}]
sink_table = "faults_{name}"
granularity = "chunk"
chunk_size = 100
task_retry_delay_seconds = 1
backfill_cron = ""
[pipelines.faults_{name}.batch]
max_records = 500
max_linger_ms = 2000
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _interrupted(signum, _frame) -> None:
    """SIGTERM (a CI job cancelled) cleans up as Ctrl-C does."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    names = list(scenarios.scenarios(0))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=3000, help="records published per scenario (default 3000)")
    parser.add_argument("--only", action="append", choices=names, metavar="SCENARIO",
                        help=f"run only this scenario (repeatable): {', '.join(names)}")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directory (it is printed)")
    args = parser.parse_args()
    chosen = args.only or names

    signal.signal(signal.SIGTERM, _interrupted)
    home = Path(tempfile.mkdtemp(prefix="ingest-faults-"))
    home.chmod(0o755)  # the private cluster's files belong to the postgres user
    postgres, rabbit = PrivatePostgres(home), PrivateRabbit(home)
    started = time.monotonic()
    failed: list[str] = []
    try:
        log(f"private PostgreSQL on port {postgres.port}, RabbitMQ {rabbit.node} on port {rabbit.port}; in {home}")
        postgres.start()
        rabbit.start()
        pipelines_toml = "".join(PIPELINE.format(name=name) for name in names)
        stack = SupervisedStack(
            home, "faults", rabbit.url, f"{postgres.url}/ingest", f"{postgres.url}/prefect", pipelines_toml,
            consumers=2, workers=1,
            extra={
                "INGEST_RABBITMQ_MANAGEMENT_URL": rabbit.management_url,
                "INGEST_METRICS_PORT": "0",
                # Recover within seconds, not the production defaults' tens of seconds.
                "INGEST_STUCK_BATCH_SECONDS": "5",
                "INGEST_SUBMIT_MAX_BACKOFF_SECONDS": "5",
                "INGEST_ABANDONED_RUN_SECONDS": "20",
                "INGEST_TEST_CRASH_HEADER": scenarios.CRASH_HEADER,
            },
        )
        log(f"starting the stack (ingest up); log: {stack.log_path}")
        with stack:
            suite = scenarios.Suite(stack, postgres, rabbit,
                                    Observer(rabbit.url, rabbit.management_url, f"{postgres.url}/ingest",
                                             stack.api_url),
                                    load_pipelines(Path(stack.env["INGEST_PIPELINES_FILE"])), args.records)
            runs = scenarios.scenarios(args.records)
            for name in chosen:
                log(f"{name}: {args.records} records")
                began = time.monotonic()
                try:
                    report = runs[name](suite)
                    report.extra["seconds"] = round(time.monotonic() - began)
                    print(report.line(name), flush=True)
                    if report.failed:
                        failed.append(name)
                except Exception as exc:  # one scenario's failure must not stop the others
                    traceback.print_exc()
                    print(f"{name}: error={type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                          f"seconds={round(time.monotonic() - began)}", flush=True)
                    failed.append(name)
                try:
                    suite.restore()
                except Exception as exc:
                    log(f"could not restore the stack after {name}: {exc}")
            log("stopping the stack")
    finally:
        rabbit.remove()
        postgres.remove()
        if args.keep or failed:
            log(f"logs and data kept in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    total = round(time.monotonic() - started)
    print(f"{len(chosen) - len(failed)} of {len(chosen)} scenarios passed in {total} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
