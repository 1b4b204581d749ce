"""``edgert registry init|add|promote|prune|publish|status|rotate-keys``: the operator's signed model registry.

A registry is a directory (``--dir``, default ``.``) holding keys, staged edits
and the static TUF site under ``repository/`` (see :mod:`edgert.registry.repository`).
Typical flow::

    edgert registry init -d fleet
    edgert registry add -d fleet model.gguf --model-id gemma-4-e2b-it:q4_k_m --version 2026.11.1
    edgert registry promote -d fleet gemma-4-e2b-it:q4_k_m 2026.11.1 --channel stable --rollout 20
    edgert registry publish -d fleet --out /srv/www/registry
    edgert registry prune -d fleet --keep 3 && edgert registry publish -d fleet --out /srv/www/registry
    HF_TOKEN=… edgert registry publish -d fleet --hf-repo acme/fleet-registry   # or host it on the Hub

Errors print one ``error: …`` line to stderr and exit with a code from
:mod:`edgert.cli.exitcodes` (1 failure, 4 invalid GGUF).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from edgert import __version__
from edgert.cli import exitcodes
from edgert.errors import EdgertError, RegistryError
from edgert.log import display_url, scrub_urls
from edgert.registry import hub
from edgert.registry.config import parse_duration
from edgert.registry.evaluation import eval_attachment
from edgert.registry.repository import Registry
from edgert.registry.status import RegistryStatus

app = typer.Typer(
    name="registry",
    help="Operate a signed (TUF) model registry: keys, models, channels, publishing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DirOption = Annotated[Path, typer.Option("--dir", "-d", help="Registry directory.")]
ExpiryOption = Annotated[
    list[str] | None,
    typer.Option(
        "--expiry",
        help="ROLE=LIFETIME of a role's metadata: days (7 or 7d), hours (6h) or minutes (30m); "
        "defaults root 365d, targets 90d, snapshot 7d, timestamp 1d. A short timestamp lifetime "
        "bounds how long a device can be fed stale metadata.",
    ),
]


@app.command("init")
def init(
    directory: DirOption = Path(),
    keys: Annotated[list[str] | None, typer.Option("--keys", help="ROLE=N keys for a role (default 1).")] = None,
    threshold: Annotated[
        list[str] | None, typer.Option("--threshold", help="ROLE=N signatures a role needs (default 1).")
    ] = None,
    expiry: ExpiryOption = None,
) -> None:
    """Create ed25519 keys and root metadata (consistent snapshots)."""
    with _errors():
        registry = Registry.init(
            directory,
            key_counts=_pairs(keys, "--keys"),
            thresholds=_pairs(threshold, "--threshold"),
            expiry=_durations(expiry),
        )
        typer.echo(f"registry created in {directory}")
        typer.echo(f"ship {registry.root_path()} to devices as update.trusted_root")
        typer.echo(f"keep the root (and if possible targets) keys in {registry.keys_dir} offline; see README.txt")


@app.command("add")
def add(
    model: Annotated[
        Path,
        typer.Argument(help="The .gguf file, or ONNX Runtime GenAI model folder, to publish.", exists=True),
    ],
    model_id: Annotated[str, typer.Option("--model-id", help="Model id, e.g. gemma-4-e2b-it:q4_k_m.")],
    version: Annotated[str, typer.Option("--version", help="This build's version, e.g. 2026.11.1.")],
    directory: DirOption = Path(),
    min_edgert: Annotated[
        str, typer.Option("--min-edgert", help="Oldest edgert release that may install it.")
    ] = __version__,
    ram_mib: Annotated[
        int | None, typer.Option("--ram-mib", min=1, help="Memory it needs (MiB); default: an estimate.")
    ] = None,
    sign_key: Annotated[
        Path | None,
        typer.Option(
            "--sign-key",
            exists=True,
            dir_okay=False,
            help="EC private key (PEM): also publish a model-signing bundle as <target>.sig ([signing] extra).",
        ),
    ] = None,
    mmproj: Annotated[
        Path | None,
        typer.Option(
            "--mmproj",
            exists=True,
            dir_okay=False,
            help="The model's multimodal projector (.gguf): one release of both files, installed all or nothing.",
        ),
    ] = None,
    drafter: Annotated[
        Path | None,
        typer.Option(
            "--drafter",
            exists=True,
            dir_okay=False,
            help="The model's Gemma 4 MTP drafter (.gguf, gemma4-assistant): delivered with the release, all or "
            "nothing; devices serve the release with it (speculative decoding).",
        ),
    ] = None,
    eval_file: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            exists=True,
            dir_okay=False,
            help="An evaluation set (.jsonl, see `edgert eval`): each device runs it on the new model before it "
            "commits, and rolls back when the score is under --eval-threshold.",
        ),
    ] = None,
    eval_threshold: Annotated[
        float,
        typer.Option(
            "--eval-threshold",
            min=0.0,
            max=1.0,
            help="Least fraction of the set's cases that must pass (0..1, steps of 0.01; signed).",
        ),
    ] = 1.0,
) -> None:
    """Validate a GGUF file or an ONNX GenAI folder and stage it as signed target(s) (published by `publish`).

    A folder becomes one target per file, models/<id>/<version>/<relative path>; hidden
    files are left out, symlinks refused. With --mmproj a Gemma 4 GGUF and its projector
    become models/<id>/<version>/model.gguf and mmproj.gguf, checked to pair first; with --drafter its
    MTP drafter becomes drafter.gguf beside them, checked against the model the same way. With --eval
    the set becomes models/<id>/<version>/eval.jsonl, every case checked first.
    """
    with _errors():
        attachment = eval_attachment(eval_file, eval_threshold) if eval_file is not None else None
        added = Registry(directory).add(
            model,
            model_id=model_id,
            version=version,
            min_edgert_version=min_edgert,
            ram_mib=ram_mib,
            signing_key=sign_key,
            mmproj=mmproj,
            drafter=drafter,
            evaluation=attachment,
        )
        if added.meta.is_folder:
            typer.echo(
                f"added {model_id}@{version}: {added.meta.format} folder, {len(added.meta.files)} files, "
                f"{added.length} bytes under models/{model_id}/{version}/"
            )
        else:
            typer.echo(f"added {added.target_path} ({added.length} bytes, sha256 {added.sha256})")
        if sign_key is not None:
            typer.echo(f"added {added.target_path}.sig (model-signing bundle, key {sign_key})")
        if attachment is not None:
            gate = attachment.meta
            typer.echo(
                f"added {added.meta.evaluation_target()} (evaluation set, {gate.cases} cases, "
                f"threshold {gate.threshold:g})"
            )


@app.command("promote")
def promote(
    model_id: Annotated[str, typer.Argument(help="Model id.")],
    version: Annotated[str, typer.Argument(help="Version to offer.")],
    channel: Annotated[str, typer.Option("--channel", help="Channel, e.g. stable or beta.")] = "stable",
    rollout: Annotated[int, typer.Option("--rollout", min=0, max=100, help="Percent of devices.")] = 100,
    directory: DirOption = Path(),
) -> None:
    """Point a channel at a version for a share of the fleet (signed with the targets metadata)."""
    with _errors():
        pointer = Registry(directory).promote(model_id, version, channel=channel, rollout=rollout)
        previous = f", others stay on {pointer.previous_version}" if pointer.previous_version else ""
        typer.echo(f"{channel}: {model_id}@{version} for {rollout}% of devices{previous} (run publish)")


@app.command("prune")
def prune(
    keep: Annotated[int, typer.Option("--keep", min=1, help="Versions of each model to keep (the newest).")],
    directory: DirOption = Path(),
) -> None:
    """Drop all but the newest N versions of each model (never one a channel offers); files go at publish.

    Devices refuse targets metadata over 5 MB, so a registry that only ever adds stops updating them.
    """
    with _errors():
        result = Registry(directory).prune(keep)
        for name in result.kept_for_channels:
            typer.echo(f"kept {name}: a channel offers it")
        if result.removed:
            typer.echo(f"dropped {', '.join(result.removed)}; run `edgert registry publish` to sign and delete them")
        else:
            typer.echo("nothing to drop")


@app.command("publish")
def publish(
    directory: DirOption = Path(),
    out: Annotated[
        Path | None, typer.Option("--out", help="Also copy the site here (the HTTP host's document root).")
    ] = None,
    timestamp_only: Annotated[
        bool, typer.Option("--timestamp-only", help="Only re-sign the timestamp (a timer keeps it fresh).")
    ] = False,
    hf_repo: Annotated[
        str | None,
        typer.Option(
            "--hf-repo",
            help="Also upload the site to this Hugging Face Hub repo (owner/name) in one commit; "
            "token from HF_TOKEN or `hf auth login`.",
        ),
    ] = None,
    hf_endpoint: Annotated[
        str | None, typer.Option("--hf-endpoint", help="Hub URL (default: HF_ENDPOINT, else huggingface.co).")
    ] = None,
    hf_revision: Annotated[str, typer.Option("--hf-revision", help="Branch to commit to.")] = hub.DEFAULT_REVISION,
    hf_repo_type: Annotated[str, typer.Option("--hf-repo-type", help="model or dataset.")] = "model",
    expiry: Annotated[
        list[str] | None,
        typer.Option(
            "--expiry",
            help="ROLE=LIFETIME (7d, 6h, 30m; a plain number is days): change a role's metadata lifetime "
            "from this publication on (kept in registry.json).",
        ),
    ] = None,
) -> None:
    """Sign changed targets, refresh snapshot and timestamp, and write the static site."""
    with _errors():
        registry = Registry(directory)
        if expiry:
            registry.set_expiry(_durations(expiry))
        result = registry.publish(out=out, timestamp_only=timestamp_only)
        typer.echo(
            f"published targets v{result.targets_version}, snapshot v{result.snapshot_version}, "
            f"timestamp v{result.timestamp_version} in {registry.repo_dir}"
            + (f"; {result.copied_files} files copied to {out}" if out is not None else "")
            + (f"; {result.removed_files} files of pruned versions deleted" if result.removed_files else "")
        )
        if hf_repo is not None:
            repo = hub.HubRepo(hf_repo, endpoint=hf_endpoint, revision=hf_revision, repo_type=hf_repo_type)
            uploaded = hub.upload_site(registry.repo_dir, repo)
            typer.echo(
                f"uploaded the site ({uploaded.files} files, unchanged ones skipped) to {hf_repo}: "
                f"{display_url(uploaded.commit_url)}"
            )
            typer.echo(f"devices: update.registry_url = {display_url(uploaded.registry_url)}")
        _warn(registry.status())


@app.command("status")
def status(
    directory: DirOption = Path(),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What is published: roles and expiries, models, channels; warns about expiring metadata."""
    with _errors():
        report = Registry(directory).status()
        if as_json:
            typer.echo(json.dumps(_jsonable(report), indent=2, default=str))
        else:
            _print_status(report)
        _warn(report)


