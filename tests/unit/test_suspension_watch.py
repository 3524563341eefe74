"""Flow-run processes of our flows do not watch for suspension (flows/ingest.py says why)."""

import threading

from prefect import _flow_run_suspension, flow_engine

import flows.ingest  # noqa: F401  (importing the flows turns the watch off)


def test_the_engine_still_looks_the_watch_up_by_the_name_we_replace():
    # A Prefect upgrade that renamed or moved it would leave our replacement unused.
    setup = flow_engine.BaseFlowRunEngine.setup_flow_run_suspension_request.__wrapped__
    assert "observe_flow_run_suspension" in setup.__code__.co_names


def test_no_watch_thread_is_started():
    assert flow_engine.observe_flow_run_suspension is not _flow_run_suspension.observe_flow_run_suspension
    before = threading.active_count()
    with flow_engine.observe_flow_run_suspension(None, _flow_run_suspension.FlowRunSuspensionRequest()):
        assert threading.active_count() == before
