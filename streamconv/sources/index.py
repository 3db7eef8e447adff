"""Index a checkpoint: canonical name -> where its bytes are, from the headers alone.

:func:`index_checkpoint` locates the weight files (:mod:`.locate`), reads and
validates each header (:mod:`.header`), and asks the naming schemes
(:mod:`.schemes`) what every entry is. Model weights become
:class:`~.tensor.SourceTensor` s under their canonical names; optimizer states,
step counters and placeholders are skipped and counted; anything else is
refused, because guessing would risk a silently wrong model.

Per-rank training output is indexed by :mod:`.msdist.index` into
:class:`~.msdist.composite.CompositeTensor` s (each weight read from the slices
that tile it); everything after the index treats both alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from ..core.errors import FlagError, InputError
from .fp8 import BLOCK, attach_scales
from .header import read_header
from .locate import locate
from .mapped import file_identity
from .schemes import SCHEMES, EntryClass, classify, refusal
from .skipped import Skipped
from .tensor import SourceTensor


@dataclass
class SourceIndex:
    load_path: str
    layout: str  # human description of what was found
    files: list  # safetensors files read, in order
    tensors: dict  # canonical name -> SourceTensor
    skipped: Skipped
    schemes: tuple = ()  # the InputSchemes whose names occur, in registry order
    strategy_files: list = field(default_factory=list)  # per-rank input: the parallel strategy files read
    details: list = field(default_factory=list)  # (label, text) lines plan prints about the input

    @property
    def scheme(self):
        """The scheme that decides layouts and notes: the first of the registry that occurs."""
        return self.schemes[0] if self.schemes else SCHEMES[0]

    @property
    def legacy_names(self) -> bool:
        return any(s.name == "mindformers-legacy" for s in self.schemes)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def assembled(self) -> bool:
        """Some weight is assembled from several slices, so a read may need an assembly buffer."""
        return any(len(getattr(t, "slices", ())) > 1 for t in self.tensors.values())

    def fingerprint(self) -> list:
        """What identifies this input for ``--resume``: files (every rank file, the strategy) with size, mtime
        and inode.

        The inode tells a file replaced by another of the same size and time (a
        copy renamed into place); the stream checks the same identity when it
        opens each file, so a file changed after planning is refused.
        """
        out = []
        for p in list(self.files) + list(self.strategy_files):
            st = os.stat(p)
            out.append([os.path.abspath(p), *file_identity(st)])
        return out


def index_checkpoint(load_path: str, strategy_path: str | None = None, step: int | None = None) -> SourceIndex:
    """Read every header of the checkpoint at ``load_path`` and classify its tensors.

    ``strategy_path`` and ``step`` (``--src-strategy-path``, ``--step``) apply to
    per-rank training output only.
    """
    skipped = Skipped()
    found = locate(load_path, skipped)
    if found.per_rank is not None:
        from .msdist.index import index_distributed  # imports protobuf

        d = index_distributed(found.per_rank, strategy_path, step, skipped)
        tensors, schemes = settle_schemes(load_path, d.tensors, d.schemes)
        return SourceIndex(load_path, d.layout, d.files, tensors, skipped, schemes, d.strategy_files, d.details)
    if strategy_path is not None:
        raise FlagError(
            f"--src-strategy-path {strategy_path}: only per-rank training output (rank_N/..._rank_N-E_S.safetensors) "
            f"has a parallel strategy, and {load_path} is a merged checkpoint ({found.layout}); drop the flag"
        )
    if step is not None:
        raise FlagError(
            f"--step {step}: chooses among the steps saved in per-rank training output, and {load_path} is a "
            f"merged checkpoint ({found.layout}); drop the flag"
        )
    weight_map = found.weight_map
    tensors: dict = {}
    raw_seen: dict = {}
    used = set()
    unknown = []
    copies = []
    scales = []
    for path in found.files:
        hdr = read_header(path)
        if str(hdr.metadata.get("remove_redundancy", "")).lower() == "true":
            # MindSpore's de-duplicated parallel save: a replicated weight is kept by one rank only
            raise InputError(
                f"{path}: saved with remove_redundancy: True, so it is one rank's part of a per-rank training "
                "run (weights another rank kept are missing from it); point --load-dir at the directory holding "
                "every rank_N/ with its strategy")
        for name, info in hdr.tensors.items():
            if name in raw_seen:
                raise InputError(
                    f"tensor {name!r} appears in both {raw_seen[name]} and {path}; "
                    "remove the duplicate file (mixed checkpoints?)"
                )
            raw_seen[name] = path
            if weight_map is not None and name in weight_map:
                want = os.path.join(os.path.dirname(path), weight_map[name])
                if os.path.abspath(want) != os.path.abspath(path):
                    raise InputError(f"{path}: holds {name!r}, but the index says it is in {weight_map[name]}; the index is stale")
            cls = classify(name)
            if skipped.set_aside(cls.kind, name):
                if cls.kind is EntryClass.OPTIMIZER:
                    skipped.optimizer_bytes += info.nbytes
                continue
            if cls.kind is EntryClass.SCALE:
                scales.append((cls.canonical, SourceTensor(cls.canonical, name, path, info, cls.scheme.name)))
                used.add(cls.scheme.name)
                continue
            if cls.kind is EntryClass.COPY:
                copies.append((name, path, info, cls.canonical))
                used.add(cls.scheme.name)
                continue
            if cls.kind is EntryClass.UNKNOWN:
                why = refusal(name)
                if why:
                    raise InputError(f"{path}: {why}")
                unknown.append((name, path))
                continue
            if not cls.shared:
                used.add(cls.scheme.name)
            if cls.canonical in tensors:
                other = tensors[cls.canonical]
                raise InputError(
                    f"tensor {name!r} in {path} and {other.name!r} in {other.path} are the same weight "
                    f"({cls.canonical}); the checkpoint mixes two naming schemes"
                )
            tensors[cls.canonical] = SourceTensor(cls.canonical, name, path, info, cls.scheme.name)
    if weight_map is not None:
        missing = [n for n in weight_map if n not in raw_seen]
        if missing:
            raise InputError(
                f"index lists {missing[0]!r} in {weight_map[missing[0]]}, but that file does not hold it"
                + (f" ({len(missing)} such tensors)" if len(missing) > 1 else "")
                + "; the checkpoint is incomplete"
            )
    if unknown:
        name, path = unknown[0]
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise InputError(
            f"{path}: tensor {name!r}{more} is neither a GPT model weight nor a known optimizer/step "
            "entry; streamconv converts Llama/Qwen-style GPT checkpoints only"
        )
    if not tensors:
        raise InputError(f"{load_path}: holds no model weights (only optimizer or step entries)")
    set_aside_copies(copies, tensors, skipped)
    tensors = attach_scales(tensors, scales)
    tensors, schemes = settle_schemes(load_path, tensors, used)
    details = [("fp8", f"{len(scales)} FP8 weights dequantized with their {BLOCK}x{BLOCK} block scales "
                       "(weight_scale_inv) while read, in F32, then cast to BF16")] if scales else []
    return SourceIndex(load_path, found.layout, found.files, tensors, skipped, schemes, details=details)


def set_aside_copies(copies: list, tensors: dict, skipped: Skipped) -> None:
    """Skip stored copies of shared weights (DeepSeek's MTP layer repeats the embedding and output head).

    Megatron's MTP layers use the model's own embedding and output layer, so a
    copy has nowhere to go; it must at least be shaped like the weight it copies.
    """
    for name, path, info, of in copies:
        main = tensors.get(of)
        if main is None and of == "output_layer.weight":
            main = tensors.get("embedding.word_embeddings.weight")  # tied: the head is the embedding
        if main is None or tuple(main.shape) != tuple(info.shape):
            raise InputError(
                f"{path}: tensor {name!r} {list(info.shape)} should be a copy of {of} "
                + (f"{list(main.shape)}" if main is not None else "(absent)")
                + "; the checkpoint is damaged or not the model its names say")
    if copies:
        skipped.other.append(("copies of the shared embedding / output head stored in the multi-token-prediction "
                              "layer (Megatron's MTP uses the model's own)", [c[0] for c in copies]))


def settle_schemes(load_path: str, tensors: dict, used: set) -> tuple:
    """(tensors, schemes): the schemes whose names occur, checked to go together; shared names given the scheme."""
    schemes = tuple(s for s in SCHEMES if s.name in used)
    alone = next((s for s in schemes if s.exclusive), None)
    if alone is not None and len(schemes) > 1:
        other = next(s for s in schemes if s is not alone)
        raise InputError(
            f"{load_path}: mixes {alone.description} with {other.description}; convert one checkpoint at a time"
        )
    if schemes:  # a name several schemes share (lm_head.weight) belongs to the checkpoint's scheme
        tensors = {k: t if t.scheme in used else replace(t, scheme=schemes[0].name) for k, t in tensors.items()}
    for scheme in schemes:
        tensors = scheme.regroup(tensors)
    return tensors, schemes
