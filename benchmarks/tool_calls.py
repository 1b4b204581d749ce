#!/usr/bin/env python3
"""Tool-calling benchmark: edgert vs llama-server (``--jinja``) on the same GGUF, threads and requests.

Both servers run side by side and are measured alternately (the order flips every item), so a CPU
shared with other jobs hurts both alike. Four measurements (issue 15):

1. **schema-valid call rate** -- for each tool of ``tool_schemas.json`` (~20: flat, nested objects,
   enums, arrays, arrays of objects, optional keys, nullable, numbers/integers/booleans, no
   parameters) one request declaring that tool with ``tool_choice: "required"``, streamed and not.
   A reply is valid when it has at least one call, every call names a declared function and its
   ``function.arguments`` parse as JSON that ``jsonschema.validate`` accepts against the declared
   ``parameters``. Run 0 is greedy (temperature 0), later runs sample at temperature 1 with seed =
   run, so the grammar meets more than one path. The streamed argument pieces, concatenated, are
   compared with the non-streamed arguments of the same request (same seed).
   With random-weight models the rate measures what the sampling grammar guarantees, not what the
   model knows: a real model mostly writes valid calls even without a grammar.
2. **constrained vs unconstrained decode tok/s** on the same prompt and ``max_tokens``: the
   ``required`` request vs the same request with ``tool_choice: "none"`` and ``ignore_eos``.
   Decode rate = ``(n - 1) / (T(n) - T(1))``: T(n) the wall time of the non-streamed request that
   generated n tokens, T(1) of the identical request capped at one token, both after a warming
   request so the prompt comes from the prefix cache. That cancels prefill and HTTP cost exactly,
   where timing streamed deltas would not: a call's first delta only leaves the server once the
   model has written ``<|tool_call>call:NAME{`` (several tokens).
3. **TTFT with ~10 tools declared**: a system prompt with a fresh nonce plus 10 declarations (a
   long shared prefix), the first request vs repeats that change only the user message. TTFT = wall
   time of a one-token non-streamed request (prefill + one token + HTTP).
4. **rendering parity** of a whole tool conversation (system + tools + user + assistant tool_calls +
   two ``role: "tool"`` results + user, thinking off and on): edgert's rendered prompt vs
   llama-server's ``/apply-template``, byte for byte. edgert's side comes from its own
   ``/apply-template`` when it serves one; otherwise from a stand-in (the GGUF's template rendered
   with jinja2 after llama.cpp's message conversions), and the result says which.

Also: the refusal of tools on a model whose template has no tool support (``--refusal-model``,
default the installed Gemma 3 270M), which edgert answers with a 400.

Usage::

    .venv/bin/python benchmarks/tool_calls.py --model tests/fixtures/tiny-gemma4.gguf --runs 3 --out /tmp/tc.json
    .venv/bin/python benchmarks/tool_calls.py --report /tmp/tc.json

This file is over 400 lines because it is one self-contained benchmark script (like serving_bench.py):
four measurements sharing one pair of servers and one report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jinja2
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench
from serving_bench import (
    REPO,
    EdgertTarget,
    LlamaServerTarget,
    Target,
    _git_describe,
    loadavg,
    machine_info,
)

SCHEMAS = Path(__file__).resolve().parent / "tool_schemas.json"
DEFAULT_REFUSAL_MODEL = Path.home() / ".local/share/edgert/models/gemma-3-270m.q4_k_m.gguf"
SYSTEM = "You are the assistant of a self-service kiosk and field device. Use the tools to act; never guess."
TTFT_QUESTIONS = [
    "Is it going to rain in Porto this afternoon?",
    "Do we still have SKU B-220 in store 4?",
    "How much are two fresh orange juices?",
    "Somebody spilled coffee near the door.",
    "Turn the kitchen down to 19 degrees.",
    "What does sensor H-2 read right now?",
]


# --------------------------------------------------------------------------- targets
class LlamaServerToolsTarget(LlamaServerTarget):
    """llama-server with ``--jinja``: the GGUF's chat template, its Gemma 4 PEG tool parser and lazy grammar."""

    def build(self) -> None:
        super().build()
        self.command.append("--jinja")


