"""How this process was started: by ``torchrun`` or not, as which worker, after a restart or not.

Three places need to know (``python -m streamconv``'s exit, the command line's
C++ log level, the conversion's choice between one process and several), and
they must agree, so the environment variables torchrun sets are read here only.
Light on purpose: ``import streamconv.cli`` may load it (no torch).
"""

from __future__ import annotations

import os


def under_torchrun() -> bool:
    """Started by torchrun (or a launcher that sets the same variables), with any number of workers."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def torchrun_world() -> tuple | None:
    """(rank, world size) when torchrun started this process with more than one worker, else None."""
    if not under_torchrun():
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
    except ValueError:
        return None
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return None
    return rank, world


def restart_count() -> int:
    """How often torchrun has restarted the workers after a failure (``--max-restarts``); 0 on the first attempt."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def restarted() -> bool:
    """True when torchrun restarted the workers after a failure: then a run resumes."""
    return restart_count() > 0
