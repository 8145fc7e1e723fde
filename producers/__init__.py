"""The producer side: clients that enqueue requests and read results."""

from producers.client import FleetClient, TaskHandle

__all__ = ["FleetClient", "TaskHandle"]
