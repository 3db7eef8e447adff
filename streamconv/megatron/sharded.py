"""Megatron's *sharded* view of a rank's state dict: global keys, global shapes, where each shard sits.

Megatron's ``torch_dist`` checkpoint (core_r0.12 ``GPTModel.sharded_state_dict``)
does not store per-rank state dicts; it stores each parameter once, as a global
tensor cut into the shards the ranks hold (``ShardedTensor``: key, global shape,
global offset, local shape, replica id), plus each ``_extra_state`` as a
``ShardedObject``. This module turns a rank's resolved legacy entries
(:mod:`.entries`, keys in Megatron's ``state_dict()`` order) into those shards,
keeping only the main replicas (each shard is stored exactly once). Where a
shard sits inside one layer's parameter is the rule's knowledge
(``rules.*.placements``); what is here is the key-level knowledge:

* **layer stacking**: homogeneous layers share one key ``decoder.layers.<name>``
  with a leading layer axis (layer ``g`` of ``num_layers`` is the chunk at offset
  ``g`` of size 1); non-homogeneous ones (``--moe-layer-freq`` a list or > 1) keep
  ``decoder.layers.<g>.<name>`` with no layer axis (TransformerBlock.sharded_state_dict);
* **experts**: local expert ``i`` on EP rank ``e`` is global expert ``e*L + i`` on an
  expert axis after the layer axis, under ``mlp.experts.experts.`` (SequentialMLP and
  TEGroupedMLP write interchangeable keys);
* **names**: the local spec renames ``input_layernorm.`` / ``pre_mlp_layernorm.`` to
  ``self_attention.linear_qkv.layer_norm_`` / ``mlp.linear_fc1.layer_norm_``
  (``sharded_state_dict_keys_map``; not for MLA), so dense local and TE keys coincide;
* **objects**: every ``<module>._extra_state`` is a ShardedObject keyed
  ``<key>/shard_<offsets>_<shape>`` over the layer (and expert) axes, ``shard_0_1``
  without them, replicated over TP (ETP for experts) and data parallel; GPTModel
  drops ``output_layer._extra_state``. The local spec's ``decoder.final_layernorm``
  is a torch norm without extra state where Transformer Engine is absent (Megatron's
  own local-spec save on such a machine has no such object, and a load with
  ``--dist-ckpt-strictness raise_all`` there rejects one), so it is not stored for the
  local spec; with TE installed Megatron makes that norm a TENorm, so a local-spec load
  there asks for it: use the transformer_engine names (the default) for TE machines;
* **tied output layer**: the last stage's copy of the word embeddings is a replica of
  ``embedding.word_embeddings.weight`` (replica id (1, 0, dp)) and is never stored; so is
  the embedding an MTP stage keeps besides the first;
* **MTP**: ``mtp.layers.<k>.transformer_layer.<name>`` follows the layer rules with no layer
  axis; the MTP layer's own norms and ``eh_proj`` keep their keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .entries import EntryKind
from .parallel import Axis

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_MTP_LAYER = re.compile(r"(mtp\.layers\.\d+\.transformer_layer\.)(.+)")
_LOCAL_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.+)")
_GROUPED_PARAM = re.compile(r"mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)")
_GROUPED_EXTRA = re.compile(r"mlp\.experts\.(linear_fc[12])\._extra_state")
_EXPERTS = "mlp.experts.experts."
#: sharded_state_dict_keys_map of the local spec (standard attention)
_LOCAL_NAMES = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))


@dataclass(frozen=True)
class ShardedChunk:
    """A main-replica ShardedTensor: rows ``[start, stop)`` of the rank's tensor, placed in a global tensor."""

    key: str
    global_shape: tuple
    offset: tuple  # global offset, one per axis
    shape: tuple  # the chunk's own shape, one per axis (size 1 on layer/expert axes)
    start: int
    stop: int


@dataclass(frozen=True)
class ShardedObj:
    """A main-replica ShardedObject: an ``_extra_state`` value under its unique key."""

    key: str
    offset: tuple
    shape: tuple
    value: object  # None, or bytes: the data of a uint8 tensor (a TE module's extra state)

    @property
    def unique_key(self) -> str:
        return sharded_object_key(self.key, self.offset, self.shape)


def sharded_object_key(key: str, global_offset: tuple, global_shape: tuple) -> str:
    """Megatron's ``ShardedObject.unique_key``: ``<key>/shard_<offset>_<shape>``, dot-joined.

    Megatron parses it back with ``unique_key.split('/')`` (so ``key`` must not
    contain ``/``) and the part after the slash with ``split('_')``; dots and
    underscores in ``key`` are fine (``decoder.layers.mlp.linear_fc1._extra_state``).
    """
    if "/" in key:
        raise ValueError(f"sharded object key {key!r} must not contain '/'")
    if len(global_offset) != len(global_shape):
        raise ValueError(f"sharded object {key}: offset {global_offset} and shape {global_shape} differ in rank")
    off = ".".join(str(int(o)) for o in global_offset)
    shp = ".".join(str(int(s)) for s in global_shape)
    return f"{key}/shard_{off}_{shp}"


