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
CONTROL = "control"
State = Annotated[GatewayState, Depends(gateway_state)]


def principal(request: Request, state: State, authorization: Annotated[str | None, Header()] = None) -> Principal:
    known = getattr(request.state, "principal", None)
    if known is not None:  # verified before the body was read (gateway/limits.py)
        return known
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


async def within_rate(state: GatewayState, who: Principal, priority: Priority | str, cost: int = 1) -> None:
    """Take ``cost`` tokens from the tenant's bucket for this priority (or ``"control"``: every call
    that submits nothing), or RATE_LIMITED (429 + Retry-After)."""
    config = state.settings.gateway
    limit = config.control_rate if priority == CONTROL else config.rate_limits[Priority(priority)]
    wait = await state.limiter.take(who.tenant, str(priority), limit, cost)
    if wait is not None:
        error = FleetError(ErrorCode.RATE_LIMITED, f"tenant {who.tenant} is over its {priority} rate; retry in {wait}s")
        error.retry_after = wait  # type: ignore[attr-defined]
        raise error


async def _controlled(state: State, who: User) -> Principal:
    await within_rate(state, who, CONTROL)
    return who


# Routes that submit nothing still cost Redis round trips (and a cancel is broadcast to every worker):
# they take from the tenant's control bucket (gateway.control_rate).
Controlled = Annotated[Principal, Depends(_controlled)]


def visible_models(settings: Settings, tenant: str, role: Role = Role.USER) -> list[str]:
    """The models a tenant may see and use (``gateway.tenant_models``; unlisted tenants and admins: all)."""
    allowed = settings.gateway.tenant_models.get(tenant)
    return settings.model_names if allowed is None or role == Role.ADMIN else [m for m in settings.model_names if m in allowed]


def check_model(settings: Settings, tenant: str, model: str | None, task_type: str, role: Role = Role.USER) -> None:
    """INVALID_INPUT for a model the config does not have, NOT_FOUND for one this tenant may not use
    (as for a model that does not exist to it); either names only the models the tenant may see."""
    visible = visible_models(settings, tenant, role)
    if model is not None and model not in settings.model_names:
        raise FleetError(ErrorCode.INVALID_INPUT, f"model: unknown model {model!r}; models available to tenant "
                         f"{tenant}: {visible}")
    try:
        name = settings.model_for(task_type, model)
    except KeyError:
        return  # no model serves the task type: the client refuses it with INVALID_INPUT
    if name in settings.model_names and name not in visible:
        raise FleetError(ErrorCode.NOT_FOUND, f"model {name!r} is not available to tenant {tenant}; "
                         f"its models: {visible}")


async def remember_owner(state: GatewayState, task_id: str, who: Principal) -> None:
    await state.redis.set(OWNER_KEY.format(task_id), who.tenant, ex=state.settings.broker.result_expires_s)


async def owned(state: GatewayState, task_id: str, who: Principal) -> None:
    owner = await state.redis.get(OWNER_KEY.format(task_id))
    if owner is None or (who.role != Role.ADMIN and owner.decode() != who.tenant):
        raise FleetError(ErrorCode.NOT_FOUND, f"no task {task_id} for tenant {who.tenant}")
