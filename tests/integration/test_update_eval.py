"""Evaluation-gated releases through the signed update path: a device commits only what scores its threshold.

The operator attaches an evaluation set (``registry add --eval``, a signed companion target
``eval.jsonl``); the device downloads and verifies it with the release, loads the candidate beside the
serving model, runs the set through the real engine after the probe, and commits or rolls back (and
blocklists) with the score in the reason. Real parts: the registry made with ``edgert.registry``, nginx
serving it, the tiny Gemma 4 model through llama.cpp, and for the fleet view a real daemon and mosquitto.
The tiny model's words are noise, so a passing set checks what greedy decoding and the tool grammar
guarantee, and a failing one asks for a phrase no random model writes.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgert.cli.registry import app as registry_app
from edgert.errors import IntegrityError
from edgert.model_switch import RuntimeModelSwitch
from edgert.registry.evaluation import eval_attachment
from edgert.update.state import StateStore, UpdateState
from tests.integration.daemon import start_daemon
from tests.integration.mosquitto import Broker
from tests.integration.test_update_daemon import retained_deploy, update_status, wait_for_current, wait_served
from tests.integration.update_support import (
    MODEL_ID,
    Fleet,
    device_env,
    device_update,
    edgert_cmd,
    updater,
    write_hook,
)

EVAL_DIR = Path(__file__).parents[1] / "fixtures" / "eval"
PASSES = EVAL_DIR / "tiny-pass.jsonl"  # 2 cases: a reply, a required tool call
FAILS = EVAL_DIR / "tiny-fail.jsonl"  # 2 cases: a reply, and a phrase the model never writes
V1 = "tiny-gemma4+f16@1.0.0.gguf"
FAILED_REASON = (
    f"{MODEL_ID}@2.0.0 failed its health check: evaluation 1/2 below threshold 1: "
    "case 'greet' failed contains 'a phrase no random model writes'"
)


@pytest.fixture
def fleet(tmp_path: Path, tiny_gguf: Path) -> Iterator[Fleet]:
    with Fleet(tmp_path, tiny_gguf) as running:
        running.release("1.0.0")
        yield running


def state_of(tmp_path: Path) -> UpdateState:
    return StateStore(tmp_path / "device" / "update").load()


def versions(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "device" / "models" / "versions").iterdir())


def test_a_release_whose_set_passes_commits_and_keeps_its_score(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    assert state_of(tmp_path).evaluation is None  # 1.0.0 carries no set: nothing ran

    fleet.release("2.0.0", evaluation=eval_attachment(PASSES, 1.0))
    result = device.apply()
    assert (result.outcome, result.release) == ("committed", f"{MODEL_ID}@2.0.0")
    state = state_of(tmp_path)
    assert state.current is not None and state.current.meta.evaluation is not None
    assert state.current.evaluation is not None and state.current.evaluation.length == PASSES.stat().st_size
    record = state.evaluation
    assert record is not None
    assert (record.release, record.passed, record.total, record.threshold) == (f"{MODEL_ID}@2.0.0", 2, 2, 1.0)
    assert record.ts <= time.time()
    # the set waited beside the model until the commit, whose garbage collection removed it
    assert versions(tmp_path) == sorted([V1, "tiny-gemma4+f16@2.0.0.gguf"])
    serving = switch_closer[0].serving
    assert serving is not None and serving.path.name == "tiny-gemma4+f16@2.0.0.gguf"


def test_a_release_whose_set_fails_rolls_back_with_the_score_and_is_blocklisted(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    fleet.release("2.0.0", evaluation=eval_attachment(FAILS, 1.0))
    result = device.apply()
    assert (result.outcome, result.release, result.detail) == ("rolled-back", f"{MODEL_ID}@2.0.0", FAILED_REASON)
    state = state_of(tmp_path)
    assert state.current is not None and state.current.meta.version == "1.0.0"
    assert state.blocklist == [f"{MODEL_ID}@2.0.0"]
    assert state.last_error == FAILED_REASON
    assert state.evaluation is not None and (state.evaluation.passed, state.evaluation.total) == (1, 2)
    assert versions(tmp_path) == [V1]  # the candidate and its set are gone
    serving = switch_closer[0].serving
    assert serving is not None and serving.path.name == V1  # the old model served throughout
    assert device.apply().outcome == "up-to-date"  # blocklisted: not fetched again
    env = {**device_env(tmp_path / "device", fleet), "EDGERT_SERVE__SOCKET": str(tmp_path / "no-daemon.sock")}
    shown = subprocess.run(
        edgert_cmd("update", "status"), env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert f"evaluated: {MODEL_ID}@2.0.0 1/2 below threshold 1\n" in shown


def test_the_signed_threshold_decides(tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]) -> None:
    device = updater(tmp_path, fleet, switch_closer)
    fleet.release("2.0.0", evaluation=eval_attachment(FAILS, 0.5))
    assert device.apply().outcome == "committed"
    record = state_of(tmp_path).evaluation
    assert record is not None and (record.passed, record.total, record.threshold) == (1, 2, 0.5)


def test_a_set_past_its_time_limit_fails_as_not_run(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    device = updater(tmp_path, fleet, switch_closer, eval_timeout_s=0.001)
    fleet.release("2.0.0", evaluation=eval_attachment(PASSES, 1.0))
    result = device.apply()
    assert result.outcome == "rolled-back"
    assert result.detail.startswith(f"{MODEL_ID}@2.0.0 failed its health check: evaluation 0/2 below threshold 1: ")
    assert "failed not run" in result.detail


def test_an_altered_set_on_the_host_is_refused_before_anything_loads(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    device = updater(tmp_path, fleet, switch_closer)
    assert device.apply().outcome == "committed"
    fleet.release("2.0.0", evaluation=eval_attachment(FAILS, 1.0))
    (published,) = (fleet.site / "targets" / "models" / MODEL_ID / "2.0.0").glob("*.eval.jsonl")
    published.write_bytes(PASSES.read_bytes()[: published.stat().st_size])  # same length, a passing set
    with pytest.raises(IntegrityError, match=r"eval\.jsonl: downloaded file does not match .*sha256 mismatch"):
        device.apply()
    state = state_of(tmp_path)
    assert state.current is not None and state.current.meta.version == "1.0.0"
    assert state.blocklist == []  # the host's fault, not the release's: abandoned, not blocklisted
    assert "download of" in str(state.last_error)


def test_a_set_gone_from_disk_before_activation_is_fetched_and_verified_again(
    tmp_path: Path, fleet: Fleet, switch_closer: list[RuntimeModelSwitch]
) -> None:
    versions_dir = tmp_path / "device" / "models" / "versions"
    # runs between the verified download and the activation: the set the device verified is gone
    hooks = write_hook(tmp_path / "hooks", "pre-install", f"rm -f {versions_dir}/*.eval.jsonl").parent
    device = updater(tmp_path, fleet, switch_closer, hooks_dir=str(hooks))
    fleet.release("2.0.0", evaluation=eval_attachment(PASSES, 1.0))
    assert device.apply().outcome == "committed"
    record = state_of(tmp_path).evaluation
    assert record is not None and (record.release, record.passed) == (f"{MODEL_ID}@2.0.0", 2)

    fleet.release("3.0.0", evaluation=eval_attachment(FAILS, 1.0))
    (published,) = (fleet.site / "targets" / "models" / MODEL_ID / "3.0.0").glob("*.eval.jsonl")
    other = tmp_path / "other.jsonl"
    other.write_bytes(PASSES.read_bytes()[: published.stat().st_size])
    # and now the host serves other bytes under the set's name, after the device verified the release
    write_hook(hooks, "pre-install", f"rm -f {versions_dir}/*.eval.jsonl && cp {other} {published}")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        device.apply()
    state = state_of(tmp_path)
    assert state.current is not None and state.current.meta.version == "2.0.0"
    assert state.blocklist == []  # abandoned as a download that does not verify, not the release's verdict
    assert str(state.last_error).startswith(f"hash_length: download of {MODEL_ID}@3.0.0 failed: ")
    assert versions(tmp_path) == ["tiny-gemma4+f16@2.0.0.gguf"]  # 3.0.0's verified model went with it


def test_registry_add_eval_on_the_command_line(fleet: Fleet, tmp_path: Path) -> None:
    base = ["add", str(fleet.model), "--model-id", MODEL_ID, "--dir", str(fleet.registry.directory)]
    result = CliRunner().invoke(registry_app, [*base, "--version", "2.0.0", "--eval", str(PASSES)])
    assert result.exit_code == 0, result.output
    assert f"added models/{MODEL_ID}/2.0.0/eval.jsonl (evaluation set, 2 cases, threshold 1)" in result.stdout
    directory = ["--dir", str(fleet.registry.directory)]
    assert CliRunner().invoke(registry_app, ["publish", *directory]).exit_code == 0
    status = CliRunner().invoke(registry_app, ["status", *directory])
    (row,) = [line for line in status.stdout.splitlines() if f"{MODEL_ID}@2.0.0" in line]
    assert row.endswith("eval 2 cases >= 1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "p", "checks": [{"regex": "("}]}\n')
    result = CliRunner().invoke(registry_app, [*base, "--version", "3.0.0", "--eval", str(bad)])
    assert result.exit_code == 1
    assert "bad.jsonl:1 (case 'a'): checks[0]: regex '(' does not compile" in result.stderr
    result = CliRunner().invoke(
        registry_app, [*base, "--version", "3.0.0", "--eval", str(PASSES), "--eval-threshold", "1.5"]
    )
    assert result.exit_code == 2  # typer's range check


def test_a_daemon_reports_the_score_and_the_rollback_reason_on_its_deploy_topic(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path
) -> None:
    (tmp_path / "device").mkdir()
    broker = Broker(tmp_path / "broker").start()
    settings = {f"update__{key}": str(value) for key, value in device_update(fleet).items()}
    daemon = start_daemon(tmp_path / "device", tiny_gguf, **settings, **broker.daemon_settings(mqtt__device_id="k-1"))
    try:
        wait_for_current(daemon, f"{MODEL_ID}@1.0.0")
        fleet.release("2.0.0", evaluation=eval_attachment(PASSES, 1.0))
        with daemon.client() as client:
            assert client.post("/update/check").status_code == 202
        wait_for_current(daemon, f"{MODEL_ID}@2.0.0")
        wait_served(daemon, "2.0.0")
        deploy = wait_deploy(broker, lambda d: d["current"] == f"{MODEL_ID}@2.0.0")
        assert deploy["evaluation"] == {
            "release": f"{MODEL_ID}@2.0.0",
            "score": 1.0,
            "threshold": 1.0,
            "passed": 2,
            "total": 2,
            "ts": deploy["evaluation"]["ts"],  # type: ignore[index]
        }

        # requests keep being answered by the serving model while the candidate is evaluated beside it
        answered, failures, stop = [0], [], threading.Event()

        def traffic() -> None:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
            with daemon.client() as client:
                while not stop.is_set():
                    response = client.post("/v1/chat/completions", json=body)
                    if response.status_code == 200:
                        answered[0] += 1
                    else:
                        failures.append(f"{response.status_code}: {response.text[:200]}")

        worker = threading.Thread(target=traffic)
        worker.start()
        fleet.release("3.0.0", evaluation=eval_attachment(FAILS, 1.0))
        with daemon.client() as client:
            assert client.post("/update/check").status_code == 202
        deploy = wait_deploy(broker, lambda d: d["rolled_back"] == f"{MODEL_ID}@3.0.0")
        stop.set()
        worker.join(30)
        assert failures == []
        assert answered[0] > 0
        reason = FAILED_REASON.replace("2.0.0", "3.0.0")
        assert deploy["rollback_reason"] == reason
        assert deploy["current"] == f"{MODEL_ID}@2.0.0"
        assert deploy["evaluation"]["release"] == f"{MODEL_ID}@3.0.0"  # type: ignore[index]
        assert deploy["evaluation"]["score"] == 0.5  # type: ignore[index]
        assert f"{MODEL_ID}@3.0.0" in update_status(daemon)["blocklist"]  # type: ignore[operator]
        wait_served(daemon, "2.0.0")
    finally:
        assert daemon.stop() == 0, daemon.log()
        broker.stop()


def wait_deploy(broker: Broker, done: object, timeout: float = 90) -> dict[str, object]:
    """The retained deploy message once ``done(message)`` holds (each round republishes it)."""
    assert callable(done)
    deadline = time.monotonic() + timeout
    while not done(deploy := retained_deploy(broker, "k-1")):
        assert time.monotonic() < deadline, deploy
        time.sleep(0.2)
    return deploy


def test_a_draining_daemon_evaluates_with_the_old_model_unloaded_and_loads_it_back_on_failure(
    tmp_path: Path, fleet: Fleet, tiny_gguf: Path
) -> None:
    """``serve.model_swap = drain``: nothing serves while the candidate is probed and evaluated (the switch's
    step tells the watchdog so); a failing set rolls back and the old model is loaded and served again."""
    (tmp_path / "device").mkdir()
    settings = {f"update__{key}": str(value) for key, value in device_update(fleet).items()}
    daemon = start_daemon(tmp_path / "device", tiny_gguf, serve__model_swap="drain", **settings)
    try:
        wait_for_current(daemon, f"{MODEL_ID}@1.0.0")
        fleet.release("2.0.0", evaluation=eval_attachment(FAILS, 1.0))
        with daemon.client() as client:
            assert client.post("/update/check").status_code == 202
        deadline = time.monotonic() + 90
        while (status := update_status(daemon)).get("last_rollback") != f"{MODEL_ID}@2.0.0":
            assert time.monotonic() < deadline, f"{status}\n{daemon.log()[-3000:]}"
            time.sleep(0.1)
        assert status["last_rollback_reason"] == FAILED_REASON
        assert status["evaluation"]["passed"] == 1  # type: ignore[index]
        wait_served(daemon, "1.0.0")
        assert "draining and swapping" in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()[-4000:]
