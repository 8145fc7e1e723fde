"""Route dependencies: who is calling (JWT), may they, are they within their rate, do they own the task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Request

from producers.auth import Principal, Role, verify
from producers.gateway.state import GatewayState, gateway_state
from shared.config import Settings
from shared.errors import ErrorCode, FleetError
from shared.schemas import Priority

OWNER_KEY = "autoglm:owner:{}"
State = Annotated[GatewayState, Depends(gateway_state)]


def principal(request: Request, state: State, authorization: Annotated[str | None, Header()] = None) -> Principal:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise FleetError(ErrorCode.UNAUTHENTICATED)
    who = verify(authorization.split(" ", 1)[1].strip(), state.settings.gateway)
    request.state.principal = who  # for the audit line
    return who


def require(*roles: Role) -> Callable[[Principal], Principal]:
    def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if who.role not in roles:
            raise FleetError(ErrorCode.PERMISSION_DENIED, f"role {who.role} may not call this; needs {'/'.join(roles)}")
        return who
    return check


User = Annotated[Principal, Depends(require(Role.USER, Role.ADMIN))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]


async def within_rate(state: GatewayState, who: Principal, priority: Priority) -> None:
    """Take one token from the tenant's bucket for this priority, or RATE_LIMITED (429 + Retry-After)."""
    wait = await state.limiter.take(who.tenant, str(priority), state.settings.gateway.rate_limits[priority])
    if wait is not None:
        error = FleetError(ErrorCode.RATE_LIMITED, f"tenant {who.tenant} is over its {priority} rate; retry in {wait}s")
        error.retry_after = wait  # type: ignore[attr-defined]
        raise error


def visible_models(settings: Settings, tenant: str, role: Role = Role.USER) -> list[str]:
    """The models a tenant may see and use (``gateway.tenant_models``; unlisted tenants and admins: all)."""
    allowed = settings.gateway.tenant_models.get(tenant)
    return settings.model_names if allowed is None or role == Role.ADMIN else [m for m in settings.model_names if m in allowed]


def check_model(settings: Settings, tenant: str, model: str | None, task_type: str, role: Role = Role.USER) -> None:
    """NOT_FOUND for a model this tenant may not use (as for a model that does not exist to it)."""
    try:
        name = settings.model_for(task_type, model)
    except KeyError:
        return  # no model serves the task type: the client refuses it with INVALID_INPUT
    if name in settings.model_names and name not in visible_models(settings, tenant, role):
        raise FleetError(ErrorCode.NOT_FOUND, f"model {name!r} is not available to tenant {tenant}; "
                         f"its models: {visible_models(settings, tenant, role)}")


async def remember_owner(state: GatewayState, task_id: str, who: Principal) -> None:
    await state.redis.set(OWNER_KEY.format(task_id), who.tenant, ex=state.settings.broker.result_expires_s)


async def owned(state: GatewayState, task_id: str, who: Principal) -> None:
    owner = await state.redis.get(OWNER_KEY.format(task_id))
    if owner is None or (who.role != Role.ADMIN and owner.decode() != who.tenant):
        raise FleetError(ErrorCode.NOT_FOUND, f"no task {task_id} for tenant {who.tenant}")
