"""A real mosquitto broker for tests: generated config, free loopback port, optional TLS + passwords.

The broker runs as a subprocess (``mosquitto -c <conf>``) with persistence on, so a
``restart()`` keeps sessions, subscriptions and queued QoS 1 messages the way a
production broker does. ``users`` (more identities in the password file) and
``acl_file`` (e.g. packaging/mosquitto/edgert.acl) give the access control of a
production broker. TLS material (a CA, a server certificate for 127.0.0.1 and a
client certificate) is generated here with ``cryptography``; passwords go through
``mosquitto_passwd -b``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgert.settings import MqttSettings


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls(directory: Path) -> TlsFiles:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_cert = _cert("edgert test CA", ca_key, None, ca=True)
    server_key, client_key = _key(), _key()
    san: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server_cert = _cert("127.0.0.1", server_key, ("edgert test CA", ca_key), san=san)
    client_cert = _cert("edgert-device", client_key, ("edgert test CA", ca_key))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "server.pem").write_bytes(server_cert.public_bytes(pem))
    (directory / "client.pem").write_bytes(client_cert.public_bytes(pem))
    return TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=_write_key(server_key, directory / "server.key"),
        client_cert=directory / "client.pem",
        client_key=_write_key(client_key, directory / "client.key"),
    )


@dataclass
class Broker:
    workdir: Path
    port: int = field(default_factory=free_port)
    tls: TlsFiles | None = None
    username: str | None = None
    password: str | None = None
    #: further identities (user -> password) in the password file
    users: dict[str, str] = field(default_factory=dict)
    acl_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def retained(self, topic: str) -> dict[str, object]:
        """The first JSON message on ``topic`` (its retained one when there is one), read with mosquitto_sub."""
        out = subprocess.run(
            ["mosquitto_sub", "-p", str(self.port), "-t", topic, "-C", "1", "-W", "30"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return dict(json.loads(out))

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            # mosquitto started as root would switch to the 'mosquitto' user, who cannot read tmp_path
            "user root",
            "persistence true",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_queued_messages 100000",
            # mosquitto leaves Nagle on by default: every small reply would wait for a delayed ACK
            "set_tcp_nodelay true",
        ]
        identities = dict(self.users)
        if self.username is not None:
            identities[self.username] = self.password or ""
        if identities:
            password_file = self.workdir / "passwords"
            password_file.write_text("")
            for user, password in identities.items():
                subprocess.run(["mosquitto_passwd", "-b", str(password_file), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "require_certificate true",
            ]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> Broker:
        assert shutil.which("mosquitto"), "mosquitto is not installed: run `make system-deps`"
        conf = self.write_config()
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"mosquitto exited with {self.proc.returncode}: {stderr}\n{self.log()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise AssertionError(f"mosquitto did not listen on {self.port}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM saves the persistence file (sessions, queued messages); SIGKILL loses what was not saved."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    # ----------------------------------------------------------- how clients reach it
    def daemon_settings(self, **extra: str) -> dict[str, str]:
        """``start_daemon`` keyword settings (EDGERT_MQTT__*) for a daemon on this broker."""
        values = {"mqtt__broker": "127.0.0.1", "mqtt__port": str(self.port)}
        if self.username is not None:
            values.update(mqtt__username=self.username, mqtt__password=self.password or "")
        if self.tls is not None:
            values.update(
                mqtt__ca_file=str(self.tls.ca),
                mqtt__cert_file=str(self.tls.client_cert),
                mqtt__key_file=str(self.tls.client_key),
            )
        values.update(extra)
        return values

    def client_settings(self, **extra: object) -> MqttSettings:
        values: dict[str, object] = {"broker": "127.0.0.1", "port": self.port, "reconnect_min_s": 0.2}
        if self.username is not None:
            values.update(username=self.username, password=self.password)
        if self.tls is not None:
            values.update(ca_file=self.tls.ca, cert_file=self.tls.client_cert, key_file=self.tls.client_key)
        values.update(extra)
        return MqttSettings.model_validate(values)

    def cli_args(self) -> list[str]:
        """Connection arguments for mosquitto_pub / mosquitto_sub."""
        args = ["-h", "127.0.0.1", "-p", str(self.port)]
        if self.username is not None:
            args += ["-u", self.username, "-P", self.password or ""]
        if self.tls is not None:
            args += [
                "--cafile",
                str(self.tls.ca),
                "--cert",
                str(self.tls.client_cert),
                "--key",
                str(self.tls.client_key),
            ]
        return args