def bench_bin_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    out = subprocess.run(
        [str(REPO / "benchmarks" / "build_llama_tools.sh")], check=True, capture_output=True, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- one request
@dataclass
class Reply:
    status: int = 0
    error: str | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)  # {"name", "arguments", "id", "pieces"}
    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    wall_s: float = 0.0


def _usage_into(reply: Reply, obj: dict[str, Any]) -> None:
    usage = obj.get("usage") or {}
    if usage:
        reply.completion_tokens = usage.get("completion_tokens")
        reply.prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            reply.cached_tokens = int(details["cached_tokens"])
    timings = obj.get("timings") or {}
    if "cache_n" in timings:  # llama-server: prompt tokens reused from the slot's cache
        reply.cached_tokens = int(timings["cache_n"])


def chat(client: httpx.Client, body: dict[str, Any], stream: bool) -> Reply:
    body = {**body, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    reply = Reply()
    started = time.perf_counter()
    try:
        if stream:
            _chat_stream(client, body, reply)
        else:
            response = client.post("/v1/chat/completions", json=body)
            reply.status = response.status_code
            if response.status_code != 200:
                reply.error = response.text[:300]
            else:
                obj = response.json()
                choice = obj["choices"][0]
                message = choice.get("message") or {}
                reply.content = message.get("content") or ""
                reply.reasoning = message.get("reasoning_content") or ""
                reply.finish_reason = choice.get("finish_reason")
                for call in message.get("tool_calls") or []:
                    function = call.get("function") or {}
                    reply.calls.append(
                        {"id": call.get("id"), "name": function.get("name"), "arguments": function.get("arguments")}
                    )
                _usage_into(reply, obj)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
    reply.wall_s = time.perf_counter() - started
    return reply


def _chat_stream(client: httpx.Client, body: dict[str, Any], reply: Reply) -> None:
    by_index: dict[int, dict[str, Any]] = {}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        reply.status = response.status_code
        if response.status_code != 200:
            reply.error = response.read().decode(errors="replace")[:300]
            return
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if obj.get("error"):
                reply.error = json.dumps(obj["error"])[:300]
            _usage_into(reply, obj)
            for choice in obj.get("choices") or []:
                if choice.get("finish_reason"):
                    reply.finish_reason = choice["finish_reason"]
                delta = choice.get("delta") or {}
                reply.content += delta.get("content") or ""
                reply.reasoning += delta.get("reasoning_content") or ""
                for piece in delta.get("tool_calls") or []:
                    call = by_index.setdefault(
                        int(piece.get("index", 0)), {"id": None, "name": None, "arguments": "", "pieces": 0}
                    )
                    call["id"] = call["id"] or piece.get("id")
                    function = piece.get("function") or {}
                    call["name"] = call["name"] or function.get("name")
                    if function.get("arguments"):
                        call["arguments"] += function["arguments"]
                        call["pieces"] += 1
    reply.calls = [by_index[i] for i in sorted(by_index)]


#: JSON Schema keywords that narrow values without changing their shape (numeric bounds, patterns, ...)
NARROWING = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "pattern", "format"}


def shape_only(schema: Any) -> Any:
    """The schema without :data:`NARROWING` keywords (a second, looser validity figure)."""
    if isinstance(schema, dict):
        return {k: shape_only(v) for k, v in schema.items() if k not in NARROWING}
    if isinstance(schema, list):
        return [shape_only(v) for v in schema]
    return schema


def check(reply: Reply, tools: list[dict[str, Any]], shape: bool = False) -> str | None:
    """None when the reply is a schema-valid call of a declared tool, else why not; ``shape``: ignore NARROWING."""
    if reply.error is not None or reply.status != 200:
        return f"HTTP {reply.status}: {reply.error}"
    if not reply.calls:
        return (
            f"no tool call (finish_reason {reply.finish_reason}, {len(reply.reasoning)} chars of reasoning, "
            f"content {reply.content[:40]!r})"
        )
    declared = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    for call in reply.calls:
        if call["name"] not in declared:
            return f"undeclared function {call['name']!r}"
        try:
            args = json.loads(call["arguments"] or "")
        except (TypeError, json.JSONDecodeError) as exc:
            return f"arguments not JSON ({exc}): {str(call['arguments'])[:80]!r}"
        if not isinstance(args, dict):
            return f"arguments not an object: {str(call['arguments'])[:80]!r}"
        try:
            jsonschema.validate(args, shape_only(declared[call["name"]]) if shape else declared[call["name"]])
        except jsonschema.ValidationError as exc:
            return f"schema: {exc.message[:120]}"
    return None


