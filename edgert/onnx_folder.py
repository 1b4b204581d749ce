"""Check an ONNX Runtime GenAI model folder before anything tries to load it.

The folder counterpart of :mod:`edgert.gguf_file`: it reads ``genai_config.json``
(no onnxruntime import) and answers with one precise line, ``<folder>: <defect>``,
when the folder is not a model edgert can run. Three callers share it, so they
refuse the same folders for the same reasons:

* the engine (:func:`edgert.engine.onnx.validate_model_folder`) adds one check
  that needs the library: every execution provider the config names must be
  available in this onnxruntime-genai build;
* ``edgert registry add`` on the operator's machine (which may not have the
  ``[onnx]`` extra, nor the device's accelerator);
* the device update path at stage, after every member file was verified.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from edgert.errors import ModelFileError

#: The file that makes a folder an ONNX Runtime GenAI model.
CONFIG_FILE: Final = "genai_config.json"

#: text-only decoder types onnxruntime-genai 0.18 runs (its ModelType::IsLLM list); vision,
#: audio and multi-modal types (gemma3, gemma4, phi3v, whisper, ...) need processors edgert lacks
SUPPORTED_ARCHITECTURES: Final = frozenset(
    {
        "chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gemma4_text", "gpt2",
        "gptoss", "granite", "granitemoehybrid", "hunyuandensev1", "internlm2", "lfm2", "llama",
        "mistral", "nemotron", "olmo", "phi", "phimoe", "phi3", "phi3small", "qwen2", "qwen3",
        "qwen3_5_moe_text", "qwen3_5_text", "smollm3",
    }
)  # fmt: skip
#: execution providers a genai_config.json may name besides the CPU
KNOWN_PROVIDERS: Final = ("cuda", "dml", "openvino", "qnn", "webgpu")


@dataclass(frozen=True, slots=True)
class OnnxModelInfo:
    """What ``genai_config.json`` says about a model folder, checked before loading."""

    path: Path
    architecture: str
    context_length: int
    vocab_size: int
    #: execution providers named in the config; empty means CPU
    providers: tuple[str, ...]
    model_file: Path
    #: sliding-window size of the SWA layers (0 = none)
    sliding_window: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    size_bytes: int
    config: dict[str, Any] = field(repr=False, compare=False)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def defect(path: Path, what: str) -> ModelFileError:
    return ModelFileError(one_line(f"{path}: {what}"))


def read_json(path: Path, folder: Path) -> dict[str, Any]:
    """A JSON object file of the model folder; ModelFileError naming the folder when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise defect(folder, f"{path.name} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise defect(folder, f"{path.name} is not a JSON object")
    return data


def providers_of(decoder: dict[str, Any]) -> tuple[str, ...]:
    options = decoder.get("session_options", {}).get("provider_options", [])
    names: list[str] = []
    for entry in options if isinstance(options, list) else []:
        names.extend(str(name).lower() for name in (entry if isinstance(entry, dict) else {}))
    return tuple(names)


def validate_onnx_folder(path: Path) -> OnnxModelInfo:
    """Check the folder's structure and config; raise ModelFileError (one line) on the first defect.

    Does not ask onnxruntime-genai whether the named execution providers are
    available here (the engine does that where the model runs).
    """
    if not path.is_dir():
        raise defect(path, "not a folder (an ONNX Runtime GenAI model is a folder with genai_config.json)")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise defect(path, f"missing {CONFIG_FILE} (not an ONNX Runtime GenAI model folder)")
    config = read_json(config_path, path)
    model = config.get("model")
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(model, dict) or not isinstance(decoder, dict):
        raise defect(path, f"{CONFIG_FILE} has no model.decoder section")
    arch = str(model.get("type", ""))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise defect(
            path,
            f"unsupported architecture {arch!r} in {CONFIG_FILE} (edgert runs text decoders: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))})",
        )
    model_file = path / str(decoder.get("filename", "model.onnx"))
    if not model_file.is_file():
        raise defect(path, f"missing {model_file.name} (named by {CONFIG_FILE} model.decoder.filename)")
    if not (path / "tokenizer.json").is_file():
        raise defect(path, "missing tokenizer.json")
    providers = providers_of(decoder)
    for name in providers:
        if name not in KNOWN_PROVIDERS:
            known = ", ".join(["cpu", *KNOWN_PROVIDERS])
            raise defect(path, f"{CONFIG_FILE} names unknown execution provider {name!r} (known: {known})")
    window = decoder.get("sliding_window") or {}
    return OnnxModelInfo(
        path=path,
        architecture=arch,
        context_length=int(model.get("context_length", 0)),
        vocab_size=int(model.get("vocab_size", 0)),
        providers=providers,
        model_file=model_file,
        sliding_window=int(window.get("window_size", 0)) if isinstance(window, dict) else 0,
        bos_token_id=int(model.get("bos_token_id", -1)),
        eos_token_ids=_eos_ids(model),
        size_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        config=config,
    )


def _eos_ids(model: dict[str, Any]) -> tuple[int, ...]:
    eos = model.get("eos_token_id", [])
    return tuple(int(t) for t in (eos if isinstance(eos, list) else [eos]))
