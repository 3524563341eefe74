"""Where a record's time goes, publish to stored: the stages of its path, from timestamps the
system keeps anyway (the record's send time, the inbox, the sink row, the flow run's states
and logs in Prefect).

    linger          sent -> its batch's inbox transaction begins (inbox.received_at)
    commit+create   -> its flow run exists (flow run `created`): commit, ack, creation call
    worker pickup   -> Pending: the worker's poll, its deployment read, the Pending proposal
    process start   -> the worker's "submitted to infrastructure" log: Submitting, the
                       launcher, the fork, the pid written back
    engine start    -> Running: the engine reads its run and flow, proposes Running
    load            -> the flow's "processing N record(s)" log: config, steps, (an early
                       run) the wait for its batch's commit, inbox read
    store           -> the row's ingested_at (its store transaction)
    final state     -> Completed (after the record is stored: not part of its latency)

Each stage counts its time on the record's path: an early run (consumers/submit.py) is
created, and mostly started, while its batch fills, so the stages it went through during
the linger count only what outlasted it (each moment is the later of its own and the one
before).

Clocks: all on one machine (the bench's stack); Prefect's timestamps are its server's.
"""

from __future__ import annotations

import statistics
from datetime import datetime

import httpx
import psycopg
from psycopg import sql

STAGES = ("linger", "commit+create", "worker pickup", "process start", "engine start", "load", "store")
AFTER = "final state"

RECORDS = """
SELECT i.batch_id, (s.data->>'sent_at')::float8, extract(epoch FROM i.received_at)::float8,
       extract(epoch FROM s.ingested_at)::float8, b.flow_run_id
FROM {sink} s JOIN inbox i ON i.source = s.source AND i.record_id = s.id AND i.pipeline = %(pipeline)s
JOIN batches b ON b.batch_id = i.batch_id
WHERE s.source = %(source)s
"""


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _run_marks(client: httpx.Client, flow_run_id) -> dict[str, float]:
    """The moments of one flow run: created, Pending, submitted, Running, processing, Completed."""
    run = client.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()
    states = client.get("/flow_run_states/", params={"flow_run_id": str(flow_run_id)}).raise_for_status().json()
    logs = client.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}},
                                             "sort": "TIMESTAMP_ASC"}).raise_for_status().json()
    marks = {"created": _epoch(run["created"])}
    for state in states:  # the first of each (a retried run has later ones)
        marks.setdefault(state["type"], _epoch(state["timestamp"]))
    for entry in logs:
        if "submitted to infrastructure" in entry["message"]:
            marks.setdefault("submitted", _epoch(entry["timestamp"]))
        elif ": processing " in entry["message"]:
            marks.setdefault("processing", _epoch(entry["timestamp"]))
    return marks


def measure(database_url: str, api_url: str, pipeline: str, source: str) -> dict:
    """Each stage's p50 and mean over the records of `source`, and its share of the mean total."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(sql.SQL(RECORDS).format(sink=sql.Identifier(pipeline)),
                            {"pipeline": pipeline, "source": source}).fetchall()
    with httpx.Client(base_url=api_url, timeout=30) as client:
        runs = {run_id: _run_marks(client, run_id) for run_id in {row[4] for row in rows}}
    durations: dict[str, list[float]] = {stage: [] for stage in (*STAGES, AFTER)}
    incomplete = 0
    early = {run_id for _, _, received, _, run_id in rows if runs[run_id]["created"] < received}
    for _, sent, received, stored, run_id in rows:
        marks = runs[run_id]
        needed = ("created", "PENDING", "submitted", "RUNNING", "processing", "COMPLETED")
        if any(mark not in marks for mark in needed):
            incomplete += 1
            continue
        moments = [sent]
        for mark in (received, marks["created"], marks["PENDING"], marks["submitted"], marks["RUNNING"],
                     marks["processing"], stored):
            moments.append(max(moments[-1], mark))
        for stage, start, end in zip(STAGES, moments, moments[1:]):
            durations[stage].append(end - start)
        durations[AFTER].append(marks["COMPLETED"] - stored)
    if not durations["linger"]:
        raise ValueError(f"no record of {source} has all its stages recorded ({incomplete} incomplete)")
    total = sum(statistics.fmean(durations[stage]) for stage in STAGES)
    table = {stage: {"p50_ms": round(statistics.median(values) * 1000),
                     "mean_ms": round(statistics.fmean(values) * 1000),
                     **({"share": round(statistics.fmean(values) / total, 3)} if stage in STAGES else {})}
             for stage, values in durations.items()}
    return {"stages": table, "records": len(durations["linger"]), "flow_runs": len(runs),
            "early_flow_runs": len(early), "incomplete": incomplete, "mean_total_ms": round(total * 1000)}


def table_lines(result: dict) -> list[str]:
    lines = [f"{'where a low-rate record waits':<30}{'p50 ms':>8}{'mean ms':>9}{'share':>7}"]
    for stage, figures in result["stages"].items():
        share = f"{figures['share']:.0%}" if "share" in figures else "(after)"
        lines.append(f"  {stage:<28}{figures['p50_ms']:>8}{figures['mean_ms']:>9}{share:>7}")
    lines.append(f"  {'total (mean)':<28}{'':>8}{result['mean_total_ms']:>9}"
                 f"   {result['records']} records, {result['flow_runs']} flow runs "
                 f"({result.get('early_flow_runs', 0)} created before their batch's commit)")
    return lines