# --------------------------------------------------------------------------- measurements
def request_for(entry: dict[str, Any], max_tokens: int, run: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": entry["ask"]}],
        "tools": [entry["tool"]],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": max_tokens,
        "temperature": 0.0 if run == 0 else 1.0,
        "seed": 1000 + run,
        # thinking off on both: llama-server turns it on by default for Gemma 4, edgert off
        "reasoning_effort": "none",
    }


def ordered(names: list[str], i: int) -> list[str]:
    """Alternate which system goes first, item by item."""
    return names if i % 2 == 0 else names[::-1]


def measure_validity(
    clients: dict[str, httpx.Client], entries: list[dict[str, Any]], runs: int, max_tokens: int
) -> dict[str, Any]:
    out: dict[str, Any] = {n: {"rows": []} for n in clients}
    k = 0
    for run in range(runs):
        for entry in entries:
            body = request_for(entry, max_tokens, run)
            for name in ordered(list(clients), k):
                # cache the prompt first, so the two measured requests start from the same KV state: a
                # full prefill and a cached one round differently, and greedy decoding on random weights
                # (near-uniform logits) then diverges within a few tokens
                chat(clients[name], {**body, "max_tokens": 1}, False)
                whole, streamed = chat(clients[name], body, False), chat(clients[name], body, True)
                whole_args = [c["arguments"] for c in whole.calls]
                row = {
                    "tool": entry["tool"]["function"]["name"],
                    "run": run,
                    "temperature": body["temperature"],
                    "invalid": check(whole, body["tools"]),
                    "invalid_streamed": check(streamed, body["tools"]),
                    "invalid_shape": check(whole, body["tools"], shape=True),
                    "finish_reason": whole.finish_reason,
                    "finish_reason_streamed": streamed.finish_reason,
                    "completion_tokens": whole.completion_tokens,
                    "arguments": whole_args,
                    "arguments_streamed": [c["arguments"] for c in streamed.calls],
                    # None when the whole reply has no call: two empty lists prove nothing
                    "streamed_equal": whole_args == [c["arguments"] for c in streamed.calls] if whole_args else None,
                    "streamed_pieces": [c.get("pieces", 0) for c in streamed.calls],
                    "leaked_markers": any(m in whole.content + streamed.content for m in ("<|tool_call>", '<|"|>')),
                }
                out[name]["rows"].append(row)
            k += 1
    for summary in out.values():
        rows = summary["rows"]
        greedy = [r for r in rows if r["temperature"] == 0.0]
        summary.update(
            requests=len(rows),
            valid=sum(r["invalid"] is None for r in rows),
            valid_streamed=sum(r["invalid_streamed"] is None for r in rows),
            valid_shape=sum(r["invalid_shape"] is None for r in rows),
            finish_tool_calls=sum(r["finish_reason"] == "tool_calls" for r in rows),
            # a call cut off by max_tokens is invalid JSON whatever the grammar: counted apart
            cut_off=sum(r["finish_reason"] == "length" for r in rows),
            valid_of_complete=sum(r["invalid"] is None for r in rows if r["finish_reason"] != "length"),
            streamed_equal_greedy=sum(r["streamed_equal"] is True for r in greedy),
            greedy_with_calls=sum(r["streamed_equal"] is not None for r in greedy),
            streamed_equal_sampled=sum(r["streamed_equal"] is True for r in rows if r["temperature"] != 0.0),
            sampled_with_calls=sum(r["streamed_equal"] is not None for r in rows if r["temperature"] != 0.0),
            leaked_markers=sum(r["leaked_markers"] for r in rows),
            mean_pieces_per_call=statistics.mean([p for r in rows for p in r["streamed_pieces"]] or [0]),
        )
    return out


def _decode_rate(client: httpx.Client, body: dict[str, Any]) -> tuple[float | None, int]:
    chat(client, body, False)  # warm: the prompt now sits in the prefix cache for both timed requests
    one = chat(client, {**body, "max_tokens": 1}, False)
    full = chat(client, body, False)
    n = full.completion_tokens or 0
    if one.error or full.error or n < 8 or full.wall_s <= one.wall_s:
        return None, n
    return (n - 1) / (full.wall_s - one.wall_s), n


