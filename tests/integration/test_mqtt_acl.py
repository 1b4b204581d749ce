"""The shipped mosquitto ACL (packaging/mosquitto/edgert.acl) on a real mosquitto with a password file.

Issue 13, finding 1: a device publishes with its own credentials, so the broker must confine each
identity to its own topics. mosquitto's acl_file grants every SUBACK and filters at delivery, so
"cannot read" is checked by what arrives, and "cannot write" by the MQTT 5 PUBACK reason code.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgert.api.mqtt_schemas import ReplyFinal, Topics
from edgert.transport.mqtt_client import MqttRequester
from tests.integration.daemon import start_daemon
from tests.integration.mosquitto import Broker
from tests.integration.test_mqtt import chat, wait_online

ACL = Path(__file__).parents[2] / "packaging" / "mosquitto" / "edgert.acl"
USERS = {"dev-1": "pw-dev-1", "dev-2": "pw-dev-2", "operator": "pw-operator", "technician": "pw-technician"}
DEV_1, DEV_2 = Topics("dev-1"), Topics("dev-2")


class Identity:
    """One MQTT 5 connection as one user: what it receives, and the broker's verdict on what it publishes."""

    def __init__(self, broker: Broker, user: str, client_id: str) -> None:
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acks: dict[int, ReasonCode] = {}
        self._acked = threading.Condition()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self._client.username_pw_set(user, USERS[user])
        self._client.on_message = lambda _c, _u, msg: self.received.put((msg.topic, bytes(msg.payload)))
        self._client.on_publish = self._on_ack
        self._client.on_subscribe = lambda _c, _u, mid, codes, _p: self._on_ack(_c, _u, mid, codes[0], _p)
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()

    def _on_ack(self, _c: object, _u: object, mid: int, reason: ReasonCode, _p: Properties | None) -> None:
        with self._acked:
            self._acks[mid] = reason
            self._acked.notify_all()

    def _verdict(self, mid: int) -> ReasonCode:
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self._acks, timeout=10), "no acknowledgement"
            return self._acks[mid]

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            _, mid = self._client.subscribe(topic, qos=1)
            assert not self._verdict(mid).is_failure

    def publish(self, topic: str, payload: bytes = b"{}") -> bool:
        """True when the broker accepted the message (PUBACK success), False when it was not authorised."""
        return not self._verdict(self._client.publish(topic, payload, qos=1).mid).is_failure

    def next_message(self, timeout: float = 10) -> tuple[str, bytes]:
        return self.received.get(timeout=timeout)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("acl-broker"), users=dict(USERS), acl_file=ACL).start()
    yield broker
    broker.stop()


@pytest.fixture
def identities(acl_broker: Broker) -> Iterator[dict[str, Identity]]:
    opened = {
        "dev-1": Identity(acl_broker, "dev-1", "edgert-dev-1"),
        "dev-2": Identity(acl_broker, "dev-2", "edgert-dev-2"),
        "operator": Identity(acl_broker, "operator", "ops-console"),
        "technician": Identity(acl_broker, "technician", "tech-1"),
    }
    yield opened
    for identity in opened.values():
        identity.close()


def test_a_device_identity_cannot_reach_another_devices_topics(identities: dict[str, Identity]) -> None:
    dev1, dev2, operator, tech = (identities[name] for name in ("dev-1", "dev-2", "operator", "technician"))
    dev1.subscribe(DEV_1.req, DEV_1.cmd)
    dev2.subscribe("#", DEV_1.req, DEV_1.cmd, DEV_2.req)  # asks for everything; must get only its own

    # Writes: the broker refuses (MQTT 5 PUBACK "Not authorized") every topic of another device,
    # the device's own cmd (operators own it) and its own request topic.
    for topic in (DEV_1.cmd, DEV_1.req, DEV_1.status, DEV_1.deploy, "edgert/v1/dev-1/reply/tech-1", DEV_2.cmd):
        assert not dev2.publish(topic), f"dev-2 may not publish to {topic}"
    assert not dev2.publish("$SYS/broker/edgert"), "no identity writes $SYS"
    assert dev2.publish(DEV_2.status)
    assert dev2.publish("edgert/v1/dev-2/reply/tech-1")
    # A requester asks but does not command; the operator commands.
    assert not tech.publish(DEV_1.cmd, b'{"action": "update_check"}')
    assert tech.publish(DEV_1.req, b'{"id": "from-tech"}')
    assert operator.publish(DEV_1.cmd, b'{"action": "update_check"}')

    # Reads: dev-1 got the technician's request and the operator's command, nothing of dev-2's.
    assert dev1.next_message() == (DEV_1.req, b'{"id": "from-tech"}')
    assert dev1.next_message() == (DEV_1.cmd, b'{"action": "update_check"}')
    # A marker dev-2 may read, published after both: everything delivered to dev-2 before it
    # (in order, on its one connection) would have been dev-1's traffic.
    assert tech.publish(DEV_2.req, b"marker")
    assert dev2.next_message() == (DEV_2.req, b"marker")
    # ('#' overlaps DEV_2.req: mosquitto delivers one copy per matching subscription)
    assert [dev2.received.get_nowait() for _ in range(dev2.received.qsize())] in ([], [(DEV_2.req, b"marker")])
    assert dev1.received.empty()


