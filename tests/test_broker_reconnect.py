"""A broker connection cut while the consumer has good and bad messages in hand: aio-pika
reconnects, and the messages taken on the lost channel are left to their redelivery. Acking
or dead-lettering them raised (their channel is closed), which ended the consume loop, and
the bad ones were dead-lettered a second time when they came back."""

from __future__ import annotations

import uuid
from collections import Counter
from urllib.parse import urlsplit

import psycopg

from tests.fixtures.checks import assert_exactly_once, records
from tests.fixtures.services import AMQP_URL
from tests.fixtures.stack import Outgoing, wait_for
from tests.fixtures.tcp_proxy import TcpProxy

INSERTS_WAITING = """SELECT count(*) FROM pg_stat_activity
                     WHERE datname = %s AND wait_event_type = 'Lock' AND query LIKE '%%INSERT INTO inbox%%'"""


def test_messages_in_hand_at_a_broker_reconnect_are_stored_or_dead_lettered_once(stack):
    pipeline = stack.pipeline("reconnect")
    source = f"reconnect-{uuid.uuid4().hex[:8]}"
    good = records(source, 80)
    bad = [Outgoing(b'{"id": "oops", ' + str(k).encode(), f"{source}-bad-{k}") for k in range(10)]
    broker = urlsplit(AMQP_URL)
    proxy = TcpProxy(broker.hostname, broker.port or 5672)
    watched = stack.start_consumer("consumer-reconnect", pipeline, env={"INGEST_AMQP_URL": proxy.url(AMQP_URL)})
    consumer = watched.process
    try:
        database = psycopg.connect(stack.database_url).info.dbname
        # A transaction holding the inbox keeps the first batch's commit waiting; the second
        # batch's flush waits for it, so the consume loop stops and what comes next stays in hand.
        with psycopg.connect(stack.database_url) as lock:
            lock.execute("LOCK TABLE inbox IN ACCESS EXCLUSIVE MODE")
            stack.publish(pipeline.name, good[:10])
            wait_for(lambda: stack.scalar(INSERTS_WAITING, (database,)) == 1, 60, "the first commit waiting", stack)
            stack.publish(pipeline.name, good[10:60])  # a full batch: its flush waits
            wait_for(lambda: watched.metric("ingest_messages_received_total") == 60, 60, "the second batch taken",
                     stack)
            stack.publish(pipeline.name, bad + good[60:])
            wait_for(lambda: stack.queue_depth(pipeline.queue) == 0, 60, "everything delivered", stack)

            proxy.cut()
            wait_for(lambda: proxy.accepted == 2, 60, "the consumer reconnected", stack)
            wait_for(lambda: stack.queue_depth(pipeline.queue) == 0, 60, "everything delivered again", stack)
            assert consumer.alive
        # The lock is gone: the loop goes on with the messages of the lost channel, then their redeliveries.
        wait_for(lambda: not consumer.alive or stack.scalar(
            f"SELECT count(*) FROM {pipeline.sink_table} WHERE source = %s", (source,)) == len(good),
                 120, "the good records stored", stack)
        assert consumer.alive, consumer.log_tail()
        assert_exactly_once(stack, pipeline, source, len(good))
        letters = stack.dead_letters(pipeline)
        assert Counter(m.message_id for m in letters) == {m.message_id: 1 for m in bad}
        assert {m.headers["x-error-reason"] for m in letters} == {"not_json"}
        log = consumer.log_path.read_text(errors="replace")
        assert "its channel was lost (broker reconnect); left to its redelivery" in log
        assert "died" not in log
        assert consumer.stop(timeout=30) == 0
    finally:
        consumer.stop()
        proxy.close()