@app.command("rotate-keys")
def rotate_keys(
    role: Annotated[str, typer.Argument(help="root, targets, snapshot or timestamp.")],
    directory: DirOption = Path(),
) -> None:
    """Replace a role's keys; writes a new root version (run publish afterwards)."""
    with _errors():
        keyids = Registry(directory).rotate_keys(role)
        typer.echo(f"{role}: new key(s) {', '.join(k[:16] for k in keyids)}; old keys moved to keys/retired/")
        typer.echo("run `edgert registry publish` so devices pick up the new root")


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except EdgertError as exc:
        typer.echo(f"error: {scrub_urls(' '.join(str(exc).split()))}", err=True)
        raise typer.Exit(exitcodes.for_error(exc)) from None


def _pairs(values: list[str] | None, option: str) -> dict[str, int]:
    pairs = {}
    for value in values or []:
        role, sep, number = value.partition("=")
        if not sep or not number.isdigit():
            raise RegistryError(f"{option} wants ROLE=N, not {value!r}")
        pairs[role] = int(number)
    return pairs


def _durations(values: list[str] | None) -> dict[str, timedelta]:
    durations = {}
    for value in values or []:
        role, sep, text = value.partition("=")
        if not sep:
            raise RegistryError(f"--expiry wants ROLE=LIFETIME (e.g. timestamp=6h), not {value!r}")
        durations[role] = parse_duration(text)
    return durations


