"""HTTP gateway: the fleet over REST for any language, with JWT auth, per-tenant rate limits and
an audit line per call. OpenAPI schema at /openapi.json, docs at /docs.

    POST   /v1/tasks                 submit (202 + id + status URL)          routes/tasks.py
    GET    /v1/tasks/{id}[?wait=S]   status, result or error (long-poll)     routes/tasks.py
    DELETE /v1/tasks/{id}            cancel                                   routes/tasks.py
    POST   /v1/chat/completions      OpenAI-style synchronous generation      routes/openai.py
    GET    /v1/models                the configured models (OpenAI list)      routes/openai.py
    GET    /v1/admin/queues          queue depths (admin)                     routes/admin.py
    GET    /v1/admin/dlq             dead-lettered requests (admin)           routes/admin.py
    GET    /healthz                  liveness + broker reachability (no auth) routes/health.py

Every non-2xx answer is ``{"error": {"code", "message", "retryable"}}`` (errors.py).
"""

from producers.gateway.app import create_app, serve

__all__ = ["create_app", "serve"]
