"""``edgert models list|pull|verify|rm``: manage the model files on this device.

A catalog model with a multimodal projector is two files: ``pull`` fetches both (``--no-mmproj``: the
model only), ``verify`` checks both, ``rm`` removes the projector with the last quant that uses it. A model
with an MTP drafter in the catalog gets it the same way (``--no-drafter``: without it; ``verify`` checks it
against the model).

Every command prints its result to stdout and, on failure, one line
``error: <message>`` to stderr, then exits with a code from
:mod:`edgert.cli.exitcodes` (0 ok, 1 failure such as a hash mismatch or a failed
download, 2 usage, 3 unknown or not-installed model, 4 corrupt GGUF, 6 bad config).
Progress bars go to stderr so stdout stays parseable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from edgert import store
from edgert.catalog import Catalog, ModelSpec, load_catalog
from edgert.cli import exitcodes
from edgert.drafter_file import check_drafter_files
from edgert.errors import EdgertError, IntegrityError, ModelMissingError
from edgert.gguf_file import GGUFInfo, check_matches_spec, sha256_file, validate_gguf
from edgert.log import scrub_urls
from edgert.memory_fit import memory_need
from edgert.pull import PullResult, pull_drafter, pull_model, pull_projector
from edgert.settings import EngineSettings, Settings, load_settings

app = typer.Typer(
    name="models",
    help="List, download, verify and remove models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("list")
def list_models(
    ctx: Annotated[
        int | None,
        typer.Option("--ctx", min=256, help="Context size for the RAM column (default: engine.n_ctx)."),
    ] = None,
) -> None:
    """Show the catalog: size, RAM needed at a context size, and what is installed."""
    with _errors():
        settings, catalog = _load()
        n_ctx = ctx or settings.engine.n_ctx
        installed = store.list_installed(settings.models_dir, catalog)
        installed_ids = {model.spec.id for model in installed if model.spec is not None}
        engine = settings.engine.model_copy(update={"n_ctx": n_ctx})
        _out().print(_catalog_table(catalog, settings.models_dir, engine, installed_ids))
        if media := _media_line(catalog):
            typer.echo(media)
        strays = [model.path.name for model in installed if model.spec is None]
        if strays:
            typer.echo(f"other .gguf files in {settings.models_dir}: {', '.join(strays)}")


@app.command("pull")
def pull(
    model_id: Annotated[str, typer.Argument(metavar="ID", help="Catalog id, e.g. gemma-4-e2b-it:q4_k_m.")],
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Download from this URL instead (a mirror). Plain http needs a hash: the catalog's or --sha256.",
        ),
    ] = None,
    sha256: Annotated[
        str | None,
        typer.Option("--sha256", help="The file's SHA-256 (64 hex digits), checked before it is installed."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even when installed.")] = False,
    no_mmproj: Annotated[
        bool,
        typer.Option("--no-mmproj", help="Skip the multimodal projector (images/audio): a text-only install."),
    ] = False,
    no_drafter: Annotated[
        bool,
        typer.Option("--no-drafter", help="Skip the MTP drafter (speculative decoding) where the catalog has one."),
    ] = False,
) -> None:
    """Download a model, its multimodal projector and its MTP drafter (resumable), verify size, SHA-256 and GGUF
    header, install.

    --url replaces the model's source only; the projector and drafter always come from their catalog sources.
    """
    if sha256 is not None and url is None:
        raise typer.BadParameter("pins a --url download; catalog sources carry their own pin", param_hint="--sha256")
    with _errors():
        settings, catalog = _load()
        spec = catalog.get(model_id)
        with _download_bar(f"pull {spec.id}", spec.size_bytes) as progress:
            result = pull_model(spec, settings.models_dir, url=url, sha256=sha256, progress=progress, force=force)
        typer.echo(_pull_summary(result))
        if spec.projector is not None and not no_mmproj:
            with _download_bar(f"pull {spec.id} projector", spec.projector.size_bytes) as progress:
                projector = pull_projector(spec, settings.models_dir, progress=progress, force=force)
            if projector is not None:
                typer.echo(_pull_summary(projector, what=f"the projector of {spec.id}"))
        if spec.drafter is not None and not no_drafter:
            with _download_bar(f"pull {spec.id} drafter", spec.drafter.size_bytes) as progress:
                drafter = pull_drafter(spec, settings.models_dir, progress=progress, force=force)
            if drafter is not None:
                typer.echo(_pull_summary(drafter, what=f"the drafter of {spec.id}"))


@app.command("verify")
def verify(
    target: Annotated[str, typer.Argument(metavar="ID|PATH", help="Catalog id or path to a .gguf file.")],
) -> None:
    """Check a model file: GGUF header, size and SHA-256 against the catalog. Exit 0 when good."""
    with _errors():
        settings, catalog = _load()
        spec, path = _verify_target(settings, catalog, target)
        info = validate_gguf(path)
        if spec is not None:
            check_matches_spec(info, spec)
        with _hash_bar(path) as advance:
            actual = sha256_file(path, progress=advance)
        if spec is not None and spec.sha256 is not None and actual != spec.sha256:
            raise IntegrityError(f"{path}: sha256 mismatch: expected {spec.sha256}, actual {actual}")
        typer.echo(_verify_summary(info, actual, spec, catalog))
        if spec is not None:
            _verify_projector(settings.models_dir, spec)
            _verify_drafter(settings.models_dir, spec)


@app.command("rm")
def remove(
    model_id: Annotated[str, typer.Argument(metavar="ID", help="Catalog id of an installed model.")],
) -> None:
    """Delete an installed model and any partial download of it."""
    with _errors():
        settings, catalog = _load()
        spec = catalog.get(model_id)
        removed = store.remove_model(settings.models_dir, spec, catalog)
        if not removed:
            raise ModelMissingError(f"model {spec.id} is not installed in {settings.models_dir}")
        for path in removed:
            typer.echo(f"removed {path}")
        if spec.embedded:
            typer.echo("(the embedded model is rebuilt from its Python package the next time it is used)")


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn an edgert error into one stderr line and its documented exit code."""
    try:
        yield
    except EdgertError as exc:
        message = scrub_urls(" ".join(str(exc).split()))  # one line, no URL credentials, whatever it holds
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(exitcodes.for_error(exc)) from None


