"""The gateway's routers, one per area."""
