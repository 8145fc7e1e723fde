"""The worker side: Celery app, tasks, micro-batcher and inference engine."""