def _print_status(report: RegistryStatus) -> None:
    typer.echo("ROLE       VERSION  EXPIRES                    THRESHOLD  WARNING")
    for role in report.roles:
        expires = role.expires.isoformat()
        typer.echo(f"{role.role:<10} {role.version:<8} {expires:<26} {role.threshold:<10} {role.warning or ''}")
    if report.targets_bytes is not None:
        share = 100 * report.targets_bytes / report.targets_limit
        typer.echo(
            f"targets metadata: {report.targets_bytes} bytes, {share:.1f} % of the {report.targets_limit} "
            "devices accept"
        )
    typer.echo("")
    typer.echo("MODELS")
    for model in report.models:
        meta = model.meta
        typer.echo(
            f"  {meta.model_id}@{meta.version}  {meta.format} {meta.architecture} {meta.quant or '?'}  "
            f"{model.length} bytes{f' in {len(meta.files)} files' if meta.is_folder else ''}  "
            f"ram {meta.ram_mib} MiB  edgert>={meta.min_edgert_version}"
            + (f"  eval {gate.cases} cases >= {gate.threshold:g}" if (gate := meta.evaluation) else "")
        )
    typer.echo("CHANNELS")
    for name, pointer in sorted(report.channels.channels.items()):
        previous = f" (others: {pointer.previous_version})" if pointer.previous_version else ""
        typer.echo(f"  {name}: {pointer.model_id}@{pointer.version} rollout {pointer.rollout}%{previous}")
    if report.unpublished_changes:
        typer.echo("unpublished changes are staged: run `edgert registry publish`")


def _warn(report: RegistryStatus) -> None:
    for role in report.roles:
        if role.warning:
            typer.echo(f"warning: {role.role} metadata {role.warning} ({role.expires.isoformat()})", err=True)
    if report.targets_warning:
        typer.echo(f"warning: {report.targets_warning}", err=True)


def _jsonable(report: RegistryStatus) -> dict[str, object]:
    return {
        "roles": [asdict(role) for role in report.roles],
        "models": [
            {"target": m.target_path, "length": m.length, "sha256": m.sha256, **m.meta.model_dump(mode="json")}
            for m in report.models
        ],
        "channels": report.channels.model_dump(mode="json")["channels"],
        "unpublished_changes": report.unpublished_changes,
        "targets_bytes": report.targets_bytes,
        "targets_limit": report.targets_limit,
        "targets_warning": report.targets_warning,
    }