def _load() -> tuple[Settings, Catalog]:
    settings = load_settings()
    return settings, load_catalog(settings.catalog)


def _out() -> Console:
    # Created per call so it writes to the sys.stdout in force (CliRunner swaps it).
    return Console(highlight=False)


def _err() -> Console:
    # Bars are drawn only when stderr is a terminal; in logs and pipes they would be noise.
    return Console(stderr=True, highlight=False)


def _catalog_table(catalog: Catalog, models_dir: Path, engine: EngineSettings, installed_ids: set[str]) -> Table:
    """RAM is what the memory fit counts: with the projector unless engine.multimodal is off."""
    n_ctx = engine.n_ctx
    table = Table(title=f"models in {models_dir}", title_justify="left")
    table.add_column("ID", no_wrap=True)
    table.add_column("QUANT", no_wrap=True)
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column(f"RAM@{n_ctx}", justify="right", no_wrap=True)
    table.add_column("INSTALLED", no_wrap=True)
    table.add_column("EMBEDDED", no_wrap=True)
    for spec in catalog:
        table.add_row(
            spec.id,
            spec.quant,
            _gib(spec.size_bytes) if spec.sha256 else f"~{_gib(spec.size_bytes)}",
            _gib(memory_need(spec, engine).total_mib * 2**20),
            _installed_cell(models_dir, spec, installed_ids),
            "yes" if spec.embedded else "",
        )
    return table


def _media_line(catalog: Catalog) -> str | None:
    """Which variants read images/audio: the table has no room for it at 80 columns."""
    by_media: dict[str, list[str]] = {}
    for spec in catalog:
        if spec.projector is not None:
            variant = spec.id.split(":")[0]
            names = by_media.setdefault("+".join(spec.projector.modalities), [])
            if variant not in names:
                names.append(variant)
    if not by_media:
        return None
    parts = [f"{media}: {', '.join(variants)}" for media, variants in by_media.items()]
    return f"media input (with the projector pulled beside the model; else text only): {'; '.join(parts)}"


def _installed_cell(models_dir: Path, spec: ModelSpec, installed_ids: set[str]) -> str:
    if spec.id not in installed_ids:
        return "no"
    if spec.projector is not None and not store.has_projector(models_dir, spec):
        return "text only"
    return "yes"


