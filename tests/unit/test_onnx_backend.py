"""The onnxruntime-genai backend on the committed tiny Gemma 3 ONNX fixture (real library, no mocks)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime_genai", reason="needs the [onnx] extra")

from edgert.engine.base import LoadOptions, SamplingParams
from edgert.engine.onnx import OnnxBackend, OnnxSequence, available_providers, validate_model_folder
from edgert.errors import BadRequestError, EngineError, ModelFileError
from edgert.serving.prompt import ChatFormatter

FOLDER = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-gemma3-onnx"
REFERENCE = json.loads((FOLDER / "reference.json").read_text(encoding="utf-8"))
CASES: list[dict[str, Any]] = REFERENCE["cases"]
N_REF = REFERENCE["max_new_tokens"]
GREEDY = SamplingParams(temperature=0.0)
OPTIONS = LoadOptions(n_ctx=2048, n_seq_max=4, n_batch=256, n_ubatch=256, n_threads=1, n_threads_batch=1)


@pytest.fixture(scope="module")
def backend() -> Iterator[OnnxBackend]:
    b = OnnxBackend(FOLDER, OPTIONS)
    yield b
    b.close()


@pytest.fixture(autouse=True)
def _no_leaked_generators(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "backend" in request.fixturenames:
        assert request.getfixturevalue("backend").active == 0, "a test left a generator running"


def run(backend: OnnxBackend, prompt: list[int], n: int, params: SamplingParams = GREEDY) -> list[tuple[int, bytes]]:
    handle = backend.start(prompt, params, len(prompt) + n)
    try:
        return [backend.next_token(handle) for _ in range(n)]
    finally:
        backend.release(handle)


def until_eog(backend: OnnxBackend, prompt: list[int], limit: int, params: SamplingParams) -> list[int]:
    handle = backend.start(prompt, params, len(prompt) + limit)
    tokens: list[int] = []
    try:
        while len(tokens) < limit:
            token, _ = backend.next_token(handle)
            if backend.is_end_of_generation(token):
                break
            tokens.append(token)
    finally:
        backend.release(handle)
    return tokens


def text_of(backend: OnnxBackend, tokens: list[int]) -> str:
    return b"".join(backend.token_pieces(tokens)).decode("utf-8")


# ------------------------------------------------------------------ validation
def broken_copy(tmp_path: Path, edit: Any) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(FOLDER, folder)
    config_path = folder / "genai_config.json"
    config = json.loads(config_path.read_text())
    edit(folder, config)
    if config_path.exists() and config:
        config_path.write_text(json.dumps(config))
    return folder


def _set_type(value: str) -> Any:
    return lambda folder, config: config["model"].__setitem__("type", value)


def _set_provider(name: str) -> Any:
    def edit(folder: Path, config: dict[str, Any]) -> None:
        config["model"]["decoder"]["session_options"]["provider_options"] = [{name: {}}]

    return edit


def _remove(name: str) -> Any:
    def edit(folder: Path, config: dict[str, Any]) -> None:
        (folder / name).unlink()
        if name == "genai_config.json":
            config.clear()

    return edit


def _garble(folder: Path, config: dict[str, Any]) -> None:
    (folder / "genai_config.json").write_text('{"model": {"type": ')
    config.clear()


DEFECTS = {
    "missing-config": (_remove("genai_config.json"), "missing genai_config.json"),
    "unreadable-json": (_garble, "genai_config.json is unreadable"),
    "vision-architecture": (_set_type("gemma3"), "unsupported architecture 'gemma3'"),
    "unknown-architecture": (_set_type("gemma4"), "unsupported architecture 'gemma4'"),
    "unknown-provider": (_set_provider("quantum"), "unknown execution provider 'quantum'"),
    "missing-model": (_remove("model.onnx"), "missing model.onnx"),
    "missing-tokenizer": (_remove("tokenizer.json"), "missing tokenizer.json"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_validation_names_the_folder_and_the_defect_in_one_line(tmp_path: Path, defect: str) -> None:
    edit, expected = DEFECTS[defect]
    folder = broken_copy(tmp_path, edit)
    with pytest.raises(ModelFileError) as caught:
        validate_model_folder(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert str(folder) in message
    assert expected in message
    with pytest.raises(ModelFileError):  # the backend validates before it loads anything
        OnnxBackend(folder, OPTIONS)


def test_a_provider_this_build_lacks_is_refused(tmp_path: Path) -> None:
    lacking = next((p for p in ("cuda", "dml", "qnn", "openvino", "webgpu") if p not in available_providers()), None)
    if lacking is None:
        pytest.skip("this onnxruntime-genai build has every provider")
    folder = broken_copy(tmp_path, _set_provider(lacking))
    with pytest.raises(ModelFileError, match=f"needs execution provider '{lacking}'.*available here: cpu"):
        validate_model_folder(folder)


def test_validation_reads_the_config() -> None:
    found = validate_model_folder(FOLDER)
    assert found.architecture == "gemma3_text"
    assert (found.context_length, found.vocab_size, found.sliding_window) == (2048, 1024, 64)
    assert found.eos_token_ids == (1, 106)
    assert found.providers == ()
    assert found.model_file == FOLDER / "model.onnx"
    assert 500_000 < found.size_bytes < 4_000_000


# ------------------------------------------------------------------ model info and prompts
def test_model_info(backend: OnnxBackend) -> None:
    info = backend.info
    assert info.architecture == "gemma3_text"
    assert (info.n_ctx, info.n_ctx_train, info.n_seq_max, info.n_swa, info.n_vocab) == (2048, 2048, 4, 0, 1024)
    assert (info.bos_token, info.eos_token, info.add_bos) == ("<bos>", "<eos>", False)
    config = json.loads((FOLDER / "tokenizer_config.json").read_text())
    assert info.chat_template == config["chat_template"]
    assert info.metadata["format"] == "onnx-genai"


def test_context_is_capped_by_the_configured_n_ctx() -> None:
    small = OnnxBackend(FOLDER, LoadOptions(256, 2, 256, 256, 1, 1))
    try:
        assert (small.info.n_ctx, small.info.n_ctx_train, small.info.n_seq_max) == (256, 2048, 2)
    finally:
        small.close()


def test_edgert_renders_the_models_template_like_transformers(backend: OnnxBackend) -> None:
    assert backend.info.chat_template is not None
    formatter = ChatFormatter(backend.info.chat_template, bos_token="<bos>", eos_token="<eos>")
    for case in CASES:
        assert formatter.render(case["messages"]) == case["prompt"]


def test_tokenizer_matches_the_reference(backend: OnnxBackend) -> None:
    for case in CASES:
        assert backend.tokenize(case["prompt"], add_special=False, parse_special=True) == case["prompt_ids"]


def test_tokenize_special_handling(backend: OnnxBackend) -> None:
    assert backend.tokenize("<bos>hi", add_special=False, parse_special=True)[0] == 2
    plain = backend.tokenize("<bos>hi<end_of_turn>", add_special=False, parse_special=False)
    assert 2 not in plain and 106 not in plain
    assert text_of(backend, plain) == "<bos>hi<end_of_turn>"
    assert backend.tokenize("hi", add_special=True, parse_special=True)[0] == 2
    assert backend.tokenize("<bos>hi", add_special=True, parse_special=True).count(2) == 1


def test_end_of_generation_tokens(backend: OnnxBackend) -> None:
    assert backend.is_end_of_generation(1) and backend.is_end_of_generation(106)
    assert not backend.is_end_of_generation(2) and not backend.is_end_of_generation(117)


# ------------------------------------------------------------------ generation
@pytest.mark.parametrize("index", range(len(CASES)))
def test_greedy_parity_with_transformers(backend: OnnxBackend, index: int) -> None:
    case = CASES[index]
    tokens = [token for token, _ in run(backend, case["prompt_ids"], N_REF)]
    assert tokens == case["greedy_ids"]


def test_interleaved_generators_match_solo_runs(backend: OnnxBackend) -> None:
    prompts = [case["prompt_ids"] for case in CASES] + [CASES[0]["prompt_ids"]]
    handles = [backend.start(p, GREEDY, len(p) + N_REF) for p in prompts]
    assert backend.active == 4
    outputs: list[list[int]] = [[] for _ in handles]
    try:
        for _ in range(N_REF):
            for handle, out in zip(handles, outputs, strict=True):
                out.append(backend.next_token(handle)[0])
    finally:
        for handle in handles:
            backend.release(handle)
    expected = [case["greedy_ids"] for case in CASES] + [CASES[0]["greedy_ids"]]
    assert outputs == expected


def test_streamed_pieces_are_whole_utf8_characters(backend: OnnxBackend) -> None:
    text = "Grüße, 日本 😀 ok"
    tokens = backend.tokenize(text, add_special=False, parse_special=True)
    pieces = backend.token_pieces(tokens)
    assert len(pieces) == len(tokens)
    for piece in pieces:
        piece.decode("utf-8")  # strict: no piece ends inside a character
    assert b"".join(pieces).decode("utf-8") == text
    assert b"\xf0\x9f\x98\x80" in pieces  # the emoji's four byte tokens arrive as one piece
    assert backend.token_pieces([2, 105, 106, 1]) == [b""] * 4  # special tokens stream nothing


def test_generated_pieces_decode_strictly(backend: OnnxBackend) -> None:
    # The random model emits byte-fallback tokens, including stray UTF-8 continuation bytes.
    for case in CASES:
        steps = run(backend, case["prompt_ids"], 64, SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=7))
        for _, piece in steps:
            piece.decode("utf-8")


def test_seeded_sampling_is_reproducible(backend: OnnxBackend) -> None:
    prompt = CASES[1]["prompt_ids"]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    first = run(backend, prompt, 16, params)
    assert run(backend, prompt, 16, params) == first
    others = [run(backend, prompt, 16, SamplingParams(temperature=0.9, seed=s)) for s in (1, 2, 3)]
    assert any(other != first for other in others)


def test_repetition_penalty_changes_a_looping_output(backend: OnnxBackend) -> None:
    prompt = CASES[2]["prompt_ids"]  # greedy loops on two tokens
    looping = [t for t, _ in run(backend, prompt, N_REF)]
    penalised = [t for t, _ in run(backend, prompt, N_REF, SamplingParams(temperature=0.0, repeat_penalty=1.8))]
    assert penalised != looping
    assert len(set(penalised)) > len(set(looping))


def test_short_max_length_on_a_sliding_window_model(backend: OnnxBackend) -> None:
    # onnxruntime-genai needs max_length >= the sliding window (64) on CPU; the backend pads it.
    case = CASES[1]
    handle = backend.start(case["prompt_ids"], GREEDY, len(case["prompt_ids"]) + 2)
    try:
        assert [backend.next_token(handle)[0] for _ in range(2)] == case["greedy_ids"][:2]
    finally:
        backend.release(handle)


# ------------------------------------------------------------------ JSON mode
CLOSED_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("index", range(len(CASES)))
def test_json_schema_output_parses_and_conforms(backend: OnnxBackend, index: int) -> None:
    params = SamplingParams(temperature=0.0, json_mode="schema", json_schema=json.dumps(CLOSED_SCHEMA))
    tokens = until_eog(backend, CASES[index]["prompt_ids"], 64, params)
    value = json.loads(text_of(backend, tokens))
    assert set(value) == {"ok", "n"}
    assert isinstance(value["ok"], bool) and 0 <= value["n"] <= 9


def test_json_object_mode_gives_an_object(backend: OnnxBackend) -> None:
    params = SamplingParams(temperature=0.0, json_mode="object")
    tokens = until_eog(backend, CASES[0]["prompt_ids"], 64, params)
    assert isinstance(json.loads(text_of(backend, tokens)), dict)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (SamplingParams(json_mode="schema", json_schema='{"type": "nonsense"}'), "cannot be used"),
        (SamplingParams(json_mode="schema", json_schema="{not json"), "not JSON"),
        (SamplingParams(json_mode="schema", json_schema=None), "needs a schema"),
    ],
)
def test_unusable_schemas_are_bad_requests(backend: OnnxBackend, params: SamplingParams, match: str) -> None:
    with pytest.raises(BadRequestError, match=match) as caught:
        backend.start(CASES[0]["prompt_ids"], params, 128)
    assert caught.value.param == "response_format"
    assert backend.active == 0


# ------------------------------------------------------------------ handles
def test_release_frees_and_invalidates_the_handle(backend: OnnxBackend) -> None:
    handle = backend.start(CASES[0]["prompt_ids"], GREEDY, 128)
    assert isinstance(handle, OnnxSequence) and backend.active == 1
    backend.next_token(handle)
    backend.release(handle)
    assert backend.active == 0 and handle.released
    with pytest.raises(EngineError, match="released"):
        backend.next_token(handle)
    backend.release(handle)  # releasing twice is harmless


def test_at_most_n_seq_max_generators(backend: OnnxBackend) -> None:
    handles = [backend.start(CASES[0]["prompt_ids"], GREEDY, 64) for _ in range(OPTIONS.n_seq_max)]
    try:
        with pytest.raises(EngineError, match="in use"):
            backend.start(CASES[0]["prompt_ids"], GREEDY, 64)
    finally:
        for handle in handles:
            backend.release(handle)


def test_close_releases_everything() -> None:
    b = OnnxBackend(FOLDER, OPTIONS)
    handles = [b.start(CASES[0]["prompt_ids"], GREEDY, 64) for _ in range(2)]
    b.close()
    assert b.active == 0 and all(h.released for h in handles)


# ------------------------------------------------------------------ through edgert's runtime
def greedy_until_eog(backend: OnnxBackend, case: dict[str, Any]) -> str:
    tokens = case["greedy_ids"]
    ends = [i for i, t in enumerate(tokens) if backend.is_end_of_generation(t)]
    return text_of(backend, tokens[: ends[0]] if ends else tokens)


def test_runtime_serves_the_folder_concurrently(tmp_path: Path, backend: OnnxBackend) -> None:
    from edgert.serving.runtime import open_runtime
    from edgert.settings import load_settings

    engine = {"n_ctx": 2048, "n_parallel": 4, "n_threads": 1, "n_threads_batch": 1}
    rt = open_runtime(load_settings(state_dir=tmp_path, model=str(FOLDER), engine=engine))
    try:
        assert isinstance(rt.backend, OnnxBackend)
        prompts = [rt.chat_prompt(case["messages"]) for case in CASES]
        assert [list(p) for p in prompts] == [case["prompt_ids"] for case in CASES]

        async def generate_all() -> list[str]:
            streams = [rt.scheduler.submit(rt.request(p, sampling=GREEDY, max_tokens=N_REF)) for p in prompts]
            return [text for text, _ in await asyncio.gather(*(s.collect() for s in streams))]

        texts = asyncio.run(generate_all())
    finally:
        rt.close()
    assert texts == [greedy_until_eog(backend, case) for case in CASES]


def test_cli_run_streams_the_onnx_model(tmp_path: Path, backend: OnnxBackend) -> None:
    env = {**os.environ, "EDGERT_STATE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "edgert", "run", "--model", str(FOLDER), "-t", "0", "-n", "12", "hi"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert backend.info.chat_template is not None
    prompt = ChatFormatter(backend.info.chat_template, bos_token="<bos>", eos_token="<eos>").render(
        [{"role": "user", "content": "hi"}]
    )
    tokens = until_eog(backend, backend.tokenize(prompt, add_special=False, parse_special=True), 12, GREEDY)
    assert done.stdout.rstrip("\n") == text_of(backend, tokens)


def test_generation_continues_past_an_end_token_until_max_length(backend: OnnxBackend) -> None:
    # ignore_eos (benchmarks): the scheduler keeps stepping after <eos>, which stops an og
    # generator; the backend rewinds over the end token and feeds it back. Seed 1 at
    # temperature 3 samples <eos> within 200 tokens on this fixture.
    prompt = CASES[0]["prompt_ids"]
    max_length = len(prompt) + 220
    handle = backend.start(prompt, SamplingParams(temperature=3.0, top_k=0, top_p=1.0, seed=1), max_length)
    try:
        tokens = [backend.next_token(handle)[0]]
        while not backend.is_end_of_generation(tokens[-1]):
            assert len(tokens) < 200, "the fixture no longer samples an end token with this seed"
            tokens.append(backend.next_token(handle)[0])
        while len(prompt) + len(tokens) < max_length:
            tokens.append(backend.next_token(handle)[0])
        with pytest.raises(EngineError, match="max_length"):
            backend.next_token(handle)
    finally:
        backend.release(handle)
