"""The real embedded default model (Gemma 3 270M Q4_K_M from PyPI) end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgert.engine.base import SamplingParams
from edgert.engine.llama import reference_generate
from edgert.serving.runtime import load_options, open_runtime
from edgert.settings import load_settings
from tests.integration.daemon import start_daemon

pytestmark = pytest.mark.slow


def test_single_request_greedy_equals_raw_llama_cpp_python(gemma3_270m: Path, tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path, model=str(gemma3_270m), engine={"n_ctx": 2048, "n_parallel": 2, "n_threads": 2}
    )
    runtime = open_runtime(settings)
    try:
        prompt = runtime.chat_prompt([{"role": "user", "content": "Write a short poem about the sea."}])
        request = runtime.request(prompt, sampling=SamplingParams(temperature=0.0), max_tokens=48)

        async def generate() -> tuple[str, object]:
            return await runtime.scheduler.submit(request).collect()

        ours, result = asyncio.run(generate())
        ref = reference_generate(gemma3_270m, load_options(settings.engine), list(prompt), 48)
        expected = b"".join(runtime.backend.token_bytes(t) for t in ref.tokens).decode("utf-8", errors="replace")
    finally:
        runtime.close()
    assert ours == expected
    assert result.completion_tokens == len(ref.tokens) > 0


def test_cli_run_streams_a_reply_from_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERT_")}
    env["EDGERT_STATE_DIR"] = str(tmp_path / "state")
    cmd = [sys.executable, "-m", "edgert", "run", "--json", "-n", "24", "-t", "0", "Name a colour."]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["model"] == "gemma-3-270m:q4_k_m"
    assert reply["text"].strip()
    assert reply["usage"]["completion_tokens"] > 0
    assert reply["finish_reason"] in {"stop", "length"}
    # the embedded model was installed into the state dir on first use
    assert (tmp_path / "state" / "models" / "gemma-3-270m.q4_k_m.gguf").is_file()


def test_cli_run_unknown_model_exits_3_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERT_")}
    env["EDGERT_STATE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "edgert", "run", "-m", "nope:q4_k_m", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3
    assert proc.stderr.startswith("error: unknown model 'nope:q4_k_m'")
    assert proc.stderr.count("\n") == 1


def test_tools_on_the_embedded_base_model_are_refused_with_the_reason(gemma3_270m: Path, tmp_path: Path) -> None:
    """The 270M base model's template has no tool format: a clear 400 over the socket, exit 1 from the CLI."""
    tools = [{"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}]
    (tmp_path / "d").mkdir()
    daemon = start_daemon(tmp_path / "d", gemma3_270m)
    try:
        with daemon.client() as client:
            reply = client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "tools": tools}
            )
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"]["param"] == "tools"
            assert "has no tool support" in reply.json()["error"]["message"]
            plain = client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            )
            assert plain.status_code == 200  # and it keeps serving
    finally:
        assert daemon.stop() == 0, daemon.log()
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERT_")}
    env["EDGERT_STATE_DIR"] = str(tmp_path / "state")
    cmd = [sys.executable, "-m", "edgert", "run", "-m", str(gemma3_270m), "--tools", str(tmp_path / "tools.json"), "hi"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "has no tool support" in proc.stderr
