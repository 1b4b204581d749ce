"""edgert.chat.tool_grammar: every grammar compiles in llama.cpp, and what it lets a model write is a valid call.

The generation tests sample from the random-weight tiny Gemma 4 under the grammar (llama.cpp's own grammar
sampler masks the logits), convert each call to JSON with the parser the server uses and validate it with
jsonschema. Random weights give every token about the same chance, so a string would rarely meet its closing
``<|"|>`` among 8192 tokens: the sampler adds a bias to the closing tokens (growing with each step) so
calls end within the context. The bias only re-weights what the grammar allowed; it cannot make an invalid
call valid.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llama_cpp
import numpy as np
import pytest

from edgert.chat.gemma4_output import arguments_json
from edgert.chat.tool_grammar import NOT_ENFORCED, ToolSpec, check_parameters_schema, tool_call_grammar
from edgert.errors import BadRequestError

MODEL = Path(__file__).parent.parent / "fixtures" / "tiny-gemma4.gguf"
TOOL_CALL, STRING_DELIMITER, TOOL_CALL_END, CHANNEL_END = 48, 52, 49, 101
# Tokens that close what the grammar opened: <|"|>, ':' (a free-form key), '}', ']', <tool_call|>, <channel|>.
CLOSERS = {STRING_DELIMITER: 7.0, 6447: 6.0, 6443: 2.0, 6502: 2.0, TOOL_CALL_END: 2.0, CHANNEL_END: 7.0}
PROMPT = "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "where"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
    },
    "required": ["city"],
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": WEATHER,
    "no_arguments": {},
    "scalars": {
        "type": "object",
        "properties": {
            "a_bool": {"type": "boolean"},
            "b_number": {"type": "number"},
            "c_null": {"type": "null"},
            "d_const": {"const": {"k": [1, "x", None]}},
        },
        "required": ["a_bool", "b_number", "c_null", "d_const"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "order": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "minLength": 2, "maxLength": 4},
                    "qty": {"type": "integer"},
                    "gift": {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]},
                },
                "required": ["qty", "sku"],
            }
        },
        "required": ["order"],
    },
    "enums": {
        "type": "object",
        "properties": {"mode": {"enum": ["on", "off", 3, 2.5, True, None, ["a"], {"b": 1}]}, "n": {"enum": [1, 2]}},
        "required": ["mode", "n"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
                    "required": ["id"],
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["items"],
    },
    "optional_keys": {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in ("a", "b", "c", "d", "e")},
        "required": ["c"],
    },
    "nullable": {
        "type": "object",
        "properties": {
            "x": {"type": ["string", "null"]},
            "y": {"type": "integer", "nullable": True},
            "z": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        },
        "required": ["x", "y", "z"],
    },
    "any_of": {
        "type": "object",
        "properties": {
            "target": {
                "oneOf": [
                    {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
                    {"type": "string", "maxLength": 3},
                    {"type": "array", "items": {"type": "number"}, "maxItems": 2},
                ]
            }
        },
        "required": ["target"],
    },
    "ref_recursive": {
        "type": "object",
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["v"],
                "additionalProperties": False,
            },
            "color": {"enum": ["red", "green"]},
        },
        "properties": {"tree": {"$ref": "#/$defs/node"}, "color": {"$ref": "#/$defs/color"}},
        "required": ["tree", "color"],
    },
    "free_form": {
        "type": "object",
        "properties": {"meta": {"type": "object"}, "anything": {}},
        "required": ["meta", "anything"],
    },
    "extra_keys": {
        "type": "object",
        "properties": {"ab": {"type": "string"}, "abc": {"type": "integer"}},
        "required": ["abc"],
        "additionalProperties": {"type": "boolean"},
    },
}


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    params = llama_cpp.llama_model_default_params()
    loaded = llama_cpp.llama_model_load_from_file(str(MODEL).encode(), params)
    assert loaded
    yield loaded
    llama_cpp.llama_model_free(loaded)


def compiles(vocab: Any, gbnf: str) -> bool:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def test_every_grammar_compiles_in_llama_cpp() -> None:
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    vocab_model = llama_cpp.llama_model_load_from_file(str(MODEL).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(vocab_model)
    try:
        assert not compiles(vocab, "root ::= undefined-rule")  # the check itself can fail
        tools = [ToolSpec(name, schema) for name, schema in SCHEMAS.items()]
        for min_calls, max_calls, thought in [(1, 1, False), (0, None, True), (2, 4, False)]:
            assert compiles(vocab, tool_call_grammar(tools, min_calls=min_calls, max_calls=max_calls, thought=thought))
        for name, schema in SCHEMAS.items():
            assert compiles(vocab, tool_call_grammar([ToolSpec(name, schema)]))
    finally:
        llama_cpp.llama_model_free(vocab_model)


def generate(model: Any, gbnf: str, seed: int, *, max_tokens: int = 480) -> str:
    """Sample under ``gbnf`` at temperature 1.3 until an end-of-generation token; the text, markers included."""
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    ctx_params = llama_cpp.llama_context_default_params()
    ctx_params.n_ctx, ctx_params.n_threads, ctx_params.n_threads_batch, ctx_params.swa_full = 512, 1, 1, False
    ctx = llama_cpp.llama_init_from_model(model, ctx_params)
    grammar = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    assert ctx and grammar
    rng = np.random.default_rng(seed)
    candidates = np.zeros(n_vocab, dtype=[("id", "i4"), ("logit", "f4"), ("p", "f4")])
    closer_ids = np.array(list(CLOSERS), dtype=np.int64)
    closer_bias = np.array(list(CLOSERS.values()), dtype=np.float32)
    pieces = []
    try:
        tokens = tokenize(vocab, PROMPT)
        for step in range(max_tokens):
            batch = (llama_cpp.llama_token * len(tokens))(*tokens)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(batch, len(tokens))) == 0
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            candidates["id"], candidates["logit"], candidates["p"] = np.arange(n_vocab), logits, 0.0
            cur_p = llama_cpp.llama_token_data_array(
                data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab, selected=-1, sorted=False
            )
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cur_p))
            scores = candidates["logit"].astype(np.float64)
            scores[closer_ids] += closer_bias + step / 20
            scores /= 1.3
            allowed = np.isfinite(scores)
            assert allowed.any()
            probs = np.where(allowed, np.exp(scores - scores[allowed].max()), 0.0)
            token = int(rng.choice(n_vocab, p=probs / probs.sum()))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                return "".join(pieces)
            llama_cpp.llama_sampler_accept(grammar, token)
            pieces.append(piece(vocab, token))
            tokens = [token]
        raise AssertionError(f"no end within {max_tokens} tokens: {''.join(pieces)!r}")
    finally:
        llama_cpp.llama_sampler_free(grammar)
        llama_cpp.llama_free(ctx)


def tokenize(vocab: Any, text: str) -> list[int]:
    raw = text.encode()
    out = (llama_cpp.llama_token * (len(raw) + 8))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), out, len(out), False, True)
    return list(out[:n])


def piece(vocab: Any, token: int) -> str:
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[:n].decode("utf-8", errors="surrogateescape")


CALL = re.compile(r"<\|tool_call>call:([A-Za-z0-9_.\-]+)(\{.*?\})<tool_call\|>", re.DOTALL)


def calls(text: str) -> list[tuple[str, Any]]:
    """Split the generated text into (name, arguments); the whole text must be calls."""
    found = []
    # Byte tokens may spell invalid UTF-8 (llama.cpp's grammar reads code points, not UTF-8 validity): the
    # server decodes with replacement characters, which are string content like any other.
    rest = text.encode("utf-8", errors="surrogateescape").decode(errors="replace")
    while rest:
        assert rest.startswith("<|tool_call>call:"), rest
        name = rest[len("<|tool_call>call:") : rest.index("{")]
        end = call_end(rest)
        found.append((name, json.loads(arguments_json(rest[len("<|tool_call>call:") + len(name) : end]))))
        rest = rest[end + len("<tool_call|>") :]
    return found


def call_end(text: str) -> int:
    """Where ``<tool_call|>`` ends the first call: outside any string."""
    inside, i = False, 0
    while True:
        if text.startswith('<|"|>', i):
            inside, i = not inside, i + 5
        elif not inside and text.startswith("<tool_call|>", i):
            return i
        else:
            i += 1


def for_jsonschema(schema: Any) -> Any:
    """The schema with OpenAPI's ``nullable: true`` spelled as JSON Schema (jsonschema ignores nullable)."""
    if isinstance(schema, list):
        return [for_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: for_jsonschema(v) for k, v in schema.items() if k != "nullable"}
    return {"anyOf": [out, {"type": "null"}]} if schema.get("nullable") else out


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_generated_calls_validate(model: Any, name: str) -> None:
    tools = [ToolSpec(name, SCHEMAS[name]), ToolSpec("other_tool", WEATHER)]
    gbnf = tool_call_grammar(tools, max_calls=2)
    seen = set()
    for seed in range(6):
        made = calls(generate(model, gbnf, seed))
        assert 1 <= len(made) <= 2
        for called, arguments in made:
            assert called in {name, "other_tool"}
            schema = SCHEMAS[name] if called == name else WEATHER
            jsonschema.validate(arguments, for_jsonschema(schema) or {"type": "object", "maxProperties": 0})
            seen.add(json.dumps(arguments, sort_keys=True))
    assert len(seen) > 1 or name == "no_arguments"  # the sampler explored, not one fixed call


