"""What every transport does the same way, in one place: readiness, bad-body conversion, usage.

The socket API (:mod:`.http`) and MQTT (:mod:`.mqtt`) each translate their wire format, but the
answers that do not depend on the wire come from here, so the two cannot drift apart again (an
invalid body was a 422 over HTTP and a 400 over MQTT until issue 14):

- :func:`serving` -- the service when it may take a request, else :class:`OverloadedError`
  (still loading, or shutting down), with the same ``retry_after`` on both transports;
- :func:`invalid_body` -- a pydantic :class:`ValidationError` as a 400 ``bad_request`` naming the
  field (OpenAI answers a bad body with 400 ``invalid_request_error``);
- :func:`usage` -- OpenAI's usage object from a finished generation.

:class:`ApiState` is what the daemon shares with the socket API's routes; MQTT needs only its
:class:`ServingState` part.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from edgert.api.schemas import PromptTokensDetails, Usage
from edgert.errors import BadRequestError, OverloadedError
from edgert.serving.metrics import Metrics
from edgert.serving.scheduler import Finished
from edgert.serving.service import InferenceService


class ServingState(Protocol):
    """What the daemon shares with every transport (``transport.http.ApiState`` fits)."""

    metrics: Metrics
    service: InferenceService | None
    stopping: bool
    started: float


@dataclass
class ApiState:
    """What the routes need; the daemon fills ``service`` once the model is loaded."""

    metrics: Metrics
    max_body_bytes: int
    max_json_depth: int = 64
    body_timeout_s: float = 30.0
    service: InferenceService | None = None
    stopping: bool = False
    #: wired by the daemon when a registry is configured
    on_update_check: Callable[[], None] | None = None
    update_status: Callable[[], dict[str, Any]] | None = None
    #: runs `edgert update check|apply|rollback` as a round of the daemon's update loop (action, pinned version)
    update_run: Callable[[str, str | None], Awaitable[dict[str, Any]]] | None = None
    started: float = field(default_factory=time.monotonic)


def not_ready(state: ServingState) -> Literal["stopping", "loading"] | None:
    """Why no request may start now (``/ready``'s status), or None when one may."""
    if state.stopping:
        return "stopping"
    if state.service is None or not state.service.ready:
        return "loading"
    return None


def serving(state: ServingState) -> InferenceService:
    """The service that takes a request now; OverloadedError (a retry hint) while there is none."""
    reason = not_ready(state)
    if reason == "stopping":
        raise OverloadedError("the daemon is shutting down", retry_after_s=5)
    if reason == "loading" or state.service is None:
        raise OverloadedError("the model is still loading", retry_after_s=2)
    return state.service


def invalid_body(exc: ValidationError) -> BadRequestError:
    """The first schema violation, naming its field (``param``) and how many more there are."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return BadRequestError(f"{where}: {first['msg']}{more}", param=where)


def usage(result: Finished) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=result.cached_tokens, image_tokens=result.image_tokens, audio_tokens=result.audio_tokens
        ),
    )
