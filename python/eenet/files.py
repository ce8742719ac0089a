"""Writing a file whole or not at all.

``write_whole(path, fill)`` has ``fill(f)`` write a temporary file beside ``path`` (in the
same folder, so on the same file system), flushes it to disk and then moves it over
``path`` with ``os.replace``, which is atomic: a reader sees the old file or the new one,
never a part. If ``fill`` raises, or the disk fills up, the temporary file is removed and
``path`` keeps what it held. A symbolic link at ``path`` keeps pointing where it did: the
file it points to is the one replaced.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["write_whole"]


def write_whole(path: str | os.PathLike[str], fill: Callable[[BinaryIO], object]) -> None:
    """Write the file at ``path`` with ``fill(f)`` (``f`` a binary file open for writing),
    atomically (module docstring). The new file gets the permissions a plain ``open(path,
    "wb")`` would give a new file (0o666 less the umask)."""
    target = os.path.realpath(os.fspath(path))
    folder, name = os.path.split(target)
    while True:
        temp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