def test_thought_then_call(model: Any) -> None:
    gbnf = tool_call_grammar([ToolSpec("get_weather", WEATHER)], thought=True)
    thoughts = 0
    for seed in range(6):
        text = generate(model, gbnf, seed)
        if text.startswith("<|channel>thought\n"):
            thoughts += 1
            text = text.partition("<channel|>")[2]
        ((called, arguments),) = calls(text)
        assert called == "get_weather"
        jsonschema.validate(arguments, WEATHER)
    assert 0 < thoughts < 6  # the thought is optional: some replies think first, some call at once


def test_calls_use_sorted_compact_keys_like_the_template() -> None:
    gbnf = tool_call_grammar([ToolSpec("f", SCHEMAS["optional_keys"])])
    # Each optional key may be left out, but the others keep their order: a, b, c (required), d, e.
    assert '"c:" g-int ("," "d:" g-int)? ("," "e:" g-int)?' in gbnf
    assert gbnf.count("| ") >= 2  # a and b may each be the first key


def test_strings_may_end_in_a_prefix_of_the_delimiter_but_never_contain_it(model: Any) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model)
    gbnf = tool_call_grammar([ToolSpec("f", {"type": "object", "properties": {"s": {"type": "string"}}})])
    ok = ['{s:<|"|>a<|<|"|>}', '{s:<|"|><|"<|"|>}', '{s:<|"|><|"|<|"|>}', '{s:<|"|>a\n"}<|"|>}', "{}"]
    for args in ok:
        assert accepts(vocab, gbnf, f"<|tool_call>call:f{args}<tool_call|>"), args
    assert not accepts(vocab, gbnf, '<|tool_call>call:f{s:<|"|>a<|"|>b<|"|>}<tool_call|>')
    assert not accepts(vocab, gbnf, "<|tool_call>call:g{}<tool_call|>")  # undeclared function


