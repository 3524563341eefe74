"""The database refusing the inbox commit (a trigger that raises, as a revoked privilege or a
missing table would): the consumer holds the batch and retries, and stores everything once
the cause is gone. It used to die on the next flush, crash-loop, and let the broker's
delivery limit dead-letter the good messages it held."""

from __future__ import annotations

import re
import uuid

from tests.fixtures.checks import assert_exactly_once, records
from tests.fixtures.refusal import inbox_refusing
from tests.fixtures.stack import wait_for


def test_a_refused_inbox_commit_is_retried_with_the_messages_held_until_it_succeeds(stack):
    pipeline = stack.pipeline("refusing")
    source = f"refusing-{uuid.uuid4().hex[:8]}"
    count = 300
    with inbox_refusing(stack.database_url, pipeline.name) as refusal:
        consumer = stack.start_consumer("consumer-refusing", pipeline)
        first, metric = consumer.process, consumer.metric
        stack.publish(pipeline.name, records(source, count))
        wait_for(lambda: metric("ingest_inbox_commit_failures_total") >= 2, 60, "commit attempts refused", stack)
        # It lives, serves its metrics, and holds what it has (no more than its prefetch) unacked.
        assert first.alive
        assert metric("ingest_messages_received_total") <= pipeline.prefetch
        assert metric("ingest_messages_acked_total") == 0
        log = first.log_path.read_text(errors="replace")
        assert re.search(rf"batch [0-9a-f-]{{36}} \({pipeline.name}\): inbox commit failed \(attempt 1\), "
                         rf"its \d+ message\(s\) held unacked, retry in .*{re.escape(refusal)}", log), log[-3000:]
        assert stack.scalar("SELECT count(*) FROM inbox WHERE pipeline = %s", (pipeline.name,)) == 0

        # Stopped meanwhile, it gives up the commit, returns the messages and closes cleanly.
        assert first.stop(timeout=30) == 0, first.log_tail()
        log = first.log_path.read_text(errors="replace")
        assert re.search(rf"batch \S+ \({pipeline.name}\): not committed \(RaiseException", log), log[-3000:]
        assert re.search(r"\bstopped\s*$", log), log[-3000:]

        consumer = stack.start_consumer("consumer-refusing", pipeline)
        second, metric = consumer.process, consumer.metric
        wait_for(lambda: metric("ingest_inbox_commit_failures_total") >= 1, 60, "the next consumer refused", stack)
    assert_exactly_once(stack, pipeline, source, count)
    # Each message came to the second consumer once: held, never returned and redelivered.
    assert metric("ingest_messages_received_total") == count
    assert metric("ingest_messages_acked_total") == count
    assert second.alive
    assert stack.dead_letters(pipeline) == []
    assert second.stop(timeout=30) == 0
