"""The whole edgert exception tree, split by whose fault it is.

Each class carries the one HTTP status and the one MQTT error code it maps to,
so every transport converts errors the same way, in one place::

    EdgertError
    ├── ClientError                 the request is wrong              (4xx)
    │   ├── BadRequestError             400  bad_request
    │   │   ├── PromptTooLongError      400  context_length_exceeded
    │   │   └── EvalSetError            400  eval_set_invalid (an evaluation set file, with its line)
    │   ├── ModelNotFoundError          404  model_not_found
    │   ├── PayloadTooLargeError        413  payload_too_large
    │   ├── RequestTimeoutError         408  request_timeout
    │   ├── UnauthorizedError           401  invalid_api_key
    │   ├── ForbiddenError              403  forbidden
    │   ├── UnsupportedMediaTypeError   415  unsupported_media_type
    │   └── ClientDisconnectedError     499  client_closed_request (nobody reads it; counted in metrics)
    ├── OverloadedError             no room right now, retry later    (503, Retry-After)
    ├── DeadlineExceededError       the request ran out of time       (504)
    ├── ModelError                  the model file or its load failed (500)
    │   ├── ModelFileError              corrupt / truncated / unsupported GGUF
    │   ├── ModelLoadError              llama.cpp refused to load it
    │   ├── ModelMissingError           catalog entry not present on disk
    │   └── MemoryBudgetError           it does not fit memory_budget whatever the planner changes
    ├── EngineError                 a decode step failed              (500)
    ├── DownloadError               fetching a model failed           (502)
    │   ├── IntegrityError              bytes do not match the expected hash / size
    │   ├── DownloadTooSlowError        past its deadline (signed length / minimum throughput)
    │   └── DownloadCancelledError      stopped between reads: edgert is stopping (503)
    ├── InsufficientStorageError    not enough disk for a download    (507)
    ├── ConfigError                 settings or catalog are invalid   (500)
    │   └── SocketInUseError            a live daemon already serves on the socket path
    ├── UpdateError                 the device update path failed     (500)
    │   ├── UpdateBusyError             another update holds the lock (409)
    │   ├── UpdateStateError            the update state file is unreadable or too new (500)
    │   │   └── UpdatesDisabledError        a check was asked for while updates are off for that (409)
    │   ├── IllegalTransitionError      a step asked for a phase change the state machine forbids (500: a bug)
    │   ├── RegistryUnavailableError    the registry host cannot be reached (502)
    │   ├── UntrustedMetadataError      signed metadata failed TUF verification (502)
    │   │   └── PublisherSignatureError     no publisher (model-signing) bundle, or it does not verify
    │   ├── TargetNotFoundError         the signed metadata does not list it (404)
    │   ├── HookVetoError               a firmware hook refused or timed out (409)
    │   │   └── HookUnsafeError             a hook (or its directory) others could have planted
    │   └── HealthCheckError            the new model failed its health check (500)
    │       └── EvaluationFailedError       its signed evaluation set scored below the release's threshold
    ├── RegistryError               the operator's TUF repository is unusable (500)
    │   └── RegistryUploadError         uploading the site to a Hugging Face Hub repo failed
    └── RolloutError                a fleet rollout cannot start or go on (409): another release's is unfinished,
                                    its state file is unreadable, bad waves

Only adapter modules see third-party exceptions; they raise these instead.

Every error class lives here, so each is found in one place. The exceptions a module raises and
catches itself, that never leave it (``_RejectedError`` and ``_DroppedError`` in transport/mqtt.py
carry a refusal to the reply path; parsers' ``_DefectError``, ``_TemplateError``,
``_RangeNotSatisfiableError``), are control flow, not errors: they stay private where they are used.
"""

from __future__ import annotations

from typing import ClassVar


class EdgertError(Exception):
    """Base of every error edgert raises on purpose."""

    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    #: OpenAI error "type" field.
    kind: ClassVar[str] = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: the request field at fault, when there is one (OpenAI's "param").
        self.param = param

    def to_dict(self) -> dict[str, object]:
        """OpenAI's error object; also the MQTT error reply body."""
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}


class ClientError(EdgertError):
    http_status = 400
    code = "bad_request"
    kind = "invalid_request_error"


class BadRequestError(ClientError):
    pass


class PromptTooLongError(BadRequestError):
    code = "context_length_exceeded"


class EvalSetError(BadRequestError):
    """An evaluation set (JSONL) is unreadable or invalid; the message names the file and the line."""

    code = "eval_set_invalid"


class ModelNotFoundError(ClientError):
    http_status = 404
    code = "model_not_found"


class PayloadTooLargeError(ClientError):
    http_status = 413
    code = "payload_too_large"


class RequestTimeoutError(ClientError):
    """The request body did not arrive within serve.body_timeout_s."""

    http_status = 408
    code = "request_timeout"


class UnauthorizedError(ClientError):
    """A TCP request without the configured bearer token (serve.tcp_auth_token)."""

    http_status = 401
    code = "invalid_api_key"


class ForbiddenError(ClientError):
    """The caller may use the socket, but not for this: e.g. installing or rolling back a model as a kiosk app."""

    http_status = 403
    code = "forbidden"
    kind = "permission_error"


