"""Work pool and deployments, generated from the pipeline config (never clicked together)."""

from __future__ import annotations

from pathlib import Path

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


# Daily, at an hour away from the backfills' default (03:00 UTC).
MAINTENANCE_CRON = "30 4 * * *"


async def apply_deployments(pipelines: list[Pipeline], work_pool: str, config_file: Path) -> list[str]:
    """Create or update, per pipeline, `ingest/<pipeline>`, the scheduled `backfill/<pipeline>`
    and the daily `maintenance/<pipeline>` (inbox retention).

    All carry a version derived from the code (the pipeline's config, its steps' and row's
    modules), so the UI shows which code processed a run.
    """
    from flows.backfill import backfill
    from flows.ingest import ingest
    from flows.maintenance import maintenance

    # The process worker runs this instead of `python -m prefect.engine` (flows/forkserver.py).
    job_variables = {"command": "ingest-flow-run"}
    names = []
    for pipeline in pipelines:
        common = {
            "name": pipeline.name,
            "tags": ["ingest", f"pipeline:{pipeline.name}"],
            # A module path, not a file path: the worker imports the installed package.
            "entrypoint_type": EntrypointType.MODULE_PATH,
            "job_variables": job_variables,
            "version": version(load_program(pipeline, config_file)),
        }
        deployments = [
            await ingest.ato_deployment(
                parameters={"pipeline": pipeline.name},
                description=f"Processes batches of pipeline {pipeline.name!r} (created by its consumers).",
                **common,
            ),
            await backfill.ato_deployment(
                parameters={"pipeline": pipeline.name, "mode": pipeline.backfill_mode},
                schedule=Cron(pipeline.backfill_cron, timezone="UTC") if pipeline.backfill_cron else None,
                description=f"Reprocesses a window of pipeline {pipeline.name!r}; by default the previous "
                f"UTC day, mode {pipeline.backfill_mode!r}.",
                **common,
            ),
            await maintenance.ato_deployment(
                parameters={"pipeline": pipeline.name},
                schedule=Cron(MAINTENANCE_CRON, timezone="UTC"),
                description=f"Deletes pipeline {pipeline.name!r}'s settled inbox records older than "
                f"{pipeline.inbox_retention_days} days, and the batches left empty.",
                **common,
            ),
        ]
        for deployment in deployments:
            await deployment.aapply(work_pool_name=work_pool)
        names += [pipeline.deployment, pipeline.backfill_deployment, pipeline.maintenance_deployment]
    return names