def accepts(vocab: Any, gbnf: str, text: str | list[int], *, lazy: bool = False) -> bool:
    """Whether llama.cpp's grammar accepts ``text`` (or tokens) to the end; ``lazy``: triggered by <|tool_call>."""
    if lazy:
        triggers = (llama_cpp.llama_token * 1)(TOOL_CALL)
        grammar = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            vocab, gbnf.encode(), b"root", None, 0, triggers, 1
        )
    else:
        grammar = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    candidates = np.zeros(n_vocab, dtype=[("id", "i4"), ("logit", "f4"), ("p", "f4")])
    try:
        for token in [
            *(tokenize(vocab, text) if isinstance(text, str) else text),
            1,
        ]:  # then <eos>: allowed only once the grammar is complete
            candidates["id"], candidates["logit"] = np.arange(n_vocab), 0.0
            cur_p = llama_cpp.llama_token_data_array(
                data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab, selected=-1, sorted=False
            )
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(cur_p))
            if not np.isfinite(candidates["logit"][token]):
                return False
            if token != 1:
                llama_cpp.llama_sampler_accept(grammar, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(grammar)


def test_lazy_grammar_lets_text_through_until_the_call_token(model: Any) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model)
    gbnf = tool_call_grammar([ToolSpec("get_weather", WEATHER)])
    text = 'Let me check {weird: text} first.<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
    assert accepts(vocab, gbnf, text, lazy=True)
    assert not accepts(vocab, gbnf, text.replace('Oslo<|"|>}', 'Oslo<|"|>,x:1}'), lazy=True)
    assert not accepts(vocab, gbnf, text, lazy=False)  # unlazy, the call must come first


