"""What our flow-run processes change in Prefect's flow engine, and why. Imported by every
flow module, so a run has these whether its process was forked warm or started cold.

- No suspension watch. Prefect watches each flow run of a deployment for suspension
  (`suspend_flow_run`) through a subscription to the server's event stream. While any
  process subscribes, the server parses and filters every event it receives once more:
  with a task run per record, three events a record, 5% of the server's CPU, and the server
  is what bounds `record` throughput. These flows never suspend.
- No wait for the heartbeat thread. After a run's final state the engine joins its
  heartbeat thread, which sleeps in steps of a second: the process lives up to a second
  longer (half a second on average), and holds its worker's slot meanwhile. The thread is a
  daemon and sends nothing once told to stop (nor after a final state), so the run does not
  wait for it, as Prefect's engine for async flows does not.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

from prefect import flow_engine

flow_engine.observe_flow_run_suspension = lambda flow_run_id, suspension_request: nullcontext()

flow_engine._send_heartbeats = partial(flow_engine._send_heartbeats, join_on_exit=False)
