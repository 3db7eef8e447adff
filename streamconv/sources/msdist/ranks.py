"""Find the per-rank files of one checkpoint step of a MindSpore training run.

What a mindformers run leaves (FORMAT.md §8)::

    output/checkpoint/rank_N/<prefix>_rank_N-<epoch>_<step>.safetensors   (+ meta.json)
    output/strategy/ckpt_strategy_rank_N.{ckpt,json}

``--load-dir`` may be the run's output directory (``checkpoint/`` + ``strategy/``),
the ``checkpoint/`` directory itself (the strategy then given separately, as
MindSpore's ``src_strategy_path``), or one directory holding every rank's
``*_rank_N-E_S.safetensors`` side by side.

A rank directory keeps one file per saved step. We take the newest
``(epoch, step)`` that every rank has (a run killed while saving leaves the last
step incomplete), or the step asked for. Rank numbers must run 0..N-1 without a
hole; whether N is the whole world is checked against the strategy later
(:func:`.assemble.assemble`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ...core.errors import InputError, PathError

_RANK_DIR_RE = re.compile(r"rank_(0|[1-9]\d{0,6})")
_RANK_FILE_RE = re.compile(
    r"(?P<prefix>.+)_rank_(?P<rank>0|[1-9]\d{0,6})-(?P<epoch>\d{1,9})_(?P<step>\d{1,12})\.safetensors"
)


@dataclass(frozen=True)
class RankFile:
    rank: int  # global rank
    path: str
    prefix: str
    epoch: int
    step: int


@dataclass
class RankSet:
    """One checkpoint step: the file of every rank, and where the strategy is."""

    checkpoint_dir: str
    files: dict = field(default_factory=dict)  # global rank -> RankFile, ranks 0..N-1
    strategy_path: str | None = None
    epoch: int = 0
    step: int = 0

    @property
    def world_size(self) -> int:
        return len(self.files)


def _listdir(path: str) -> list:
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        raise PathError(f"{path}: cannot list the directory ({e.strerror or e})") from None


def _scan_files(directory: str, expect_rank: int | None) -> list:
    """RankFile of every per-rank safetensors file in ``directory``."""
    out = []
    for e in _listdir(directory):
        m = _RANK_FILE_RE.fullmatch(e)
        p = os.path.join(directory, e)
        if not m or not os.path.isfile(p):
            continue
        rank = int(m.group("rank"))
        if expect_rank is not None and rank != expect_rank:
            raise InputError(f"{p}: a rank {rank} file inside rank_{expect_rank}/; the rank directories are mixed up")
        out.append(RankFile(rank, p, m.group("prefix"), int(m.group("epoch")), int(m.group("step"))))
    return out


def _collect(checkpoint_dir: str) -> dict:
    """{rank: [RankFile]} from rank_N/ subdirectories, or from files side by side."""
    entries = _listdir(checkpoint_dir)
    rank_dirs = [e for e in entries if _RANK_DIR_RE.fullmatch(e) and os.path.isdir(os.path.join(checkpoint_dir, e))]
    by_rank: dict = {}
    if rank_dirs:
        for e in rank_dirs:
            r = int(e[len("rank_"):])
            d = os.path.join(checkpoint_dir, e)
            files = _scan_files(d, r)
            if not files:
                other = [x for x in _listdir(d) if x.endswith(".ckpt")]
                hint = " (it has MindSpore .ckpt files: only safetensors checkpoints are read)" if other else ""
                raise InputError(f"{d}: no <prefix>_rank_{r}-<epoch>_<step>.safetensors file{hint}")
            by_rank[r] = files
    else:
        for f in _scan_files(checkpoint_dir, None):
            by_rank.setdefault(f.rank, []).append(f)
    return by_rank


def _pick(by_rank: dict, checkpoint_dir: str, step: int | None):
    """The (epoch, step) to read, and each rank's file of it."""
    keyed = {}
    for r, files in by_rank.items():
        k = {}
        for f in files:
            key = (f.epoch, f.step)
            if key in k:
                raise InputError(
                    f"{f.path}: rank {r} has two files for epoch {f.epoch} step {f.step} "
                    f"({os.path.basename(k[key].path)} too); keep one"
                )
            k[key] = f
        keyed[r] = k
    ranks = sorted(keyed)
    if step is not None:
        for r in ranks:
            hits = [key for key in keyed[r] if key[1] == step]
            if not hits:
                have = ", ".join(str(s) for _, s in sorted(keyed[r]))
                raise InputError(f"rank {r} has no checkpoint of step {step} in {checkpoint_dir} (it has steps {have})")
            if len(hits) > 1:
                raise InputError(
                    f"rank {r}: step {step} was saved in epochs {sorted(e for e, _ in hits)}; "
                    "keep only the files of the epoch you want"
                )
        chosen = next(key for key in keyed[ranks[0]] if key[1] == step)
        for r in ranks:
            if chosen not in keyed[r]:
                other = next(key for key in keyed[r] if key[1] == step)
                raise InputError(
                    f"rank {r} saved step {step} in epoch {other[0]} but rank {ranks[0]} in epoch {chosen[0]}; "
                    "the rank files are not of one run"
                )
    else:
        common = set(keyed[ranks[0]])
        for r in ranks[1:]:
            common &= set(keyed[r])
        if not common:
            # name the odd one out: a rank lacking the step most ranks have (ties: the newest)
            counts = {}
            for r in ranks:
                for key in keyed[r]:
                    counts[key] = counts.get(key, 0) + 1
            usual = max(counts, key=lambda k: (counts[k], k))
            lacking = next(r for r in ranks if usual not in keyed[r])
            have = ", ".join(f"epoch {e} step {s}" for e, s in sorted(keyed[lacking]))
            raise InputError(
                f"rank {lacking} has no checkpoint of epoch {usual[0]} step {usual[1]} (it has {have}) and no step "
                f"is saved by every rank in {checkpoint_dir}; the rank files are incomplete or of different runs"
            )
        chosen = max(common)
    return chosen, {r: keyed[r][chosen] for r in ranks}