def test_replies_reach_only_the_requester_they_are_addressed_to(identities: dict[str, Identity]) -> None:
    dev2, tech, operator = identities["dev-2"], identities["technician"], identities["operator"]
    tech.subscribe("edgert/v1/+/reply/tech-1", "edgert/v1/+/reply/ops-console")
    operator.subscribe("edgert/v1/+/reply/ops-console")
    assert dev2.publish("edgert/v1/dev-2/reply/ops-console", b"for the operator")
    assert dev2.publish("edgert/v1/dev-2/reply/tech-1", b"for the technician")
    assert operator.next_message() == ("edgert/v1/dev-2/reply/ops-console", b"for the operator")
    assert tech.next_message() == ("edgert/v1/dev-2/reply/tech-1", b"for the technician")
    assert tech.received.empty()


def test_a_device_serves_a_technician_through_the_acl(acl_broker: Broker, tmp_path: Path, tiny_gguf: Path) -> None:
    device = start_daemon(
        tmp_path,
        tiny_gguf,
        **acl_broker.daemon_settings(
            mqtt__device_id="dev-1",
            mqtt__username="dev-1",
            mqtt__password=USERS["dev-1"],
            mqtt__telemetry_interval_s="0",
        ),
    )
    try:
        operator = acl_broker.client_settings(username="operator", password=USERS["operator"])
        wait_online(acl_broker, "dev-1", settings=operator)
        technician = acl_broker.client_settings(username="technician", password=USERS["technician"])
        with MqttRequester(technician, client_id="tech-1") as requester:
            [final] = requester.ask(DEV_1.req, chat(4))
        assert isinstance(final, ReplyFinal)
        assert final.device_id == "dev-1"
    finally:
        assert device.stop(signal.SIGTERM) == 0, device.log()
    assert " ERROR " not in device.log(), device.log()


def test_the_fleet_block_lets_only_group_members_take_fleet_work(tmp_path: Path) -> None:
    # The shipped file with its commented fleet block enabled for dev-1 (group "vans").
    text = ACL.read_text().replace("# user van-17", "user dev-1")
    text = text.replace("# topic read  edgert/v1/fleet/vans/req", "topic read  edgert/v1/fleet/vans/req")
    acl = tmp_path / "fleet.acl"
    acl.write_text(
        text.replace("# topic write edgert/v1/fleet/vans/reply/#", "topic write edgert/v1/fleet/vans/reply/#")
    )
    assert (
        "\nuser dev-1\ntopic read  edgert/v1/fleet/vans/req\ntopic write edgert/v1/fleet/vans/reply/#"
        in acl.read_text()
    )
    broker = Broker(tmp_path / "broker", users=dict(USERS), acl_file=acl).start()
    try:
        dev1 = Identity(broker, "dev-1", "edgert-dev-1")
        dev2 = Identity(broker, "dev-2", "edgert-dev-2")
        tech = Identity(broker, "technician", "tech-1")
        try:
            dev1.subscribe("$share/vans/edgert/v1/fleet/vans/req")
            tech.subscribe("edgert/v1/fleet/+/reply/tech-1")
            assert tech.publish("edgert/v1/fleet/vans/req", b"work")
            assert dev1.next_message() == ("edgert/v1/fleet/vans/req", b"work")
            assert not dev2.publish("edgert/v1/fleet/vans/reply/tech-1", b"forged")  # not a member
            assert dev1.publish("edgert/v1/fleet/vans/reply/tech-1", b"done")
            assert tech.next_message() == ("edgert/v1/fleet/vans/reply/tech-1", b"done")
        finally:
            for identity in (dev1, dev2, tech):
                identity.close()
    finally:
        broker.stop()
