"""This device's identity: the one fallback both the update path (rollout buckets) and MQTT (topics) use.

An operator's ``mqtt.device_id`` / ``update.device_id`` wins; else the systemd machine id (stable
across host renames and re-imaging of the host name); else the host name. Whatever the source,
the result is made topic-safe, so the id in a deploy report is the id in its topic.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Final

MACHINE_ID: Final = Path("/etc/machine-id")


def resolve_device_id(*configured: str | None) -> str:
    """The first configured id, else ``/etc/machine-id``, else the host name; made topic-safe."""
    chosen = next((value for value in configured if value), None) or _machine_id(MACHINE_ID) or socket.gethostname()
    return topic_safe(chosen)


def topic_safe(value: str) -> str:
    """No MQTT wildcard, level separator or whitespace: one topic level."""
    return "".join("_" if ch in "/+#" or ch.isspace() else ch for ch in value) or "edgert"


def _machine_id(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None
