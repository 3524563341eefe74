"""What our flow-run processes skip of Prefect's flow engine (flows/engine_tuning.py says why)."""

import logging
import threading
import time

from prefect import _flow_run_suspension, flow_engine

import flows.ingest  # noqa: F401  (importing the flows tunes the engine)


def test_the_engine_still_looks_the_watch_up_by_the_name_we_replace():
    # A Prefect upgrade that renamed or moved it would leave our replacement unused.
    setup = flow_engine.BaseFlowRunEngine.setup_flow_run_suspension_request.__wrapped__
    assert "observe_flow_run_suspension" in setup.__code__.co_names


def test_no_watch_thread_is_started():
    assert flow_engine.observe_flow_run_suspension is not _flow_run_suspension.observe_flow_run_suspension
    before = threading.active_count()
    with flow_engine.observe_flow_run_suspension(None, _flow_run_suspension.FlowRunSuspensionRequest()):
        assert threading.active_count() == before


def test_the_engine_still_looks_the_heartbeats_up_by_the_name_we_replace():
    assert "_send_heartbeats" in flow_engine.FlowRunEngine.run_context.__wrapped__.__code__.co_names


class HeartbeatingEngine:
    """What `_send_heartbeats` reads of an engine; counts the heartbeats it is asked to send."""

    heartbeat_seconds = 30
    flow_run = None
    logger = logging.getLogger(__name__)

    def __init__(self) -> None:
        self.sent = 0

    def _build_heartbeat_event_template(self):
        return {}, []

    def _emit_flow_run_heartbeat(self, resource, related) -> None:
        self.sent += 1


def test_a_run_does_not_wait_for_its_heartbeat_thread_and_no_heartbeat_follows():
    engine = HeartbeatingEngine()
    before = set(threading.enumerate())
    with flow_engine._send_heartbeats(engine):
        time.sleep(0.1)  # the thread has sent its first heartbeat and sleeps
    # Prefect's join would have waited here until the thread ended (up to a second).
    assert [t for t in threading.enumerate() if t not in before and t.is_alive()], "the run waited for its thread"
    time.sleep(1.5)  # the thread wakes, sees it was stopped, and ends without sending
    assert not [t for t in threading.enumerate() if t not in before]
    assert engine.sent == 1
