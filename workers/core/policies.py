"""Error-code policies (config ``policies``) turned into tenacity retry controllers.

One place decides, from the failing exception's code, whether a batch is run again, after how
long, and when to give up; the batcher only asks. Retries live here (engine level) and nowhere
else: Celery tasks do not autoretry, so the two layers never multiply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, wait_exponential_jitter

from shared.config import Policy, Settings
from shared.errors import as_fleet_error

log = logging.getLogger(__name__)
T = TypeVar("T")


class BatchPolicies:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def policy_for(self, exc: BaseException) -> Policy:
        return self.settings.policy(as_fleet_error(exc).code)

    def _stop(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        return exc is None or state.attempt_number >= self.policy_for(exc).attempts

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter; at least the Retry-After a remote server asked for (the
        openai backend keeps it on the error), but never past the policy's backoff_max_s."""
        exc = state.outcome.exception()  # type: ignore[union-attr]
        policy = self.policy_for(exc)  # type: ignore[arg-type]
        backoff = wait_exponential_jitter(multiplier=policy.backoff_initial_s, max=policy.backoff_max_s, jitter=policy.jitter_s)(state)
        asked = getattr(exc, "retry_after", None) or 0.0
        return max(backoff, min(asked, policy.backoff_max_s))

    def call(self, fn: Callable[[], T], history: list[dict[str, Any]]) -> T:
        """Run ``fn`` under the policy of whatever it raises; every failed attempt lands in ``history``."""

        def attempt() -> T:
            try:
                return fn()
            except Exception as exc:
                error = as_fleet_error(exc)
                history.append({"code": str(error.code), "message": error.message, "at": time.time()})
                raise

        retrying = Retrying(
            retry=retry_if_exception(lambda exc: self.policy_for(exc).action == "retry"),
            stop=self._stop,
            wait=self._wait,
            before_sleep=lambda state: log.warning(
                "batch attempt %d failed (%s); retrying", state.attempt_number, state.outcome.exception()  # type: ignore[union-attr]
            ),
            reraise=True,
        )
        return retrying(attempt)
