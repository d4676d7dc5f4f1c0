"""Files under ``/dev/shm`` named ``<prefix>-<creator pid>-<hex>`` (shared-memory segments, Hetis mailboxes):
the creator unlinks its own; :func:`sweep_dead_owners` removes those whose creator died before it could."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator


def sweep_dead_owners(directory: str, prefix: str) -> int:
    """Unlink the ``prefix`` files in ``directory`` whose creating process is gone; returns how many."""
    n = 0
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)-[0-9a-f]+")
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            m = pattern.fullmatch(entry)
            if m is None:
                continue
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, entry))
                    n += 1
            except PermissionError:
                pass
    return n


@contextlib.contextmanager
def new_owned_file(directory: str, prefix: str) -> Iterator[tuple[str, int]]:
    """A fresh 0600 file ``<prefix>-<this pid>-<hex>`` in ``directory``, open read-write: yields (path, fd). The fd
    is closed after the block; the file is unlinked if the block raises (what a sweep would otherwise find)."""
    path = os.path.join(directory, f"{prefix}-{os.getpid()}-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        yield path, fd
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)