class UnsupportedMediaTypeError(ClientError):
    """A POST over TCP whose Content-Type is not application/json (what a cross-site form can send)."""

    http_status = 415
    code = "unsupported_media_type"


class ClientDisconnectedError(ClientError):
    """The client went away before its answer: the generation is cancelled; 499 as nginx counts it."""

    http_status = 499
    code = "client_closed_request"


class OverloadedError(EdgertError):
    http_status = 503
    code = "overloaded"
    kind = "overloaded_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, object]:
        body = super().to_dict()
        body["retry_after"] = self.retry_after_s
        return body


class DeadlineExceededError(EdgertError):
    http_status = 504
    code = "deadline_exceeded"
    kind = "timeout_error"


class ModelError(EdgertError):
    code = "model_error"


class ModelFileError(ModelError):
    """A model file is corrupt, truncated or of an unsupported kind."""

    code = "model_file_invalid"


class ModelLoadError(ModelError):
    code = "model_load_failed"


class ModelMissingError(ModelError):
    code = "model_not_installed"


class MemoryBudgetError(ModelError):
    """The model does not fit ``memory_budget`` even after every change the memory planner may make."""

    code = "memory_budget_exceeded"


class EngineError(EdgertError):
    code = "engine_error"


class DownloadError(EdgertError):
    http_status = 502
    code = "download_failed"


class IntegrityError(DownloadError):
    code = "integrity_check_failed"


class DownloadTooSlowError(DownloadError):
    """A download ran past its deadline (update.download_min_bytes_per_s); its ``.part`` is kept for a resume."""

    code = "download_too_slow"


class DownloadCancelledError(DownloadError):
    """A download stopped between reads because edgert is stopping; its ``.part`` is kept for a resume."""

    http_status = 503
    code = "download_cancelled"


class InsufficientStorageError(EdgertError):
    http_status = 507
    code = "insufficient_storage"


class ConfigError(EdgertError):
    code = "config_invalid"


class SocketInUseError(ConfigError):
    """Another live edgert daemon already serves on the configured socket path."""

    code = "socket_in_use"


class UpdateError(EdgertError):
    """The device update path (check, download, stage, activate, commit) could not finish."""

    code = "update_failed"
    #: Failure class counted in ``edgert_update_failures_total{reason=...}`` and named in ``last_error``
    #: (one of :class:`edgert.update.failures.FailureReason`); the raising adapter may be more precise.
    reason: str = "update"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class UpdateBusyError(UpdateError):
    """Another process holds the update lock; only one update runs at a time."""

    http_status = 409
    code = "update_in_progress"
    reason = "busy"


class UpdateStateError(UpdateError):
    """The update state file is unreadable, or was written by a newer edgert: updates stay off."""

    code = "update_state_invalid"
    reason = "state"


class UpdatesDisabledError(UpdateStateError):
    """An update check was asked for while updates are off (the state file is unusable)."""

    http_status = 409
    code = "updates_disabled"


class IllegalTransitionError(UpdateError):
    """An update step tried a phase change that :data:`edgert.update.state.TRANSITIONS` forbids (a bug)."""

    code = "illegal_transition"


class RegistryUnavailableError(UpdateError):
    """The registry host could not be reached or answered with an HTTP error."""

    http_status = 502
    code = "registry_unavailable"
    reason = "unreachable"


class UntrustedMetadataError(UpdateError):
    """Signed metadata failed verification: bad signature, expired, rolled back or inconsistent."""

    http_status = 502
    code = "metadata_untrusted"
    reason = "metadata"


class PublisherSignatureError(UntrustedMetadataError):
    """The release has no publisher bundle, or its bundle does not verify with the configured key."""


class TargetNotFoundError(UpdateError):
    """A model version or target path that the signed metadata does not list."""

    http_status = 404
    code = "target_not_found"
    reason = "target_not_found"


class HookVetoError(UpdateError):
    """A firmware hook exited non-zero or timed out where that stops the update."""

    http_status = 409
    code = "hook_veto"
    reason = "hook"


class HookUnsafeError(HookVetoError):
    """A hook or the hooks directory is not owned by root or edgert's user, or others may write it."""

    code = "hook_unsafe"


class HealthCheckError(UpdateError):
    """The new model did not load, or did not answer its probe generation in time."""

    code = "health_check_failed"
    reason = "health_check"


class EvaluationFailedError(HealthCheckError):
    """The candidate loaded and answered, but its release's evaluation set scored below the signed threshold."""

    code = "evaluation_failed"


class RegistryError(EdgertError):
    """The operator's TUF repository (keys, metadata, targets) is missing or inconsistent."""

    code = "repository_invalid"


class RegistryUploadError(RegistryError):
    """Uploading the published site to a Hugging Face Hub repo failed (auth, network, the Hub's answer)."""

    code = "registry_upload_failed"


class RolloutError(EdgertError):
    """``edgert fleet rollout`` cannot start or go on: another release's rollout on the channel is unfinished,
    the controller's state file is unreadable, or the waves asked for make no rollout."""

    http_status = 409
    code = "rollout_conflict"
