"""Telling the message that crashes consumers from the messages delivered with it.

When a consumer process dies (a crash in a C extension, the OOM killer), the broker returns
every message it held unacked, not only the one it died of, and counts a delivery for each.
Without care the innocent ones reach the delivery limit with the poison and are
dead-lettered with it. So a redelivered message is noted in `in_hand` while the consumer
handles it (decode and validate: where a message can crash a process), and the note is
removed right after. A note found when the message comes back means a consumer died while
handling that very message: it is returned without being touched, and the broker's
delivery limit dead-letters it (reason `delivery_limit`). Messages delivered with it are
handled on their next delivery, well within the limit.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool


class PoisonGuard:
    def __init__(self, pool: AsyncConnectionPool, pipeline: str):
        self.pool = pool
        self.pipeline = pipeline

    async def enter(self, message_key: str) -> bool:
        """Note that we handle this message; False if a consumer died handling it before."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO in_hand (pipeline, message_key) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (self.pipeline, message_key))
            return cur.rowcount == 1

    async def leave(self, message_key: str) -> None:
        """Handled without crashing (whatever the outcome): forget it."""
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM in_hand WHERE pipeline = %s AND message_key = %s",
                               (self.pipeline, message_key))
