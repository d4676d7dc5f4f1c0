"""Files under ``/dev/shm`` named ``<prefix>-<creator pid>-<hex>`` (shared-memory segments, Hetis mailboxes):
the creator unlinks its own; :func:`sweep_dead_owners` removes those whose creator died before it could."""

from __future__ import annotations

import contextlib
import os
import re


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