def stacks_layers(args) -> bool:
    """Whether Megatron stacks the decoder layers on a leading axis (TransformerBlock's rule)."""
    freq = getattr(args, "moe_layer_freq", 1)
    if isinstance(freq, (list, tuple)) or (isinstance(freq, int) and freq > 1):
        return False
    return not getattr(args, "heterogeneous_block_specs", False)


@dataclass(frozen=True)
class _Target:
    key: str
    prepend: tuple  # ((index, size), ...): layer axis, then expert axis
    expert: bool


class ShardedView:
    """The sharded keys of one conversion: built from the ``args`` the checkpoint records."""

    def __init__(self, args, sizes):
        self.sizes = sizes
        self.num_layers = args.num_layers
        self.stacked = stacks_layers(args)
        self.local_spec = getattr(args, "transformer_impl", "") == "local"
        self.local_names = self.local_spec and not getattr(args, "multi_latent_attention", False)
        self.tied = not getattr(args, "untie_embeddings_and_output_weights", True)
        self.num_experts = getattr(args, "num_experts", None)

    # -- keys ------------------------------------------------------------------------
    def _local_experts(self, key: str) -> int:
        if not self.num_experts:
            raise ValueError(f"{key}: an expert weight, but args.num_experts is {self.num_experts!r}")
        return self.num_experts // self.sizes.ep

    def _targets(self, key: str, rank, layers: range) -> list:
        if key == "output_layer._extra_state":
            return []  # GPTModel.sharded_state_dict pops it
        if key == "decoder.final_layernorm._extra_state" and self.local_spec:
            return []  # the local spec's final norm without Transformer Engine: a torch norm, no extra state
        if key == "output_layer.weight" and self.tied:
            return []  # a replica of the first stage's embedding (replica id (1, 0, dp))
        if key == "embedding.word_embeddings.weight" and rank.coord.pp > 0:
            return []  # the MTP stage's copy of the embedding: a replica too (tie_word_embeddings_state_dict)
        m = _LAYER.fullmatch(key)
        if m is not None:
            j, rest = int(m.group(1)), m.group(2)
            if not 0 <= j < len(layers):
                raise ValueError(f"{key}: layer {j} outside the stage's {len(layers)} layers")
            g = layers[j]
            if self.stacked:
                prefix, prepend = "decoder.layers.", ((g, self.num_layers),)
            else:
                prefix, prepend = f"decoder.layers.{g}.", ()
        elif (m := _MTP_LAYER.fullmatch(key)) is not None:
            # MultiTokenPredictionBlock: its layers are never stacked (global index in the key)
            prefix, prepend, rest = m.group(1), (), m.group(2)
        else:
            return [_Target(key, (), False)]
        if self.local_names:
            for old, new in _LOCAL_NAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
        e, n_ep = rank.of(Axis.EP)
        if (x := _LOCAL_EXPERT.fullmatch(rest)) is not None:
            per = self._local_experts(key)
            expert = ((e * per + int(x.group(1)), per * n_ep),)
            return [_Target(prefix + _EXPERTS + x.group(2), prepend + expert, True)]
        if (x := _GROUPED_PARAM.fullmatch(rest)) is not None:
            per = self._local_experts(key)
            expert = ((e * per + int(x.group(3)), per * n_ep),)
            return [_Target(f"{prefix}{_EXPERTS}{x.group(1)}.{x.group(2)}", prepend + expert, True)]
        if (x := _GROUPED_EXTRA.fullmatch(rest)) is not None:
            # TEGroupedLinear._sharded_state_dict_grouped: one object per expert, each the whole state
            per = self._local_experts(key)
            return [_Target(f"{prefix}{_EXPERTS}{x.group(1)}._extra_state", prepend + ((e * per + i, per * n_ep),), True)
                    for i in range(per)]
        return [_Target(prefix + rest, prepend, False)]

    # -- items -------------------------------------------------------------------------
    def items(self, entry, rank, layers: range) -> list:
        """The main-replica shards ``rank`` stores for ``entry``: ShardedChunk / ShardedObj, in order."""
        out = []
        for t in self._targets(entry.key, rank, layers):
            offs = tuple(i for i, _ in t.prepend)
            dims = tuple(n for _, n in t.prepend)
            if entry.kind is not EntryKind.TENSOR:
                if not entry.key.endswith("._extra_state"):  # pragma: no cover - layout invariant
                    raise ValueError(f"{entry.key}: a non-tensor value that is not an _extra_state")
                if rank.is_main(t.expert):
                    value = None if entry.kind is EntryKind.NONE else bytes(entry.data)
                    out.append(ShardedObj(t.key, offs or (0,), dims or (1,), value))
                continue
            for p in entry.rule.placements(rank):
                if not p.main:
                    continue
                if len(entry.shape) == 1:
                    gshape, off, shape = (p.shape[0],), (p.offset[0],), (p.stop - p.start,)
                else:
                    gshape, off, shape = tuple(p.shape), tuple(p.offset), (p.stop - p.start, entry.shape[1])
                out.append(ShardedChunk(t.key, dims + gshape, offs + off, (1,) * len(dims) + shape,
                                        p.start, p.stop))
        return out
