"""Evaluation sets: the format's errors (with their line), every check kind both ways, the score and its reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgert.errors import EvalSetError, RegistryError
from edgert.evalset.cases import MAX_EVAL_BYTES, EvalCase, load_eval_set, parse_eval_set
from edgert.evalset.checks import CalledTool, Reply, check_reply, not_run, report
from edgert.evalset.request import chat_request, check_requests
from edgert.registry.evaluation import eval_attachment
from edgert.update.manifest import EvalMeta, ModelMeta

FIXTURES = Path(__file__).parents[1] / "fixtures"
TOOL = {
    "type": "function",
    "function": {"name": "check_stock", "parameters": {"type": "object", "properties": {"sku": {"type": "string"}}}},
}


def one_case(**fields: Any) -> EvalCase:
    case: dict[str, Any] = {"id": "c", "prompt": "Hi", "checks": [{"contains": "x"}], **fields}
    (parsed,) = parse_eval_set(json.dumps(case).encode(), "set.jsonl").cases
    return parsed


def reply(content: str = "", *calls: tuple[str, str], latency_s: float = 0.5, error: str | None = None) -> Reply:
    return Reply(content, tuple(CalledTool(name, args) for name, args in calls), latency_s, 3, error)


def refused(text: str) -> str:
    with pytest.raises(EvalSetError) as caught:
        parse_eval_set(text.encode(), "set.jsonl")
    return caught.value.message


# --------------------------------------------------------------------------- the format


def test_the_fixture_sets_and_the_example_load() -> None:
    for path in (FIXTURES / "eval" / "tiny-pass.jsonl", Path(__file__).parents[2] / "examples/eval/kiosk.jsonl"):
        loaded = load_eval_set(path)
        check_requests(loaded)
        assert loaded.cases


def test_a_prompt_is_one_user_message_and_defaults_apply() -> None:
    case = one_case()
    assert case.messages == ({"role": "user", "content": "Hi"},)
    assert case.max_tokens == 64
    assert case.line == 1


def test_blank_lines_are_skipped_and_lines_counted() -> None:
    text = '\n{"id": "a", "prompt": "p", "checks": [{"contains": "x"}]}\n\n{"id": "b", "prompt": "p", "checks": []}\n'
    assert refused(text) == "set.jsonl:4 (case 'b'): checks must be a list of 1..16 checks"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("not json", "set.jsonl:1: not JSON"),
        ("[1, 2]", "set.jsonl:1: a case is a JSON object, not list"),
        ('{"id": "a", "prompt": "p", "checks": [{"contains": "x"}], "temp": 1}', "set.jsonl:1: unknown field 'temp'"),
        ('{"id": "-a", "prompt": "p", "checks": [{"contains": "x"}]}', "set.jsonl:1: id must be"),
        ('{"id": "a", "checks": [{"contains": "x"}]}', "set.jsonl:1 (case 'a'): give either prompt"),
        (
            '{"id": "a", "prompt": "p", "messages": [{"role": "user", "content": "p"}], "checks": [{"contains": "x"}]}',
            "set.jsonl:1 (case 'a'): give either prompt",
        ),
        ('{"id": "a", "messages": [{"content": "p"}], "checks": [{"contains": "x"}]}', "messages[0] needs a role"),
        ('{"id": "a", "prompt": "p", "max_tokens": 0, "checks": [{"contains": "x"}]}', "max_tokens must be"),
        ('{"id": "a", "prompt": "p", "max_tokens": 2000, "checks": [{"contains": "x"}]}', "max_tokens must be"),
        ('{"id": "a", "prompt": "p", "checks": [{"containz": "x"}]}', "checks[0]: unknown check 'containz'"),
        ('{"id": "a", "prompt": "p", "checks": [{"contains": "x", "regex": "y"}]}', "checks[0]: a check is an object"),
        ('{"id": "a", "prompt": "p", "checks": [{"contains": ""}]}', "contains needs a non-empty string"),
        ('{"id": "a", "prompt": "p", "checks": [{"regex": "(unclosed"}]}', "regex '(unclosed' does not compile"),
        ('{"id": "a", "prompt": "p", "checks": [{"json_schema": {"type": 5}}]}', "json_schema is not a valid JSON"),
        ('{"id": "a", "prompt": "p", "checks": [{"max_latency_s": 0}]}', "max_latency_s needs a number"),
        ('{"id": "a", "prompt": "p", "checks": [{"max_latency_s": true}]}', "max_latency_s needs a number"),
        ('{"id": "a", "prompt": "p", "checks": [{"tool_call": {"name": "f"}}]}', "checks for a function the case"),
        ('{"id": "a", "prompt": "p", "tool_choice": "always", "checks": [{"contains": "x"}]}', "tool_choice must be"),
    ],
)
def test_each_defect_is_refused_with_its_line_and_field(line: str, error: str) -> None:
    good = '{"id": "ok", "prompt": "p", "checks": [{"contains": "x"}]}'
    message = refused(f"{good}\n{line}")
    assert message.startswith("set.jsonl:2"), message  # the line of the bad case, not of the first
    assert error.removeprefix("set.jsonl:1") in message, message


def test_duplicate_ids_empty_sets_oversized_files_and_bad_bytes_are_refused(tmp_path: Path) -> None:
    case = '{"id": "a", "prompt": "p", "checks": [{"contains": "x"}]}'
    assert refused(f"{case}\n{case}") == "set.jsonl:2: id 'a' is already used on line 1"
    assert refused("\n\n") == "set.jsonl: no cases (one JSON object per line)"
    with pytest.raises(EvalSetError, match="not UTF-8"):
        parse_eval_set(b"\xff\xfe", "set.jsonl")
    big = tmp_path / "big.jsonl"
    big.write_bytes(b" " * (MAX_EVAL_BYTES + 1))
    with pytest.raises(EvalSetError, match="larger than 1048576 bytes"):
        load_eval_set(big)
    with pytest.raises(EvalSetError, match=r"missing\.jsonl: No such file"):
        load_eval_set(tmp_path / "missing.jsonl")


def test_a_case_the_api_would_refuse_is_refused_at_load_with_its_line() -> None:
    text = (
        '{"id": "a", "prompt": "p", "checks": [{"contains": "x"}]}\n'
        '{"id": "b", "messages": [{"role": "user", "content": 5}], "checks": [{"contains": "x"}]}\n'
    )
    loaded = parse_eval_set(text.encode(), "set.jsonl")
    with pytest.raises(EvalSetError, match=r"^set.jsonl:2 \(case 'b'\): messages\.0"):
        check_requests(loaded)


def test_the_request_is_greedy_and_its_tokens_capped() -> None:
    case = one_case(max_tokens=300, tools=[TOOL], tool_choice="required")
    request = chat_request(case, max_tokens_cap=100)
    assert request.temperature == 0.0
    assert request.max_tokens == 100
    assert request.tool_mode() == "required"
    assert chat_request(case).max_tokens == 300


# --------------------------------------------------------------------------- the checks


def test_contains_and_regex() -> None:
    case = one_case(checks=[{"contains": "hello"}, {"regex": r"^\w+"}])
    assert check_reply(case, reply("hello there")).passed
    failed = check_reply(case, reply("Hi there"))
    assert (failed.passed, failed.failed, failed.why) == (False, "contains 'hello'", "the reply was 'Hi there'")
    failed = check_reply(case, reply(" hello"))
    assert (failed.failed, failed.why) == ("regex '^\\w+'", "no match in ' hello'")


def test_json_schema_reads_the_reply_as_json_even_in_a_code_fence() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    case = one_case(checks=[{"json_schema": schema}])
    assert check_reply(case, reply('{"n": 3}')).passed
    assert check_reply(case, reply('```json\n{"n": 3}\n```')).passed
    assert check_reply(case, reply("n is 3")).why == "the reply is not JSON: 'n is 3'"
    assert check_reply(case, reply('{"n": "3"}')).why == "n: '3' is not of type 'integer'"
    assert check_reply(case, reply("{}")).why == "the document: 'n' is a required property"


def test_tool_call_by_name_and_by_the_arguments_given() -> None:
    by_name = one_case(tools=[TOOL], checks=[{"tool_call": {"name": "check_stock"}}])
    assert check_reply(by_name, reply("", ("check_stock", "{}"))).passed
    assert check_reply(by_name, reply("I would check.")).why == "no call to check_stock (calls: none)"
    exact = one_case(tools=[TOOL], checks=[{"tool_call": {"name": "check_stock", "arguments": {"sku": "A1"}}}])
    assert check_reply(exact, reply("", ("check_stock", '{"sku": "A1", "store": 4}'))).passed  # others may be there
    wrong = check_reply(exact, reply("", ("check_stock", '{"sku": "B2"}')))
    assert wrong.why == 'check_stock was called with \'{"sku": "B2"}\', not {"sku": "A1"}'
    assert not check_reply(exact, reply("", ("check_stock", '{"sku": "A1"'))).passed  # cut off: not JSON


def test_max_latency_and_a_failed_generation() -> None:
    case = one_case(checks=[{"max_latency_s": 2}])
    assert check_reply(case, reply("x", latency_s=2.0)).passed
    slow = check_reply(case, reply("x", latency_s=2.5))
    assert (slow.failed, slow.why) == ("max_latency_s 2", "took 2.50 s")
    broken = check_reply(case, reply("", error="the engine failed"))
    assert (broken.passed, broken.failed, broken.why) == (False, "generation", "the engine failed")


def test_the_first_failing_check_is_the_one_reported() -> None:
    case = one_case(checks=[{"contains": "a"}, {"contains": "b"}, {"contains": "c"}])
    assert check_reply(case, reply("a")).failed == "contains 'b'"


# --------------------------------------------------------------------------- the score


def test_score_threshold_and_the_rollback_reason() -> None:
    cases = [one_case(id=name) for name in ("greet", "b", "c", "d", "e")]
    results = [check_reply(cases[0], reply("no")), *(check_reply(c, reply("x")) for c in cases[1:3])]
    results += [not_run(cases[3], "time limit"), not_run(cases[4], "time limit")]
    scored = report(results, 0.8)
    assert (scored.passed, scored.total, scored.score, scored.ok) == (2, 5, 0.4, False)
    assert (
        scored.summary()
        == "evaluation 2/5 below threshold 0.8: case 'greet' failed contains 'x' (and 2 more failed cases)"
    )
    assert report(results, 0.4).ok
    assert report(results, 0.4).summary() == "evaluation 2/5 meets threshold 0.4"
    seven = [check_reply(one_case(), reply("x"))] * 7 + [check_reply(one_case(), reply("y"))] * 3
    assert report(seven, 0.7).ok  # 7/10 meets 0.7 whatever the float's last bit


# --------------------------------------------------------------------------- the signed gate


def test_the_gate_is_signed_only_when_a_release_has_one() -> None:
    fields: dict[str, Any] = {
        "model_id": "m",
        "version": "1",
        "architecture": "gemma4",
        "ram_mib": 10,
        "min_edgert_version": "0.1",
        "file_name": "m.gguf",
    }
    plain = ModelMeta(**fields)
    assert "evaluation" not in plain.signed_custom()  # older devices forbid fields they do not know
    assert plain.evaluation_target() is None
    gated = ModelMeta(**fields, evaluation=EvalMeta(threshold_pct=80, cases=5))
    assert gated.signed_custom()["evaluation"] == {"threshold_pct": 80, "cases": 5}  # canonical JSON: no floats
    assert gated.evaluation_target() == "models/m/1/eval.jsonl"
    with pytest.raises(ValueError, match=r"may not contain eval\.jsonl"):
        ModelMeta(**fields, format="onnx-genai", files=("genai_config.json", "eval.jsonl"))


def test_registry_validates_the_set_and_threshold_before_signing(tmp_path: Path) -> None:
    attached = eval_attachment(FIXTURES / "eval" / "tiny-pass.jsonl", 0.5)
    assert attached.meta == EvalMeta(threshold_pct=50, cases=2)
    assert attached.meta.threshold == 0.5
    for bad_threshold in (1.5, -0.1, 0.805):
        with pytest.raises(RegistryError, match=r"--eval-threshold must be 0\.\.1 in steps of 0\.01"):
            eval_attachment(FIXTURES / "eval" / "tiny-pass.jsonl", bad_threshold)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "p", "checks": [{"contains": "x"}]}\n{"id": "b"}\n')
    with pytest.raises(RegistryError, match=r"^--eval: .*bad.jsonl:2 \(case 'b'\): give either prompt"):
        eval_attachment(bad, 1.0)