def measure_decode(
    clients: dict[str, httpx.Client], entries: list[dict[str, Any]], runs: int, max_tokens: int
) -> dict[str, Any]:
    out: dict[str, Any] = {n: {"rows": []} for n in clients}
    k = 0
    for run in range(runs):
        for entry in entries:
            constrained = request_for(entry, max_tokens, 0)  # greedy: the same tokens every run
            free = {**constrained, "tool_choice": "none", "ignore_eos": True}
            for name in ordered(list(clients), k):
                c_rate, c_n = _decode_rate(clients[name], constrained)
                u_rate, u_n = _decode_rate(clients[name], free)
                out[name]["rows"].append(
                    {"tool": entry["tool"]["function"]["name"], "run": run, "constrained_tok_s": c_rate,
                     "constrained_tokens": c_n, "unconstrained_tok_s": u_rate, "unconstrained_tokens": u_n}
                )  # fmt: skip
            k += 1
    for summary in out.values():
        rows = summary["rows"]
        c = [r["constrained_tok_s"] for r in rows if r["constrained_tok_s"]]
        u = [r["unconstrained_tok_s"] for r in rows if r["unconstrained_tok_s"]]
        summary["constrained_tok_s"] = statistics.median(c) if c else None
        summary["unconstrained_tok_s"] = statistics.median(u) if u else None
        summary["measured"] = f"{len(c)}/{len(rows)} constrained, {len(u)}/{len(rows)} unconstrained"
        if c and u:
            summary["ratio"] = summary["constrained_tok_s"] / summary["unconstrained_tok_s"]
    return out


def measure_ttft(
    clients: dict[str, httpx.Client], entries: list[dict[str, Any]], runs: int, repeats: int
) -> dict[str, Any]:
    tools = [e["tool"] for e in entries[:10]]
    out: dict[str, Any] = {n: {"rows": []} for n in clients}
    for run in range(runs):
        for i, name in enumerate(ordered(list(clients), run)):
            # a fresh nonce per system and run: the system turn (and so the declarations after it) is new
            system = f"Session {random.randrange(10**7, 10**8)}-{i}. {SYSTEM}"

            def ask(question: str, client: httpx.Client = clients[name], system: str = system) -> Reply:
                body = {
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                    "tools": tools, "tool_choice": "auto", "max_tokens": 1, "temperature": 0.0, "reasoning_effort": "none",
                }  # fmt: skip
                return chat(client, body, False)

            first = ask(TTFT_QUESTIONS[0])
            again = [ask(TTFT_QUESTIONS[1 + j % (len(TTFT_QUESTIONS) - 1)]) for j in range(repeats)]
            out[name]["rows"].append(
                {"first_s": None if first.error else first.wall_s,
                 "repeat_s": [None if r.error else r.wall_s for r in again],
                 "prompt_tokens": first.prompt_tokens, "first_cached": first.cached_tokens,
                 "repeat_cached": [r.cached_tokens for r in again],
                 "error": first.error or next((r.error for r in again if r.error), None)}
            )  # fmt: skip
    for summary in out.values():
        firsts = [r["first_s"] for r in summary["rows"] if r["first_s"] is not None]
        reps = [x for r in summary["rows"] for x in r["repeat_s"] if x is not None]
        summary["first_s"] = statistics.median(firsts) if firsts else None
        summary["repeat_s"] = statistics.median(reps) if reps else None
        if firsts and reps:
            summary["ratio"] = summary["repeat_s"] / summary["first_s"]
        summary["prompt_tokens"] = summary["rows"][0]["prompt_tokens"] if summary["rows"] else None
    return out


# --------------------------------------------------------------------------- rendering parity
def conversation(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole tool conversation: two calls in one assistant turn, their two results, a follow-up."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Weather in Lisbon, and do we have SKU A-1042 in store 17?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": json.dumps({"city": "Lisbon", "unit": "celsius"}),
                        },
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {
                            "name": "lookup_inventory",
                            "arguments": json.dumps({"sku": "A-1042", "store_id": 17}),
                        },
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp_c": 17.5, "sky": "cloudy"})},
            {"role": "tool", "tool_call_id": "call_2", "content": json.dumps({"units": 3, "aisle": "B"})},
            {"role": "user", "content": "Thanks. Should I bring an umbrella?"},
        ],  # fmt: skip
        "tools": [e["tool"] for e in entries[:10]],
    }