def discover(load_dir: str, strategy_path: str | None = None, step: int | None = None) -> RankSet:
    """Find the rank files (and strategy) under ``load_dir``; see the module docstring.

    Refuses, in one line naming the rank: a hole in the rank numbers, a rank
    without the chosen step, two files of one step in a rank, a rank file inside
    another rank's directory; and a ``checkpoint/`` directory given without a
    strategy.
    """
    if not os.path.isdir(load_dir):
        raise PathError(f"{load_dir}: not a directory; give the training output or its checkpoint/ directory")
    ckpt = os.path.join(load_dir, "checkpoint")
    if os.path.isdir(ckpt):
        checkpoint_dir = ckpt
        if strategy_path is None and os.path.isdir(os.path.join(load_dir, "strategy")):
            strategy_path = os.path.join(load_dir, "strategy")
    else:
        checkpoint_dir = load_dir
    by_rank = _collect(checkpoint_dir)
    if not by_rank:
        raise InputError(
            f"{checkpoint_dir}: no per-rank files (rank_N/<prefix>_rank_N-<epoch>_<step>.safetensors); "
            "point at the training output or its checkpoint/ directory"
        )
    missing = [r for r in range(max(by_rank) + 1) if r not in by_rank]
    if missing:
        raise InputError(
            f"{checkpoint_dir}: rank {missing[0]} is missing (found ranks {sorted(by_rank)}); "
            "every rank's files are needed"
        )
    if strategy_path is None:
        lone = ("; a one-device run saves no strategy: then point --load-dir at its rank_0/ directory, whose file "
                "holds whole weights") if sorted(by_rank) == [0] else ""
        raise InputError(
            f"{checkpoint_dir}: per-rank files need the run's parallel strategy; give --src-strategy-path "
            f"(the strategy/ directory or merged strategy file){lone}"
        )
    (epoch, stp), files = _pick(by_rank, checkpoint_dir, step)
    return RankSet(checkpoint_dir, files, strategy_path, epoch, stp)
