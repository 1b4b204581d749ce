"""``edgert eval`` as a real subprocess on the tiny Gemma 4 model: the table, --json, and the exit codes.

The tiny model has random weights: a passing set checks what greedy decoding and the tool-call grammar
guarantee (a reply; under ``tool_choice: required`` a call to the declared function), a failing one
asks for a phrase no random model writes. Greedy decoding makes two runs agree case by case.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from edgert.cli import exitcodes
from tests.media_samples import noise_png

EVAL_DIR = Path(__file__).parents[1] / "fixtures" / "eval"


def edgert_eval(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgert", "eval", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_a_passing_set_prints_each_case_and_exits_0(tiny_gguf: Path) -> None:
    run = edgert_eval(str(EVAL_DIR / "tiny-pass.jsonl"), "--model", str(tiny_gguf))
    assert run.returncode == exitcodes.OK, run.stderr
    rows = {line.split("│")[1].strip(): line for line in run.stdout.splitlines() if line.count("│") > 2}
    assert set(rows) == {"answers", "calls-a-tool"}
    assert "pass" in rows["answers"] and "pass" in rows["calls-a-tool"]
    assert "evaluation 2/2 meets threshold 1" in run.stdout


def test_a_failing_set_names_the_case_and_check_and_exits_11(tiny_gguf: Path) -> None:
    run = edgert_eval(str(EVAL_DIR / "tiny-fail.jsonl"), "--model", str(tiny_gguf), "--json")
    assert run.returncode == exitcodes.EVAL_BELOW_THRESHOLD == 11, run.stderr
    report = json.loads(run.stdout)
    assert (report["passed"], report["total"], report["score"], report["ok"]) == (1, 2, 0.5, False)
    assert report["summary"] == (
        "evaluation 1/2 below threshold 1: case 'greet' failed contains 'a phrase no random model writes'"
    )
    greet = report["cases"][1]
    assert (greet["id"], greet["passed"], greet["failed"]) == (
        "greet",
        False,
        "contains 'a phrase no random model writes'",
    )
    assert greet["why"].startswith("the reply was ")
    assert greet["completion_tokens"] == 8 and greet["latency_s"] > 0
    again = json.loads(edgert_eval(str(EVAL_DIR / "tiny-fail.jsonl"), "--model", str(tiny_gguf), "--json").stdout)
    assert [case["why"] for case in again["cases"]] == [case["why"] for case in report["cases"]]  # greedy

    lower = edgert_eval(str(EVAL_DIR / "tiny-fail.jsonl"), "--model", str(tiny_gguf), "--threshold", "0.5")
    assert lower.returncode == exitcodes.OK, lower.stderr
    assert "evaluation 1/2 meets threshold 0.5" in lower.stdout


def test_an_invalid_set_is_refused_with_its_line_before_a_model_loads(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "p", "checks": [{"contains": "x"}]}\n{"id": "b", "prompt": "p"}\n')
    run = edgert_eval(str(bad), "--model", str(tmp_path / "no-such-model.gguf"))
    assert run.returncode == exitcodes.FAILURE
    assert run.stderr.strip() == f"error: {bad}:2 (case 'b'): checks must be a list of 1..16 checks"


def test_a_set_past_its_time_limit_fails_its_cases(tiny_gguf: Path) -> None:
    run = edgert_eval(str(EVAL_DIR / "tiny-pass.jsonl"), "--model", str(tiny_gguf), "--timeout", "0.001", "--json")
    assert run.returncode == exitcodes.EVAL_BELOW_THRESHOLD, run.stderr
    report = json.loads(run.stdout)
    assert report["passed"] == 0
    assert {case["failed"] for case in report["cases"]} == {"not run"}


def test_a_case_with_an_image_runs_through_the_projector(tmp_path: Path, tiny_gguf: Path) -> None:
    url = "data:image/png;base64," + base64.b64encode(noise_png(64, 64)).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour?"}]
    case = {
        "id": "sees",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "checks": [{"regex": "\\S"}],
    }
    sample = tmp_path / "image.jsonl"
    sample.write_text(json.dumps(case) + "\n")
    mmproj = Path(__file__).parents[1] / "fixtures" / "tiny-gemma4-mmproj.gguf"
    run = edgert_eval(str(sample), "--model", str(tiny_gguf), "--mmproj", str(mmproj), "--json")
    assert run.returncode == exitcodes.OK, run.stderr[-2000:]
    assert json.loads(run.stdout)["cases"][0]["passed"] is True
    # a text-only model cannot take the case: it fails as not run, with the engine's reason
    run = edgert_eval(str(sample), "--model", str(tiny_gguf), "--json")
    assert run.returncode == exitcodes.EVAL_BELOW_THRESHOLD
    (result,) = json.loads(run.stdout)["cases"]
    assert result["failed"] == "not run"
    assert "is served text-only (no multimodal projector is loaded" in result["why"]
