"""Megatron's checkpoint directory: the iteration directory and the tracker that marks it complete.

Both formats put their files under ``iter_0000001/`` and are only loadable once
``latest_checkpointed_iteration.txt`` names the iteration (FORMAT.md §2, §7),
which is why the tracker is always written last.
"""

ITERATION = 1
ITERATION_DIR = f"iter_{ITERATION:07d}"
TRACKER = "latest_checkpointed_iteration.txt"
TRACKER_BYTES = str(ITERATION).encode()
