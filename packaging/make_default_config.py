#!/usr/bin/env python3
"""Write ``packaging/edgert.toml`` (installed as ``/etc/edgert/edgert.toml``) from the settings model.

Every field of :class:`edgert.settings.Settings` appears, with its description, type, range,
built-in default and ``EDGERT_*`` variable, commented out as ``#key = value`` (remove the ``#``
to change it). The few lines that are *not* commented are the packaged service's own choices
(``DEPLOYMENT``): state under ``/var/lib/edgert``, the socket in ``/run/edgert`` for the
``edgert-clients`` group, JSON logs for journald.

    python packaging/make_default_config.py            # rewrite packaging/edgert.toml
    python packaging/make_default_config.py --check    # exit 1 (with a diff) when it has drifted
    python packaging/make_default_config.py -o -       # print it

Run it with the project's venv (it imports edgert). ``make deb`` refuses to build when the
committed file has drifted, and ``tests/integration/test_packaging.py`` checks it too.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import types
from collections.abc import Callable
from enum import Enum
from pathlib import Path, PurePath
from typing import Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from edgert.settings import Settings

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "edgert.toml"

#: the packaged service's values: active (uncommented) lines in the installed file
DEPLOYMENT: dict[tuple[str, ...], object] = {
    ("state_dir",): "/var/lib/edgert",
    ("log_json",): True,
    ("serve", "socket"): "/run/edgert/edgert.sock",
    ("serve", "socket_group"): "edgert-clients",
}

#: defaults computed at run time, shown as what they mean rather than this machine's value
DISPLAY_DEFAULTS: dict[tuple[str, ...], str] = {
    ("state_dir",): "~/.local/share/edgert",
}

#: set by systemd in the environment; not settings an operator writes
ENV_ONLY = ("notify_socket", "watchdog_usec")

#: integer fields shown in octal (TOML accepts 0o660)
OCTAL_FIELDS = ("socket_mode",)

HEADER = """\
# /etc/edgert/edgert.toml: settings of the edgert daemon (`edgert serve`) and CLI on this device.
#
# Generated from edgert/settings.py by packaging/make_default_config.py: every setting is
# listed with its description, type, built-in default and EDGERT_* environment variable,
# commented out as `#key = value`. Remove the leading `#` to change one. `<...>` marks a
# setting that is unset by default: replace it with a value of that type.
#
# Precedence, highest first: command-line flags > EDGERT_* environment > this file > defaults.
# Nested groups in the environment use `__`: EDGERT_ENGINE__N_CTX=8192.
#
# The lines that are NOT commented are the packaged service's choices (the built-in defaults
# suit a developer's checkout instead): state under /var/lib/edgert (the unit's
# StateDirectory), the socket in /run/edgert (RuntimeDirectory) for members of the
# `edgert-clients` group, JSON logs for journald.
#
# Keep secrets (mqtt.password) out of this world-readable file: put EDGERT_MQTT__PASSWORD=...
# in a root-only file and add it with a drop-in (see `systemctl edit edgert`):
#   [Service]
#   EnvironmentFile=/etc/edgert/secrets.env
#
# After editing: `edgert doctor` shows the effective configuration and any problem;
# `systemctl restart edgert` applies it. Set by systemd in the environment only:
# NOTIFY_SOCKET, WATCHDOG_USEC.
"""


def render() -> str:
    """The whole file, deterministic: depends only on the settings model."""
    lines = [HEADER]
    nested: list[tuple[str, FieldInfo, type[BaseModel]]] = []
    for name, info in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        model = _model_type(info.annotation)
        if model is not None:
            nested.append((name, info, model))
            continue
        lines.extend(_field_lines((name,), info, _default(info)))
    for name, info, model in nested:
        doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
        lines.append(f"\n# ---- {name}: {info.description or doc}".rstrip())
        if doc and doc != info.description:
            lines.append(f"# {doc}")
        lines.append(f"[{name}]")
        defaults = model()
        for sub_name, sub_info in model.model_fields.items():
            lines.extend(_field_lines((name, sub_name), sub_info, getattr(defaults, sub_name)))
    return "\n".join(lines).rstrip("\n") + "\n"


def _field_lines(path: tuple[str, ...], info: FieldInfo, default: object) -> list[str]:
    key = path[-1]
    out = [""]
    if info.description:
        out.append(f"# {info.description}")
    details = [f"type: {_type_name(info.annotation)}"]
    bounds = _bounds(key, info)
    if bounds:
        details.append(f"limits: {bounds}")
    shown = DISPLAY_DEFAULTS.get(path)
    if shown is not None:
        default_text = json.dumps(shown)
    elif default is None:
        default_text = ""
    else:
        default_text = _toml_value(key, default)
    details.append(f"default: {default_text or 'unset'}")
    details.append(f"env: EDGERT_{'__'.join(part.upper() for part in path)}")
    out.append("# " + "; ".join(details))
    out.append(f"#{key} = {default_text or '<' + _type_name(info.annotation) + '>'}")
    if path in DEPLOYMENT:
        out.append(f"{key} = {_toml_value(key, DEPLOYMENT[path])}")
    return out


def _default(info: FieldInfo) -> object:
    if info.default_factory is not None:
        factory: Callable[[], object] = info.default_factory  # type: ignore[assignment]
        return factory()
    return info.default


def _model_type(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _bounds(key: str, info: FieldInfo) -> str:
    parts: list[str] = []
    for item in info.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if isinstance(item, annotated_types.BaseMetadata) and value is not None:
                parts.append(f"{symbol} 0o{value:o}" if key in OCTAL_FIELDS else f"{symbol} {value}")
        length = getattr(item, "min_length", None)
        if length is not None:
            parts.append(f"length >= {length}")
        length = getattr(item, "max_length", None)
        if length is not None:
            parts.append(f"length <= {length}")
        pattern = getattr(item, "pattern", None)
        if pattern is not None:
            parts.append(f"matches {pattern}")
    return ", ".join(parts)


def _type_name(annotation: object) -> str:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        names = [_type_name(arg) for arg in get_args(annotation) if arg is not type(None)]
        return " or ".join(names)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(arg) for arg in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        return f"list of {_type_name(item)}"
    simple: dict[object, str] = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        Path: "path",
        SecretStr: "secret string",
    }
    if annotation in simple:
        return simple[annotation]
    raise TypeError(f"make_default_config.py does not know how to describe {annotation!r}; teach _type_name")


def _toml_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"0o{value:o}" if key in OCTAL_FIELDS else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Enum):
        return _toml_value(key, value.value)
    if isinstance(value, str | PurePath):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(key, item) for item in value) + "]"
    raise TypeError(f"make_default_config.py cannot write {value!r} ({key}) as TOML; teach _toml_value")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), help="file to write, '-' = stdout")
    parser.add_argument("--check", action="store_true", help="compare with --output instead of writing it")
    args = parser.parse_args(argv)
    text = render()
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    target = Path(args.output)
    if args.check:
        current = target.read_text() if target.is_file() else ""
        if current == text:
            return 0
        sys.stderr.writelines(
            difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True), str(target), "generated"
            )
        )
        sys.stderr.write(f"{target} is out of date: run python packaging/make_default_config.py\n")
        return 1
    target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