def gguf_template(model: Path) -> str:
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    return str(llama.metadata.get("tokenizer.chat_template", ""))


def standin_render(template: str, request: dict[str, Any], think: bool) -> str:
    """The GGUF's template through jinja2 after llama.cpp's conversions for Gemma 4 (common/chat.cpp):
    arguments strings parsed to objects, and -- for templates without OpenAI ``role: "tool"`` support --
    tool results folded into the calling assistant turn as ``tool_responses`` (parsers/gemma4.cpp)."""
    messages = json.loads(json.dumps(request["messages"]))
    for m in messages:
        if isinstance(m.get("content"), str):
            m["content"] = m["content"].strip()
        for call in m.get("tool_calls") or []:
            if isinstance(call["function"].get("arguments"), str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    if "{#- OpenAI Chat Completions:" not in template:
        folded: list[dict[str, Any]] = []
        i = 0
        while i < len(messages):
            m = messages[i]
            i += 1
            if m["role"] != "assistant" or not m.get("tool_calls"):
                folded.append(m)
                continue
            turn: dict[str, Any] = {"role": "assistant", "tool_calls": m["tool_calls"]}
            responses = []
            while i < len(messages) and messages[i]["role"] == "tool":
                result = messages[i]
                try:
                    response = json.loads(result["content"])
                except (TypeError, json.JSONDecodeError):
                    response = result["content"]
                k = len(responses)
                name = m["tool_calls"][k]["function"]["name"] if k < len(m["tool_calls"]) else ""
                responses.append({"name": name or result.get("tool_call_id", ""), "response": response})
                i += 1
            if responses:
                turn["tool_responses"] = responses
            nxt = messages[i] if i < len(messages) else None
            if nxt and nxt["role"] == "assistant" and not nxt.get("tool_calls") and nxt.get("content"):
                turn["content"] = nxt["content"]
                i += 1
            folded.append(turn)
        messages = folded
    env = jinja2.Environment(loader=jinja2.BaseLoader(), extensions=["jinja2.ext.loopcontrols"])
    env.filters.setdefault("tojson", json.dumps)
    prompt = env.from_string(template).render(
        messages=messages, tools=request["tools"], bos_token="<bos>", eos_token="<eos>",
        enable_thinking=think, add_generation_prompt=True,
    )  # fmt: skip
    if prompt.endswith("<turn|>\n"):  # common_chat_params_init_gemma4 opens the model turn itself then
        prompt += "<|turn>model\n"
    return prompt


def measure_render(targets: dict[str, Target], model: Path, entries: list[dict[str, Any]]) -> dict[str, Any]:
    request = conversation(entries)
    template = gguf_template(model)
    out: dict[str, Any] = {}
    for think in (False, True):
        prompts: dict[str, str] = {}
        # one body for both: edgert reads reasoning_effort, llama-server chat_template_kwargs (and "none")
        body = {
            **request,
            "reasoning_effort": "high" if think else "none",
            "chat_template_kwargs": {"enable_thinking": think},
        }
        llama = targets.get("llama-server")
        if llama is not None:
            prompts["llama-server"] = httpx.post(f"{llama.base_url()}/apply-template", json=body, timeout=60).json()[
                "prompt"
            ]
        edgert = targets.get("edgert")
        source = "jinja2 stand-in"
        if edgert is not None:
            with httpx.Client(transport=edgert.transport(), base_url=edgert.base_url(), timeout=60) as c:
                r = c.post("/apply-template", json=body)
            if r.status_code == 200 and "prompt" in r.json():
                prompts["edgert"], source = r.json()["prompt"], "edgert /apply-template"
        if "edgert" not in prompts:
            prompts["edgert"] = standin_render(template, request, think)
        # llama.cpp drops the template's leading BOS from the text when the tokenizer adds one itself
        # (common/chat.cpp), so the tokens are the same either way: compare without it
        bos = {n: t.startswith("<bos>") for n, t in prompts.items()}
        a, b = (prompts[n].removeprefix("<bos>") if n in prompts else None for n in ("edgert", "llama-server"))
        assert a is not None
        first_diff = None
        if b is not None and a != b:
            first_diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        out["think" if think else "no_think"] = {
            "edgert_source": source,
            "leading_bos": bos,
            "identical": None if b is None else a == b,
            "edgert_chars": len(a),
            "llama_server_chars": None if b is None else len(b),
            "first_difference_at": first_diff,
            "edgert_around": None if first_diff is None else a[max(0, first_diff - 60) : first_diff + 60],
            "llama_server_around": None
            if first_diff is None or b is None
            else b[max(0, first_diff - 60) : first_diff + 60],
            "prompt_edgert": a,
        }
    return out


def measure_refusal(
    model: Path, args: argparse.Namespace, workdir: Path, entries: list[dict[str, Any]]
) -> dict[str, Any]:
    target = EdgertTarget(model, args.ctx, args.threads, 1, workdir / "refusal")
    target.workdir.mkdir(exist_ok=True)
    target.log_path = target.workdir / "edgert.log"
    try:
        target.start()
        with httpx.Client(transport=target.transport(), base_url=target.base_url(), timeout=120) as client:
            body = {**request_for(entries[0], 16, 0)}
            response = client.post("/v1/chat/completions", json=body)
        return {"model": model.name, "status": response.status_code, "body": response.text[:400]}
    finally:
        target.stop()


# --------------------------------------------------------------------------- report
def fmt(x: Any, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def report(result: dict[str, Any]) -> str:
    lines = [f"model `{result['model']}`, threads {result['args']['threads']}, runs {result['args']['runs']}", ""]
    v = result.get("validity") or {}
    if v:
        lines += ["| schema-valid (tool_choice required) | valid | valid streamed | valid without numeric bounds | "
                  "cut off by max_tokens | valid of not cut off | finish tool_calls | "
                  "streamed == whole args, greedy / sampled | markers leaked | pieces / call |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, s in v.items():
            n = s["requests"] or 1
            lines.append(
                f"| {name} | {s['valid']}/{s['requests']} ({100 * s['valid'] / n:.0f} %) | "
                f"{s['valid_streamed']}/{s['requests']} ({100 * s['valid_streamed'] / n:.0f} %) | "
                f"{s['valid_shape']}/{s['requests']} | {s['cut_off']}/{s['requests']} | "
                f"{s['valid_of_complete']}/{s['requests'] - s['cut_off']} | "
                f"{s['finish_tool_calls']}/{s['requests']} | {s['streamed_equal_greedy']}/{s['greedy_with_calls']} / "
                f"{s['streamed_equal_sampled']}/{s['sampled_with_calls']} | "
                f"{s['leaked_markers']} | {s['mean_pieces_per_call']:.1f} |"
            )
        lines.append("")
        for name, s in v.items():
            reasons: dict[str, int] = {}
            for row in s["rows"]:
                for why in (row["invalid"], row["invalid_streamed"]):
                    if why:
                        key = f"{row['tool']}: {why[:90]}"
                        reasons[key] = reasons.get(key, 0) + 1
            if reasons:
                lines.append(f"{name}, invalid replies (tool: first reason, count over whole + streamed):")
                lines += [f"- {k} ×{n}" for k, n in sorted(reasons.items())[:40]]
                lines.append("")
    d = result.get("decode") or {}
    if d:
        names = list(d)
        lines += ["| decode tok/s | constrained | unconstrained | constrained / unconstrained | measured |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name in names:
            s = d[name]
            lines.append(
                f"| {name} | {fmt(s['constrained_tok_s'], 1)} | {fmt(s['unconstrained_tok_s'], 1)} | "
                f"{fmt(s.get('ratio'))}x | {s['measured']} |"
            )
        if "edgert" in d and "llama-server" in d and d["llama-server"]["constrained_tok_s"]:
            e, ls = d["edgert"]["constrained_tok_s"], d["llama-server"]["constrained_tok_s"]
            lines.append(f"| edgert / llama-server constrained | {fmt(e / ls if e else None)}x | | | |")
        lines.append("")
    t = result.get("ttft") or {}
    if t:
        lines += ["| TTFT, 10 tools declared | prompt tokens | first (s) | repeat (s) | repeat / first |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, s in t.items():
            lines.append(
                f"| {name} | {s['prompt_tokens']} | {fmt(s['first_s'], 3)} | {fmt(s['repeat_s'], 3)} | "
                f"{fmt(s.get('ratio'))}x |"
            )
        lines.append("")
    r = result.get("render") or {}
    for key, s in r.items():
        lines.append(
            f"rendering parity ({key.replace('_', ' ')}): edgert ({s['edgert_source']}) vs llama-server "
            f"/apply-template: {'identical' if s['identical'] else 'DIFFERENT at char ' + str(s['first_difference_at'])}"
            f" ({s['edgert_chars']} / {s['llama_server_chars']} chars, compared without a leading <bos>;"
            f" leading <bos>: {s['leading_bos']})"
        )
    ref = result.get("refusal")
    if ref:
        lines.append(f"tools on `{ref['model']}` (no tool template): edgert HTTP {ref['status']}: {ref['body'][:160]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF with a Gemma 4 chat template")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="rounds over the schemas (run 0 greedy, then sampled)")
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--systems", default="edgert,llama-server", help="edgert and/or llama-server")
    p.add_argument("--phases", default="validity,decode,ttft,render,refusal")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of the validity requests")
    p.add_argument("--decode-tokens", type=int, default=64, help="max_tokens of the decode-rate requests")
    p.add_argument("--decode-schemas", type=int, default=6, help="how many schemas the decode phase uses")
    p.add_argument("--ttft-repeats", type=int, default=3)
    p.add_argument("--ttft-runs", type=int, help="first-vs-repeat rounds (default: --runs)")
    p.add_argument("--schemas", type=Path, default=SCHEMAS)
    p.add_argument("--refusal-model", type=Path, default=DEFAULT_REFUSAL_MODEL)
    p.add_argument("--bin-dir", help="llama.cpp tools (default: benchmarks/build_llama_tools.sh)")
    p.add_argument(
        "--edgert-src",
        help="directory holding an edgert/ package to serve (PYTHONPATH), e.g. `git archive HEAD edgert` unpacked; "
        "default: the working tree",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--report", type=Path, help="print the tables of a JSON result and exit")
    args = p.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return
    if not args.model:
        p.error("--model is required")
    random.seed(args.seed)
    if args.edgert_src:
        serving_bench.EDGERT_SRC = str(Path(args.edgert_src).resolve())
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    model = Path(args.model).expanduser().resolve()
    entries = json.loads(args.schemas.read_text())["tools"]
    phases = {x.strip() for x in args.phases.split(",")}
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="edgert-tool-bench-"))
    targets: dict[str, Target] = {}
    for name in names:
        if name == "edgert":
            targets[name] = EdgertTarget(model, args.ctx, args.threads, args.parallel, workdir)
        elif name == "llama-server":
            targets[name] = LlamaServerToolsTarget(
                model, args.ctx, args.threads, args.parallel, workdir, bin_dir=bench_bin_dir(args.bin_dir)
            )
        else:
            p.error(f"unknown system {name!r}")
    result: dict[str, Any] = {
        "model": str(model), "model_bytes": model.stat().st_size, "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine_info(), "git": _git_describe(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": loadavg(),
    }  # fmt: skip
    clients: dict[str, httpx.Client] = {}
    try:
        for name, target in targets.items():
            result.setdefault("ready_s", {})[name] = target.start()
            clients[name] = httpx.Client(transport=target.transport(), base_url=target.base_url(), timeout=600)
            # page the weights in (mmap) and build what the first request would: never measured
            chat(clients[name], {**request_for(entries[0], 16, 0), "tool_choice": "none"}, False)
        if "validity" in phases:
            result["validity"] = measure_validity(clients, entries, args.runs, args.max_tokens)
        if "decode" in phases:
            result["decode"] = measure_decode(clients, entries[: args.decode_schemas], args.runs, args.decode_tokens)
        if "ttft" in phases:
            result["ttft"] = measure_ttft(clients, entries, args.ttft_runs or args.runs, args.ttft_repeats)
        if "render" in phases:
            result["render"] = measure_render(targets, model, entries)
    finally:
        for client in clients.values():
            client.close()
        for target in targets.values():
            target.stop()
    if "refusal" in phases and "edgert" in targets and args.refusal_model.exists():
        result["refusal"] = measure_refusal(args.refusal_model, args, workdir, entries)
    result["loadavg_end"] = loadavg()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    with contextlib.suppress(OSError):
        os.rmdir(workdir)


if __name__ == "__main__":
    main()
