"""``edgert serve`` with a multimodal projector: which one it loads, and where the daemon says what it accepts.

Real daemon subprocesses on the committed tiny Gemma 4 model and its tiny projector (vision + audio);
``/v1/models`` cards, the ``edgert_model_info`` metric and the retained MQTT status (real mosquitto)
report the modalities the loaded model accepts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from edgert.catalog import load_catalog
from tests.integration.daemon import DaemonProcess, start_daemon
from tests.integration.mosquitto import Broker

FIXTURES = Path(__file__).parents[1] / "fixtures"
TINY_MMPROJ = FIXTURES / "tiny-gemma4-mmproj.gguf"
MEDIA = ["text", "image", "audio"]


def accepts(daemon: DaemonProcess) -> tuple[list[str], list[str], str]:
    """The modalities of ``/v1/models``, of ``/v1/models/default`` and of the ``edgert_model_info`` metric."""
    with daemon.client() as client:
        listed = client.get("/v1/models").json()["data"][0]["modalities"]
        one = client.get("/v1/models/default").json()["modalities"]
        metrics = client.get("/metrics").text
    (info,) = (
        sample.labels["modalities"]
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "edgert_model_info"
    )
    return listed, one, info


def stopped(daemon: DaemonProcess) -> None:
    assert daemon.stop() == 0, daemon.log()


def test_serve_mmproj_loads_the_projector_and_every_surface_says_image_and_audio(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    daemon = start_daemon(tmp_path, tiny_gguf, extra_args=("--mmproj", str(TINY_MMPROJ)))
    try:
        assert accepts(daemon) == (MEDIA, MEDIA, "text,image,audio")
    finally:
        stopped(daemon)


def test_without_a_projector_the_model_is_text_only(tmp_path: Path, tiny_gguf: Path) -> None:
    daemon = start_daemon(tmp_path, tiny_gguf)
    try:
        assert accepts(daemon) == (["text"], ["text"], "text")
    finally:
        stopped(daemon)


def test_no_mmproj_overrides_a_configured_projector(tmp_path: Path, tiny_gguf: Path) -> None:
    daemon = start_daemon(tmp_path, tiny_gguf, extra_args=("--no-mmproj",), engine__mmproj=str(TINY_MMPROJ))
    try:
        assert accepts(daemon) == (["text"], ["text"], "text")
    finally:
        stopped(daemon)


def test_a_projector_for_another_model_is_refused_before_loading(tmp_path: Path, tiny_gguf: Path) -> None:
    # the language model given where the projector belongs: a clear refusal, exit 1, nothing served
    daemon = start_daemon(tmp_path, tiny_gguf, extra_args=("--mmproj", str(tiny_gguf)), wait_ready=False)
    assert daemon.proc.wait(120) == 1, daemon.log()
    assert "not a multimodal projector" in daemon.log()
    assert "unsupported architecture 'gemma4'" in daemon.log()


def test_mmproj_and_no_mmproj_together_are_a_usage_error(tmp_path: Path, tiny_gguf: Path) -> None:
    args = ("--mmproj", str(TINY_MMPROJ), "--no-mmproj")
    daemon = start_daemon(tmp_path, tiny_gguf, extra_args=args, wait_ready=False)
    assert daemon.proc.wait(60) == 2, daemon.log()
    assert "--mmproj and --no-mmproj contradict each other" in daemon.log()


def test_an_installed_catalog_projector_is_served_and_reported_over_mqtt(tmp_path: Path, broker: Broker) -> None:
    """A catalog id: the daemon finds the variant's installed projector itself; MQTT's status says so."""
    spec = load_catalog().get("gemma-4-e2b-it:q4_k_m")
    models = tmp_path / "state" / "models"
    models.mkdir(parents=True)
    # the tiny pair stands in for the real files under the catalog's names (both are the same kind of pair)
    shutil.copyfile(FIXTURES / "tiny-gemma4.gguf", models / spec.filename)
    shutil.copyfile(TINY_MMPROJ, models / "gemma-4-e2b-it.mmproj.gguf")
    device = "seer-1"
    daemon = start_daemon(tmp_path, spec.id, **broker.daemon_settings(mqtt__device_id=device))
    try:
        assert accepts(daemon) == (MEDIA, MEDIA, "text,image,audio")
        status = _retained_status(broker, device)
        assert status["model"]["modalities"] == MEDIA
        assert status["model"]["id"] == spec.id
    finally:
        stopped(daemon)


def _retained_status(broker: Broker, device: str) -> dict[str, dict[str, object]]:
    # the retained status arrives once the device is online; -C 1 takes the first "online" one
    status = broker.retained(f"edgert/v1/{device}/status")
    assert status["state"] == "online", status
    return dict(status)