def call_text(args: str) -> str:
    return f"<|tool_call>call:f{args}<tool_call|>"


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        (  # string lengths count characters, and a delimiter prefix inside counts too
            {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 3}}},
            ['{s:<|"|>ab<|"|>}', '{s:<|"|>a<|<|"|>}', '{s:<|"|>äöü<|"|>}'],
            ['{s:<|"|>a<|"|>}', '{s:<|"|>abcd<|"|>}', '{s:<|"|>a<|"|<|"|>}'],
        ),
        (  # item counts
            {
                "type": "object",
                "properties": {"v": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}},
            },
            ["{v:[1]}", "{v:[-1,20]}"],
            ["{v:[]}", "{v:[1,2,3]}", "{v:[1.5]}", "{v:[01]}"],
        ),
        (  # required keys, sorted order, no key twice, nothing undeclared
            SCHEMAS["optional_keys"],
            ["{c:1}", "{a:1,c:2}", "{a:1,b:2,c:3,d:4,e:5}", "{c:3,e:5}"],
            ["{}", "{a:1}", "{c:1,a:2}", "{c:1,c:2}", "{c:1,f:2}", "{,c:1}", "{c:1,}", "{c: 1}"],
        ),
        (  # extra keys after the declared ones, never a declared key again
            SCHEMAS["extra_keys"],
            ['{ab:<|"|>x<|"|>,abc:1}', "{abc:1,abx:true}", "{abc:1,a:true,abcd:false}"],
            ["{abc:1,ab:true}", "{abc:1,abc:true}", "{abc:1,x:1}", "{abc:1,:true}"],
        ),
        (  # enums and consts are exact Gemma values
            SCHEMAS["enums"],
            [
                '{mode:<|"|>on<|"|>,n:1}',
                "{mode:2.5,n:2}",
                "{mode:null,n:1}",
                '{mode:[<|"|>a<|"|>],n:1}',
                "{mode:{b:1},n:1}",
            ],
            ['{mode:<|"|>of<|"|>,n:1}', "{mode:true,n:3}", "{mode:false,n:1}", "{mode:2,n:1}"],
        ),
        (  # a $ref that recurses through an array
            SCHEMAS["ref_recursive"],
            ['{color:<|"|>red<|"|>,tree:{kids:[{kids:[],v:2},{v:3}],v:1}}'],
            ['{color:<|"|>red<|"|>,tree:{kids:[{}],v:1}}', '{color:<|"|>blue<|"|>,tree:{v:1}}'],
        ),
    ],
)
def test_grammar_accepts_exactly_the_valid_calls(model: Any, schema: Any, good: list[str], bad: list[str]) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model)
    gbnf = tool_call_grammar([ToolSpec("f", schema)])
    for args in good:
        assert accepts(vocab, gbnf, call_text(args)), args
        jsonschema.validate(json.loads(arguments_json(args)), schema)  # what the grammar accepts is valid
    for args in bad:
        assert not accepts(vocab, gbnf, call_text(args)), args


def test_max_calls_and_min_calls(model: Any) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model)
    one = call_text("{}")
    gbnf = tool_call_grammar([ToolSpec("f", {})], min_calls=2, max_calls=3)
    assert [accepts(vocab, gbnf, one * n) for n in (1, 2, 3, 4)] == [False, True, True, False]
    unbounded = tool_call_grammar([ToolSpec("f", {})], max_calls=None)
    assert accepts(vocab, unbounded, one * 7)


def test_keywords_that_only_narrow_values_are_accepted_and_not_enforced() -> None:
    plain = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}
    narrowed = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 1, "maximum": 100000, "multipleOf": 3},  # too wide to list
            "s": {"type": "string", "pattern": "^[a-z]+$", "format": "date"},
        },
        "minProperties": 1,
    }
    assert {"minimum", "maximum", "multipleOf", "pattern", "format", "minProperties"} <= NOT_ENFORCED
    check_parameters_schema("f", narrowed)
    assert tool_call_grammar([ToolSpec("f", narrowed)]) == tool_call_grammar([ToolSpec("f", plain)])


