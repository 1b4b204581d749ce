"""Both transports answer the same request the same way: one device, the socket and MQTT side by side.

A body that breaks the schema was a 422 ``invalid_value`` over the socket and a ``bad_request`` over
MQTT (issue 14). Both now convert through one function (edgert/transport/shared.py): 400,
``invalid_request_error``, ``bad_request``, the field named in ``param`` -- OpenAI's answer to a bad body.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgert.api.mqtt_schemas import ReplyError, Topics
from edgert.transport.mqtt_client import MqttRequester
from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.mosquitto import Broker
from tests.integration.test_mqtt import wait_online

DEVICE = Topics("dev-agree")
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, broker: Broker) -> Iterator[DaemonProcess]:
    settings: dict[str, Any] = broker.daemon_settings(mqtt__device_id="dev-agree")  # Any: start_daemon's **settings
    proc = start_daemon(tmp_path_factory.mktemp("agree"), tiny_gguf, **settings)
    try:
        wait_online(broker, "dev-agree")
    except BaseException:
        proc.stop(signal.SIGKILL)
        raise
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def requester(broker: Broker, device: DaemonProcess) -> Iterator[MqttRequester]:
    with MqttRequester(broker.client_settings()) as client:
        yield client


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature"),
        ({"max_tokens": 3}, "messages"),
    ],
)
def test_a_schema_violation_gets_the_same_error_over_socket_and_mqtt(
    device: DaemonProcess, requester: MqttRequester, body: dict[str, object], param: str
) -> None:
    with device.client() as client:
        response = client.post(CHAT, json=body)
    assert response.status_code == 400, response.text
    over_http = response.json()["error"]

    key = f"agree-{param}-{len(json.dumps(body))}"
    pending = requester.expect(key)
    requester.publish_raw(DEVICE.req, json.dumps({"id": key, **body}).encode(), correlation=key.encode())
    [(_, reply)] = list(pending.replies(20))
    assert isinstance(reply, ReplyError), reply
    over_mqtt = reply.error.model_dump(exclude_none=True)

    expected = {"type": "invalid_request_error", "code": "bad_request", "param": param}
    assert {key: over_http[key] for key in expected} == expected
    assert {key: over_mqtt[key] for key in expected} == expected
    assert over_http["message"] == over_mqtt["message"]
