"""The AMQP side: topology, validation, micro-batching, the inbox hand-off, submission,
dead-lettering and re-driving, publishing, and the broker's users (rabbitmq_definitions)."""