@pytest.mark.parametrize(
    ("name", "schema", "says"),
    [
        ("f", {"type": "string"}, "object schema"),
        ("f", ["type", "object"], "object schema"),
        ("f", {"type": "array", "items": {}}, "object schema"),
        ("", {}, "tool name ''"),
        ("has space", {}, "tool name 'has space'"),
        ("f", {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "goes nowhere"),
        ("f", {"type": "object", "properties": {"a": {"$ref": "https://x.test/s.json"}}}, "not local"),
        (
            "f",
            {
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/a"}},
                "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
            },
            "refers to itself",
        ),
        ("f", {"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "not cannot be enforced"),
        ("f", {"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
        ("f", {"type": "object", "properties": {"a": {"type": "array", "items": [{}, {}]}}}, "tuple items"),
        ("f", {"type": "object", "properties": {"a:b": {"type": "string"}}}, "key 'a:b'"),
        ("f", {"type": "object", "properties": {"a": {"enum": ['x<|"|>y']}}}, "cannot contain"),
        ("f", {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5000}}}, "maxLength above"),
        ("f", {"type": "object", "properties": {"a": {"type": "strin"}}}, "unknown type 'strin'"),
        ("f", {"type": "object", "properties": {"a": {"type": "integer", "enum": ["x"]}}}, "no value satisfies"),
        ("f", {"type": "object", "properties": {"a": False}, "required": ["a"]}, "required key 'a'"),
        ("f", {"type": "object", "properties": {"a": {"type": "object", "allOf": [{}, {}]}}}, "together"),
    ],
)
def test_unusable_tools_are_refused_naming_the_tool(name: str, schema: Any, says: str) -> None:
    for attempt in (lambda: check_parameters_schema(name, schema), lambda: tool_call_grammar([ToolSpec(name, schema)])):
        with pytest.raises(BadRequestError) as caught:
            attempt()
        assert says in caught.value.message
        assert caught.value.param == "tools"
        assert name == "" or repr(name) in caught.value.message


def test_two_tools_with_one_name_are_refused() -> None:
    with pytest.raises(BadRequestError, match="share one name"):
        tool_call_grammar([ToolSpec("f", {}), ToolSpec("f", WEATHER)])


def test_call_markers_must_be_the_special_tokens_not_their_spelling(model: Any) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model)
    gbnf = tool_call_grammar([ToolSpec("f", {})])
    assert accepts(vocab, gbnf, call_text("{}"))
    spelled = tokenize(vocab, "<|tool_call>")  # parse_special: the one token
    as_text = [token for char in "<|tool_call>" for token in tokenize(vocab, char)]  # spelled char by char
    assert len(spelled) == 1 and len(as_text) > 1
    rest = tokenize(vocab, "call:f{}<tool_call|>")
    assert accepts(vocab, gbnf, spelled + rest)
    assert not accepts(vocab, gbnf, as_text + rest)


def test_a_too_short_string_cannot_be_closed_by_the_delimiter_token(model: Any) -> None:
    """llama.cpp matches a token element mid-token; with the delimiter as a token element this aborted the process."""
    vocab = llama_cpp.llama_model_get_vocab(model)
    gbnf = tool_call_grammar(
        [ToolSpec("f", {"type": "object", "properties": {"s": {"type": "string", "minLength": 2}}})]
    )
    assert not accepts(vocab, gbnf, call_text('{s:<|"|>a<|"|>}'))
    assert accepts(vocab, gbnf, call_text('{s:<|"|>ab<|"|>}'))


@pytest.mark.parametrize(
    ("bounds", "good", "bad"),
    [
        ({"type": "integer", "minimum": 1, "maximum": 12}, ["1", "7", "12"], ["0", "13", "-1", "01", "1.5"]),
        ({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3}, ["1", "2"], ["0", "3"]),
        ({"type": "integer", "minimum": 0}, ["0", "12345"], ["-1", "-0"]),
        ({"type": "integer", "minimum": 1}, ["1", "40"], ["0", "-3"]),
        ({"type": "integer", "maximum": -1}, ["-1", "-99"], ["0", "5"]),
        ({"type": "number", "minimum": -90, "maximum": 90}, ["-90", "-89.5", "0", "-0.25", "45.125", "90", "90.0"],
         ["-90.5", "90.01", "91", "-91", "1e2"]),
        ({"type": "number", "minimum": 0, "maximum": 1}, ["0", "0.75", "1", "1.00"], ["1.5", "-0.1", "2"]),
        ({"type": "number", "minimum": 2, "maximum": 5}, ["2", "2.5", "4.99", "5"], ["1.9", "5.5", "6"]),
        ({"type": "number", "minimum": -5, "maximum": -2}, ["-2", "-2.5", "-4.9", "-5"], ["-1.5", "-5.5", "0"]),
        ({"type": "number", "minimum": 0}, ["0", "3.5", "2e5"], ["-1", "-0.5"]),
    ],
)  # fmt: skip
def test_small_numeric_ranges_are_enforced(model: Any, bounds: dict[str, Any], good: list[str], bad: list[str]) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model)
    schema = {"type": "object", "properties": {"v": bounds}, "required": ["v"]}
    gbnf = tool_call_grammar([ToolSpec("f", schema)])
    for value in good:
        assert accepts(vocab, gbnf, call_text(f"{{v:{value}}}")), value
        jsonschema.validate({"v": json.loads(value)}, schema)
    for value in bad:
        assert not accepts(vocab, gbnf, call_text(f"{{v:{value}}}")), value


def test_bounds_no_value_satisfies_are_refused() -> None:
    schema = {"type": "object", "properties": {"v": {"type": "integer", "minimum": 5, "maximum": 4}}}
    with pytest.raises(BadRequestError, match="no integer"):
        check_parameters_schema("f", schema)
