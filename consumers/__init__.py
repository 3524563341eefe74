"""The AMQP side: topology, validation, micro-batching, the inbox hand-off, submission, DLQ."""
