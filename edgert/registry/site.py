"""Files of the static site under ``repository/``: atomic writes with mode 0644, and the mirror copy.

Every file devices read goes through :func:`write_site_file` or :func:`copy_site_file`;
:func:`mirror` copies the site to another directory (``publish --out``) in an order a
device polling meanwhile can read through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Final

from edgert import store

#: Every file of the static site: the HTTP host serves it as another user (nginx as www-data), and
#: nothing in it is secret. mkstemp would make it 0600, which once took a fleet's updates down.
#: Directories are made with mkdir and honour the umask.
SITE_FILE_MODE: Final = 0o644


def mirror(source: Path, destination: Path) -> int:
    """Copy the static site to ``destination`` in an order devices can read through.

    Files that carry their version or hash in their name first (new ones only),
    then ``root.json``, then ``timestamp.json``: a device polling meanwhile sees
    the old publication or the new one, never a timestamp naming missing files.
    """
    copied = 0
    last = [source / "metadata" / "root.json", source / "metadata" / "timestamp.json"]
    for path in sorted(p for p in source.rglob("*") if p.is_file() and p not in last):
        target = destination / path.relative_to(source)
        if target.is_file() and target.stat().st_size == path.stat().st_size:
            make_readable(target)  # an older edgert published it 0600: repaired in place
            continue  # content-addressed: the same name is the same bytes
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_site_file(path, target)
        copied += 1
    for path in last:
        if path.is_file():
            (destination / "metadata").mkdir(parents=True, exist_ok=True)
            write_site_file(destination / "metadata" / path.name, path.read_bytes())
            copied += 1
    return copied


def make_readable(path: Path) -> None:
    if stat.S_IMODE(path.stat().st_mode) != SITE_FILE_MODE:
        path.chmod(SITE_FILE_MODE)


def write_site_file(path: Path, data: bytes) -> None:
    """Write a file of the static site atomically (temp file, fsync, rename) with mode 0644."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, SITE_FILE_MODE)  # before the rename: the file is never visible with another mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        store.install_file(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def copy_site_file(source: Path, destination: Path) -> None:
    """Copy ``source`` into the static site atomically with mode 0644, whatever the source's mode or the umask."""
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, SITE_FILE_MODE)
        with os.fdopen(fd, "wb") as fh, source.open("rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)
        store.install_file(tmp, destination)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
