"""`make image-test`: the image, as a deployment of several hosts, for real.

    python -m hosts.run --image ingest:<commit> [--records 5000] [--build-ca FILE] [--keep]

On a podman network of its own (internal: no route beyond this machine), with a
PostgreSQL, a RabbitMQ and nginx of its own on this machine (hosts/deployment.py):

    server      role server      the Prefect server, behind nginx
    worker-1    role worker      reach the Prefect API through nginx only (TLS, auth string)
    worker-2    role worker
    ingest-1    role consumer

It checks the image (non-root, HEALTHCHECK, no secret of the build left), starts the hosts
and waits for each one's healthcheck (`podman healthcheck run`), publishes the records from
this machine as a producer would, kills worker-1 (`podman kill`) during one of its flow
runs, waits until that run ends Crashed, starts worker-1 again, retries the run as an
operator would (`ingest replay runs`, on the server host), and once everything is settled
counts: every record stored exactly once, the flow runs spread over both worker hosts (the
label Prefect gives each run, the worker's name), the hosts still healthy with every process
uid 10001, each host stopped by `podman stop` within its grace period (exit code 0, no
program killed by supervisord for outliving its stopwaitsecs). Progress lines go to stderr,
one summary line to stdout; exit 1 on any failure. Everything it started is removed at the
end, on failure or Ctrl-C too (--keep keeps the logs and data, printed).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from pathlib import Path

import httpx

from faults.audit import FINAL, Observer, count, wait_settled
from faults.producer import Producer
from hosts.deployment import Deployment
from hosts.image import check_image
from hosts.podman import Podman
from ingest.pipelines import Pipeline
from ingest.waiting import TimedOut, poll

HOSTS = {"server": "server", "worker-1": "worker", "worker-2": "worker", "ingest-1": "consumer"}
KILLED = "worker-1"
UID = 10001
GRACE = 150  # seconds; docker/compose.yaml's stop_grace_period
STARTUP = 600  # the first start migrates Prefect's database and copies its UI: minutes on a busy machine
SETTLE = 900
PUBLISH_SECONDS = 90
# A program that outlived its stopwaitsecs (supervisord.conf): not a clean stop.
KILLED_BY_SUPERVISORD = re.compile(r"stopped: (\S+) \(terminated by SIGKILL\)")
WORK_POOL = "ingest"  # the hosts' INGEST_WORK_POOL: the default
# `ingest worker` names its Prefect worker ingest-worker-<hostname>-<pid> (ingest/cli/up.py).
WORKER_NAME = re.compile(r"ingest-worker-(.+)-\d+")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _interrupted(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def wait(check, timeout: float, what: str, interval: float = 2):
    try:
        return poll(check, timeout=timeout, interval=interval, what=what)
    except TimedOut:
        raise TimeoutError(f"{what}: not after {timeout:.0f}s") from None


def ran_on(run: dict) -> str | None:
    """The host whose worker ran this flow run (the label Prefect's worker gives it)."""
    match = WORKER_NAME.fullmatch(run.get("labels", {}).get("prefect.worker.name", ""))
    return match.group(1) if match else None


def start_hosts(deployment: Deployment, podman: Podman, observer: Observer) -> dict[str, str]:
    """The server first (it migrates and registers the deployments), then the others; each healthy."""
    containers = {}
    for host, role in HOSTS.items():
        containers[host] = deployment.start_host(host, role)
        log(f"{host} (role {role}) started; waiting for its healthcheck")
        wait(lambda: podman.healthy(containers[host]), STARTUP, f"{host} healthy", interval=5)
        if role == "server":
            wait(lambda: registered(observer, deployment.pipeline), STARTUP, "the deployments registered")
    workers = [h for h, role in HOSTS.items() if role == "worker"]
    wait(lambda: set(workers) <= online_worker_hosts(observer), STARTUP, "every worker host online in the pool")
    return containers


def registered(observer: Observer, pipeline: Pipeline) -> bool:
    response = httpx.post(f"{observer.api_url}/deployments/filter", auth=observer.api_auth, timeout=10,
                          json={"deployments": {"name": {"any_": [pipeline.name]}}})
    return response.status_code == 200 and len(response.json()) >= 1


def online_worker_hosts(observer: Observer) -> set[str]:
    response = httpx.post(f"{observer.api_url}/work_pools/{WORK_POOL}/workers/filter", json={},
                          auth=observer.api_auth, timeout=10)
    if response.status_code != 200:
        return set()
    return {m.group(1) for w in response.json() if w.get("status") == "ONLINE"
            and (m := WORKER_NAME.fullmatch(w["name"]))}


def runs_on(observer: Observer, pipeline: Pipeline, host: str, state_type: str) -> list[str]:
    return [r["id"] for r in observer.flow_runs(pipeline) if r["state_type"] == state_type and ran_on(r) == host]


def kill_during_run(podman: Podman, host: str, container: str, observer: Observer, pipeline: Pipeline,
                    producer: Producer, attempts: int = 5) -> list[str]:
    """`podman kill` the host the moment one of its flow runs is Running, once a third of the
    records are published and it has completed a run: the ids of the runs it left Running. A
    run that finished just before the kill landed is no test: the host is started again and
    killed at its next run."""
    wait(lambda: len(producer.confirmed) >= producer.count / 3, SETTLE, "a third of the records published")
    wait(lambda: runs_on(observer, pipeline, host, "COMPLETED"), SETTLE, f"a flow run completed by {host}")
    for attempt in range(1, attempts + 1):
        wait(lambda: runs_on(observer, pipeline, host, "RUNNING"), SETTLE, f"a flow run running on {host}",
             interval=0.1)
        podman.kill(container)
        time.sleep(3)  # a state change already on its way to the server lands
        if interrupted := runs_on(observer, pipeline, host, "RUNNING"):
            log(f"killed {host} during flow run(s) {', '.join(interrupted)}")
            return interrupted
        log(f"killed {host}, but its run had ended first (attempt {attempt}); starting it again")
        restart(podman, host, container, observer)
    raise RuntimeError(f"no kill of {host} landed during one of its runs in {attempts} attempts")


def restart(podman: Podman, host: str, container: str, observer: Observer) -> None:
    podman("start", container)
    wait(lambda: podman.healthy(container), STARTUP, f"{host} healthy again", interval=5)
    wait(lambda: host in online_worker_hosts(observer), STARTUP, f"{host}'s worker online again")


def redrive(podman: Podman, server: str) -> None:
    """Runs that ended Crashed (or Failed) retried as an operator would, on the server host."""
    result = podman("exec", server, "ingest", "replay", "runs", "-p", "hosts", "--wait", "--timeout", str(SETTLE),
                    check=False, timeout=SETTLE + 60)
    if result.returncode != 0:
        raise RuntimeError(f"ingest replay runs failed:\n{result.stdout}\n{result.stderr}")


def scenario(deployment: Deployment, podman: Podman, records: int) -> tuple[dict, dict, list[str]]:
    """(counts that must be 0, figures, problems found)."""
    observer = deployment.observer()
    pipeline = deployment.pipeline
    containers = start_hosts(deployment, podman, observer)
    problems: list[str] = []
    producer = Producer(deployment.amqp_url("producer"), pipeline.name, f"hosts-{uuid.uuid4().hex[:6]}", records,
                        PUBLISH_SECONDS).start()
    log(f"publishing {records} records over {PUBLISH_SECONDS} s from this machine (user producer)")
    try:
        interrupted = kill_during_run(podman, KILLED, containers[KILLED], observer, pipeline, producer)
    finally:
        producer.join()
    log(f"published: {len(producer.confirmed)} confirmed; waiting for the interrupted run(s) to end")
    def final_states() -> set[str] | None:
        ended = [r for r in observer.flow_runs(pipeline) if r["id"] in interrupted and r["state_type"] in FINAL]
        return {r["state_name"] for r in ended} if len(ended) == len(interrupted) else None

    killed_run = ",".join(sorted(wait(final_states, SETTLE, "the interrupted run(s) final", interval=5)))
    if killed_run != "Crashed":
        problems.append(f"the run(s) interrupted by the kill ended {killed_run}, not Crashed")
    log(f"interrupted run(s) ended {killed_run}; {KILLED} started again")
    restart(podman, KILLED, containers[KILLED], observer)
    log("retrying the runs that ended Crashed or Failed on the server host (ingest replay runs)")
    redriven = Counter(r["state_name"] for r in observer.flow_runs(pipeline) if r["state_type"] in ("FAILED", "CRASHED"))
    redrive(podman, containers["server"])
    wait_settled(observer, pipeline, SETTLE)
    report = count(observer, pipeline, producer)
    runs = observer.flow_runs(pipeline)
    run_hosts = Counter(ran_on(r) or "?" for r in runs)
    workers = {h for h, role in HOSTS.items() if role == "worker"}
    if not workers <= set(run_hosts):
        problems.append(f"flow runs ran on {dict(run_hosts)}, not on every worker host")
    unhealthy = [h for h, c in containers.items() if not podman.healthy(c)]
    problems += [f"{h} not healthy at the end" for h in unhealthy]
    uids = {h: podman.uids(c) for h, c in containers.items()}
    problems += [f"{h}: {command} runs as uid {sorted(u)}" for h, found in uids.items()
                 for command, u in found.items() if u != {UID}]
    stops = {}
    for host in reversed(containers):  # consumers, then workers, then the server: nothing left waiting
        seconds, code = podman.stop(containers[host], GRACE)
        stops[host] = f"{seconds:.0f}s/{code}"
        killed = KILLED_BY_SUPERVISORD.findall(podman.logs(containers[host]))
        log(f"podman stop {host}: {seconds:.1f} s, exit code {code}"
            + (f"; supervisord killed {', '.join(killed)}" if killed else ""))
        if code != 0 or seconds >= GRACE or killed:
            problems.append(f"podman stop {host}: exit code {code} after {seconds:.0f} s (grace {GRACE} s)"
                            + (f", {', '.join(killed)} killed after its stopwaitsecs" if killed else ""))
    figures = report.extra | {
        "run_hosts": ",".join(f"{h}:{n}" for h, n in sorted(run_hosts.items())),
        "killed_run": killed_run,
        "redriven": "+".join(f"{n}{state}" for state, n in sorted(redriven.items())) or "0",
        "healthy": f"{len(containers) - len(unhealthy)}/{len(containers)}",
        "uids": ",".join(sorted({str(u) for found in uids.values() for ids in found.values() for u in ids})),
        "stops": ",".join(f"{h}:{s}" for h, s in stops.items()),
    }
    return report.counts, figures, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="the image to test (make image builds it)")
    parser.add_argument("--records", type=int, default=5000, help="records published (default 5000)")
    parser.add_argument("--build-ca", type=Path, help="the CA file the build trusted: no copy may be in the image")
    parser.add_argument("--subnet", default="10.213.0.0/24", help="the test network's subnet (default 10.213.0.0/24)")
    parser.add_argument("--keep", action="store_true", help="keep the logs and data directory (it is printed)")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, _interrupted)
    started = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="ingest-hosts-"))
    home.chmod(0o755)  # the private cluster's files belong to the postgres user
    podman = Podman(f"ingest-hosts-{uuid.uuid4().hex[:6]}", args.subnet)
    deployment = Deployment(home, args.image, podman)
    counts, figures, problems = {}, {}, []
    try:
        size, problems = check_image(podman, args.image, args.build_ca)
        log(f"image {args.image}: {size / 1e6:.0f} MB" + (f"; {'; '.join(problems)}" if problems else ""))
        deployment.start_network()
        deployment.start_services()
        log(f"network {podman.prefix} ({podman.subnet}); PostgreSQL, RabbitMQ and nginx on {podman.gateway}")
        counts, figures, found = scenario(deployment, podman, args.records)
        problems += found
        figures |= {"image_mb": round(size / 1e6)}
    except Exception as exc:
        traceback.print_exc()
        problems.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        if problems or args.keep:
            for name in podman.containers:
                (home / f"{name}.log").write_text(podman.logs(name))
        deployment.stop()
        if problems or args.keep:
            log(f"logs and data kept in {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    figures["seconds"] = round(time.monotonic() - started)
    line = " ".join(f"{k}={v}" for k, v in (counts | figures).items())
    print(f"hosts: {line}" + (f" problems={'; '.join(problems)}" if problems else ""), flush=True)
    return 1 if problems or any(counts.values()) or not counts else 0


if __name__ == "__main__":
    sys.exit(main())
