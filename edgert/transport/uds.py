"""Bind the daemon's Unix socket ourselves: mode 0660, optional group, stale cleanup.

uvicorn's own ``--uds`` chmods the socket to 0666 (any local user could talk to
the model), so edgert binds it and hands the listening socket to uvicorn.

A socket file left by a crashed daemon is replaced; a socket a live daemon still
answers on makes this one refuse to start, with a clear error.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from edgert.errors import ConfigError, SocketInUseError


def _live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # timeouts and the like: something is there, do not steal its path
    finally:
        probe.close()
    return True


@dataclass(frozen=True, slots=True)
class BoundSocket:
    sock: socket.socket
    path: Path
    #: inode of the socket file we created, so we never unlink a successor's
    inode: int

    def remove(self) -> None:
        """Unlink our socket file unless another daemon's has replaced it since."""
        with contextlib.suppress(OSError):
            if self.path.lstat().st_ino == self.inode:
                self.path.unlink()


def bind_unix_socket(path: Path, *, mode: int = 0o660, group: str | None = None, backlog: int = 128) -> BoundSocket:
    """A listening socket at ``path`` with ``mode`` and ``group`` set before anyone can connect."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        if _live(path):
            raise SocketInUseError(f"another edgert daemon is already serving on {path}")
        path.unlink()
    gid = _group_id(group) if group else -1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a tight umask so the socket is never, even briefly, wider than asked.
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        path.chmod(mode)
        if gid != -1:
            os.chown(path, -1, gid)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise ConfigError(f"cannot set up {path}: {exc.strerror}") from None
    sock.setblocking(False)
    return BoundSocket(sock, path, path.lstat().st_ino)


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"serve.socket_group: no group named {name!r}") from None
