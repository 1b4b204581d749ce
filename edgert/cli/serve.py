"""``edgert serve``: the daemon (OpenAI-compatible HTTP on a Unix socket)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgert import log
from edgert.cli.exitcodes import for_error
from edgert.daemon import serve as run_daemon
from edgert.errors import EdgertError
from edgert.settings import load_settings


def serve(
    socket: Path | None = typer.Option(None, "--socket", help="Unix socket path (default: serve.socket)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Catalog id or .gguf path (default: settings)."),
    config: Path | None = typer.Option(None, "--config", help="Settings file (else EDGERT_CONFIG / defaults)."),
    tcp: str | None = typer.Option(None, "--tcp", help="Also listen on TCP HOST:PORT (off unless given)."),
    log_json: bool | None = typer.Option(None, "--log-json/--log-text", help="JSON log lines (for journald)."),
    mmproj: Path | None = typer.Option(
        None,
        "--mmproj",
        help="Multimodal projector .gguf for image/audio input, as llama-server's --mmproj "
        "(default: engine.mmproj, else the catalog model's installed projector).",
    ),
    no_mmproj: bool = typer.Option(
        False, "--no-mmproj", help="Serve text only: load no projector (engine.multimodal = false)."
    ),
) -> None:
    """Exit codes: 0 clean shutdown, 1 model failed to load or probe, 6 bad config / socket in use."""
    if mmproj is not None and no_mmproj:
        raise typer.BadParameter("--mmproj and --no-mmproj contradict each other", param_hint="--mmproj")
    engine_overrides: dict[str, object] = {}
    if mmproj is not None:
        engine_overrides.update(mmproj=mmproj.expanduser(), multimodal=True)
    if no_mmproj:
        engine_overrides["multimodal"] = False
    serve_overrides: dict[str, object] = {}
    if socket is not None:
        serve_overrides["socket"] = socket
    if tcp is not None:
        host, _, port = tcp.rpartition(":")
        if not host or not port.isdigit():
            raise typer.BadParameter("expected HOST:PORT", param_hint="--tcp")
        serve_overrides.update(tcp_host=host, tcp_port=int(port))
    try:
        settings = load_settings(config_path=config, log_json=log_json)
        if serve_overrides:
            settings = settings.model_copy(update={"serve": settings.serve.model_copy(update=serve_overrides)})
        if engine_overrides:
            settings = settings.model_copy(update={"engine": settings.engine.model_copy(update=engine_overrides)})
        log.setup(settings.log_level, json_lines=settings.log_json)
        code = run_daemon(settings, model)
    except EdgertError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(for_error(exc)) from None
    raise typer.Exit(code)
