"""A flow run whose host is gone ends Crashed (flows/deployments.py): the automation bootstrap
registers, once however often it runs, and the heartbeats the deployments ask for. Waiting
for a real Crashed state takes 5 minutes: `make image-test` kills a worker host during a run
and does."""

from __future__ import annotations

import httpx

from flows.deployments import CRASH_DETECTION, HEARTBEAT_MISSED, HEARTBEAT_SECONDS


def test_bootstrap_registers_one_automation_that_crashes_runs_without_heartbeats(stack):
    stack.ingest("bootstrap", "--wait", "60")  # again: updated, not added
    automations = [a for a in httpx.post(f"{stack.api_url}/automations/filter", json={}, timeout=30).json()
                   if a["name"] == CRASH_DETECTION]
    assert len(automations) == 1
    trigger = automations[0]["trigger"]
    assert trigger["posture"] == "Proactive" and trigger["within"] == HEARTBEAT_MISSED.total_seconds()
    # The window opens when a run starts and again at each heartbeat; any of these closes it.
    assert set(trigger["after"]) == {"prefect.flow-run.Running", "prefect.flow-run.heartbeat"}
    assert set(trigger["expect"]) == {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                                      "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                                      "prefect.flow-run.Crashed"}
    assert trigger["for_each"] == ["prefect.resource.id"]
    assert [(a["type"], a["state"]) for a in automations[0]["actions"]] == [("change-flow-run-state", "CRASHED")]


def test_runs_send_heartbeats_several_times_within_the_window(stack):
    deployments = httpx.post(f"{stack.api_url}/deployments/filter", json={}, timeout=30).json()
    ours = [d for d in deployments if d["work_pool_name"] == stack.env["INGEST_WORK_POOL"]]
    assert ours
    for deployment in ours:
        assert deployment["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS)
    assert HEARTBEAT_MISSED.total_seconds() >= 3 * HEARTBEAT_SECONDS