def _gib(n: int) -> str:
    if n >= 10 * 2**30:  # one decimal: the table stays within 80 columns
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@contextlib.contextmanager
def _download_bar(description: str, total: int) -> Iterator[_BarCallback]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    console = _err()
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total)
        yield _BarCallback(progress, task)


class _BarCallback:
    """Adapts pull's ``(done, total)`` callback to a rich task."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task

    def __call__(self, done: int, total: int | None) -> None:
        self._progress.update(self._task, completed=done, total=total)


@contextlib.contextmanager
def _hash_bar(path: Path) -> Iterator[_Advance]:
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    console = _err()
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"sha256 {path.name}", total=path.stat().st_size)
        yield _Advance(progress, task)


class _Advance:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task

    def __call__(self, n: int) -> None:
        self._progress.advance(self._task, n)


def _pull_summary(result: PullResult, what: str | None = None) -> str:
    what = what or result.spec.id
    if not result.changed:
        return f"{what} is already installed: {result.path}"
    resumed = f", resumed at byte {result.resumed_from}" if result.resumed_from else ""
    digest = f", sha256 {result.sha256}" if result.sha256 else ""
    return f"installed {what}: {result.path} ({_gib(result.path.stat().st_size)}{resumed}{digest})"


def _verify_projector(models_dir: Path, spec: ModelSpec) -> None:
    """The installed projector's header and pin too; a missing one is reported (the model serves text only)."""
    path = store.projector_path(models_dir, spec)
    if spec.projector is None or path is None:
        return
    if not path.is_file():
        typer.echo(f"no projector: {spec.id} serves text only; edgert models pull {spec.id} fetches it")
        return
    info = validate_gguf(path, architectures=store.PROJECTOR_ARCHITECTURES)
    with _hash_bar(path) as advance:
        actual = sha256_file(path, progress=advance)
    pin = spec.projector.sha256
    if pin is not None and actual != pin:
        raise IntegrityError(f"{path}: sha256 mismatch: expected {pin}, actual {actual}")
    checked = "matches the catalog" if pin is not None else "not pinned by the catalog"
    typer.echo(f"ok: {info.path}; projector for {'+'.join(spec.projector.modalities)}; sha256 {actual} ({checked})")


def _verify_drafter(models_dir: Path, spec: ModelSpec) -> None:
    """The installed drafter's header (a gemma4-assistant GGUF that fits the model) and pin too."""
    path = store.drafter_path(models_dir, spec)
    if spec.drafter is None or path is None:
        return
    if not path.is_file():
        typer.echo(f"no drafter: {spec.id} serves without speculation; edgert models pull {spec.id} fetches it")
        return
    check_drafter_files(store.model_path(models_dir, spec), path)
    with _hash_bar(path) as advance:
        actual = sha256_file(path, progress=advance)
    pin = spec.drafter.sha256
    if pin is not None and actual != pin:
        raise IntegrityError(f"{path}: sha256 mismatch: expected {pin}, actual {actual}")
    checked = "matches the catalog" if pin is not None else "not pinned by the catalog"
    typer.echo(f"ok: {path}; MTP drafter; sha256 {actual} ({checked})")


def _verify_target(settings: Settings, catalog: Catalog, target: str) -> tuple[ModelSpec | None, Path]:
    if store.looks_like_path(target):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ModelMissingError(f"{path} does not exist")
        return None, path
    spec = catalog.get(target)
    path = store.model_path(settings.models_dir, spec)
    if not path.is_file():
        raise ModelMissingError(f"model {spec.id} is not installed; run: edgert models pull {spec.id}")
    return spec, path


def _verify_summary(info: GGUFInfo, sha256: str, spec: ModelSpec | None, catalog: Catalog) -> str:
    known = spec or next((entry for entry in catalog if entry.sha256 == sha256), None)
    parts = [
        f"ok: {info.path}",
        f"architecture {info.architecture}",
        f"{info.n_tensors} tensors",
        f"quant {info.file_type or '?'}",
        f"context {info.context_length or '?'}",
        f"chat template {'yes' if info.has_chat_template else 'no'}",
        f"sha256 {sha256}",
    ]
    if known is not None:
        checked = "matches" if known.sha256 == sha256 else "is"
        parts.append(f"{checked} catalog entry {known.id}")
    return "; ".join(parts)


if __name__ == "__main__":  # python -m edgert.cli.models
    app()
