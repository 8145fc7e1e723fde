"""Cross-cutting concerns of a task, one file each (dramatiq's middleware, arq's explicit ctx).

A task (workers/consumer/tasks.py) builds a :class:`Job` and runs the chain around its one job, answering
a request; every middleware sees the worker context and the job at fixed points:

- ``before_delivery``: the message arrived, nothing parsed yet (redelivery ledger);
- ``before_run``: the request is parsed and its model chosen (deadline, result cache);
  either hook may answer the task without running it (return a result);
- ``after_success`` / ``after_failure``: every outcome passes through all of them, in reverse order.
"""

from workers.consumer.middleware.cache import ResultCaching
from workers.consumer.middleware.dead_letters import DeadLettering
from workers.consumer.middleware.deadline import Deadlines
from workers.consumer.middleware.job import Job, Middleware
from workers.consumer.middleware.observability import Telemetry
from workers.consumer.middleware.redelivery import Redelivery
from workers.consumer.middleware.webhooks import Webhooks


def default_chain() -> list[Middleware]:
    """Outermost first: telemetry sees every outcome, the ledger records after the others, and a
    webhook goes out once the answer is recorded."""
    return [Telemetry(), Webhooks(), DeadLettering(), Redelivery(), Deadlines(), ResultCaching()]


__all__ = [
    "DeadLettering",
    "Deadlines",
    "Job",
    "Middleware",
    "Redelivery",
    "ResultCaching",
    "Telemetry",
    "Webhooks",
    "default_chain",
]
