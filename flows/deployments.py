"""Work pool and deployments, generated from the pipeline config (never clicked together)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.workers.process import ProcessWorker

from ingest.pipelines import Pipeline
from ingest.steps import load_program, version


async def ensure_work_pool(name: str) -> bool:
    """Create the process work pool if missing; True if created."""
    async with get_client() as client:
        try:
            await client.read_work_pool(name)
            return False
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=ProcessWorker.type,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="Runs the ingestion flows; workers on any host may poll it.",
                )
            )
            return True


# A flow run whose host is gone (killed, powered off, out of memory: its worker went with
# it) cannot report its end, and Prefect would show it Running for good, its records never
# done. Every run sends a heartbeat event this often (Prefect's minimum), and the automation
# below marks a run Crashed once HEARTBEAT_MISSED has passed without one and without the run
# ending: it is then retried like any crashed run (`ingest replay runs`, the UI's Retry).
# The window opens when the run enters Running (an event of the server's own) and again at
# each heartbeat: a host that dies before its run's first heartbeat is sent is caught too.
# It is longer than the 4 minutes or so that runs ride out a Prefect server outage
# (PREFECT_CLIENT_MAX_RETRIES, ingest/settings.py), whose heartbeats are lost meanwhile: a
# run alive through an outage is not taken for dead. (One taken for dead after a longer
# outage has its records stored all the same; retrying it finds nothing left to do.)
HEARTBEAT_SECONDS = 30
HEARTBEAT_MISSED = timedelta(minutes=5)
CRASH_DETECTION = "ingest: crash flow runs whose heartbeats stopped"


async def ensure_crash_detection() -> bool:
    """Create or update the automation that crashes runs without heartbeats; True if created."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    automation = AutomationCore(
        name=CRASH_DETECTION,
        description=f"A flow run that sent no heartbeat for {HEARTBEAT_MISSED.seconds} s and did not end: its "
        "process and worker are gone with their host. Marked Crashed, so it can be retried.",
        trigger=EventTrigger(
            after={"prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{state}" for state in
                                                    ("Completed", "Failed", "Cancelled", "Crashed"))},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=HEARTBEAT_MISSED,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {HEARTBEAT_MISSED.seconds} s: its host is gone")],
    )
    async with get_client() as client:
        existing = await client.read_automations_by_name(CRASH_DETECTION)
        if existing:
            await client.update_automation(existing[0].id, automation)
            return False
        await client.create_automation(automation)
        return True


# Daily, at an hour away from the backfills' default (03:00 UTC).
MAINTENANCE_CRON = "30 4 * * *"


def job_variables(flow: Flow) -> dict:
    """How the process worker runs a deployment's flow runs.

    `ingest-flow-run` instead of `python -m prefect.engine` (flows/forkserver.py); heartbeats
    often enough for ensure_crash_detection(). The rest shortens the start of every run,
    each an API call or more it waits for: the flow's entrypoint, which Prefect's engine then
    imports at once instead of reading the deployment for it (and starting an event-loop
    thread to do so); and no version check or CSRF token for each of the run's API clients
    (the worker that starts the run talks to the same server; ours does not ask for CSRF).
    """
    return {"command": "ingest-flow-run",
            "env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
                    "PREFECT__FLOW_ENTRYPOINT": f"{flow.fn.__module__}.{flow.fn.__name__}",
                    "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false",
                    "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false"}}


async def apply_deployments(pipelines: list[Pipeline], work_pool: str, config_file: Path) -> list[str]:
    """Create or update, per pipeline, `ingest/<pipeline>`, the scheduled `backfill/<pipeline>`
    and the daily `maintenance/<pipeline>` (inbox retention).

    All carry a version derived from the code (the pipeline's config, its steps' and row's
    modules), so the UI shows which code processed a run.
    """
    from flows.backfill import backfill
    from flows.ingest import ingest
    from flows.maintenance import maintenance

    names = []
    for pipeline in pipelines:
        common = {
            "name": pipeline.name,
            "tags": ["ingest", f"pipeline:{pipeline.name}"],
            # A module path, not a file path: the worker imports the installed package.
            "entrypoint_type": EntrypointType.MODULE_PATH,
            "version": version(load_program(pipeline, config_file)),
        }
        deployments = [
            await ingest.ato_deployment(
                parameters={"pipeline": pipeline.name},
                description=f"Processes batches of pipeline {pipeline.name!r} (created by its consumers).",
                job_variables=job_variables(ingest), **common,
            ),
            await backfill.ato_deployment(
                parameters={"pipeline": pipeline.name, "mode": pipeline.backfill_mode},
                schedule=Cron(pipeline.backfill_cron, timezone="UTC") if pipeline.backfill_cron else None,
                description=f"Reprocesses a window of pipeline {pipeline.name!r}; by default the previous "
                f"UTC day, mode {pipeline.backfill_mode!r}.",
                job_variables=job_variables(backfill), **common,
            ),
            await maintenance.ato_deployment(
                parameters={"pipeline": pipeline.name},
                schedule=Cron(MAINTENANCE_CRON, timezone="UTC"),
                description=f"Deletes pipeline {pipeline.name!r}'s settled inbox records older than "
                f"{pipeline.inbox_retention_days} days, and the batches left empty.",
                job_variables=job_variables(maintenance), **common,
            ),
        ]
        for deployment in deployments:
            await deployment.aapply(work_pool_name=work_pool)
        names += [pipeline.deployment, pipeline.backfill_deployment, pipeline.maintenance_deployment]
    return names
