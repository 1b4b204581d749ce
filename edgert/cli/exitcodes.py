"""Exit codes every ``edgert`` command uses, so scripts can rely on them.

| code | meaning                                                           |
|------|-------------------------------------------------------------------|
| 0    | success                                                           |
| 1    | failure: the command could not do its job (see the error line)    |
| 2    | usage: bad arguments or options (typer/click's own code)           |
| 3    | the model is unknown, or known but not installed                  |
| 4    | the model file is corrupt, truncated or of an unsupported kind    |
| 5    | the engine is busy or shutting down (retry later)                 |
| 6    | bad configuration (settings file, EDGERT_* variables, catalog)     |
| 7    | the MQTT broker cannot be reached (or refused us)                 |
| 8    | nothing to show: no device seen on the broker, or no data for it  |
| 9    | fleet rollout halted: the channel is back on the previous release |
| 10   | fleet rollout stalled: no device of a wave reported; run it again |
| 11   | `edgert eval`: the evaluation set scored below its threshold       |
| 130  | interrupted (Ctrl-C)                                              |
"""

from __future__ import annotations

from edgert.errors import (
    ConfigError,
    EdgertError,
    ModelFileError,
    ModelMissingError,
    ModelNotFoundError,
    OverloadedError,
)

OK = 0
FAILURE = 1
USAGE = 2
MODEL_NOT_FOUND = 3
MODEL_INVALID = 4
BUSY = 5
CONFIG = 6
UNREACHABLE = 7
NOTHING_SEEN = 8
HALTED = 9
STALLED = 10
EVAL_BELOW_THRESHOLD = 11
INTERRUPTED = 130


def for_error(error: EdgertError) -> int:
    """The exit code for an error that ends a command."""
    if isinstance(error, ModelNotFoundError | ModelMissingError):
        return MODEL_NOT_FOUND
    if isinstance(error, ModelFileError):
        return MODEL_INVALID
    if isinstance(error, OverloadedError):
        return BUSY
    if isinstance(error, ConfigError):
        return CONFIG
    return FAILURE
