"""Warm the page cache with the first source bytes while Python imports torch.

Between reading the headers and streaming the first block, the process spends
a few seconds importing torch and building the plan; the disk would sit idle.
:func:`start` asks the kernel (``POSIX_FADV_WILLNEED``) to read the first
tensors in the order the stream will use them, up to a small byte budget, on a
daemon thread. The pages land in the page cache, not in this process's resident
set, so the memory budget is unaffected; the cap keeps a container's page cache
use modest.
"""

from __future__ import annotations

import os
import threading

import psutil

from .schemes import layer_of

DEFAULT_CAP = 1024 * 2**20


def _order(index) -> list:
    """Source tensors roughly in first-use order: embedding, layers in order, the rest."""
    def key(item):
        name = item[0]
        if name.startswith("embedding."):
            return (0, 0, name)
        layer = layer_of(name)
        if layer is not None:
            return (1, layer, name)
        return (2, 0, name)
    return [t for _, t in sorted(index.tensors.items(), key=key)]


def start(index, cap: int | None = None) -> threading.Thread | None:
    if not hasattr(os, "posix_fadvise"):
        return None
    cap = min(cap or DEFAULT_CAP, psutil.virtual_memory().available // 4)
    ranges, total = [], 0
    for t in _order(index):
        rows = t.shape[0] if t.shape else 1
        for path, lo, hi in t.spans(0, rows):
            if total >= cap:
                break
            n = min(hi - lo, cap - total)
            ranges.append((path, lo, n))
            total += n

    def run():
        fds: dict = {}
        try:
            for path, start, n in ranges:
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, start, n, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint
        finally:
            for fd in fds.values():
                os.close(fd)

    th = threading.Thread(target=run, name="streamconv-prefetch", daemon=True)
    th.start()
    return th
