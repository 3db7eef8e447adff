"""Which layers exist, what kind each one is, and whether every tensor of every layer fits.

Layer indices must run 0..L-1 without gaps. A layer's *kind* is its attention
(standard or multi-latent) and its MLP (dense or mixture of experts); real
models mix kinds (DeepSeek: the first layers dense). The first layer of each
kind is inferred from its shapes; every other layer of that kind must match it
tensor for tensor, so a damaged or mixed checkpoint is refused naming the
tensor, and anything no layer explains is refused too. Multi-token-prediction
(MTP) layers are a transformer layer each plus their own norms and projection.
"""

from __future__ import annotations

import re

from ..core.errors import InputError
from ..sources.schemes import layer_indices, layer_of
from . import attention, mla, mlp, moe, norms
from .config import AttentionKind, LayerSpec, MlpKind, ModelConfig
from .tensors import LayerTensors, Tensors, check_flag

_MTP_RE = re.compile(r"mtp\.layers\.(\d+)\.")


def count(t: Tensors, o, notes: list) -> int:
    """Number of layers (indices must be 0..L-1)."""
    layers = layer_indices(t.all)
    if not layers:
        raise InputError(f"{t.index.load_path}: no transformer layers (decoder.layers.N.* / model.layers.N.*) found")
    n = len(layers)
    if layers[-1] != n - 1:  # sorted distinct indices: a gap somewhere
        gap = next(i for i, x in enumerate(layers) if x != i)
        raise InputError(f"layer {gap} is missing from {t.index.load_path} (found layers up to {layers[-1]}); the checkpoint is incomplete")
    check_flag(o.source_of("num_layers", "--num-layers"), o.num_layers, n, "the number of layers found is")
    if o.num_layers is None:
        notes.append(f"num_layers={n}")
    return n


def count_mtp(t: Tensors, o) -> int:
    """Number of multi-token-prediction layers (mtp.layers.0..K-1)."""
    found = sorted({int(m.group(1)) for m in (_MTP_RE.match(k) for k in t.all) if m})
    if found and found[-1] != len(found) - 1:
        gap = next(i for i, x in enumerate(found) if x != i)
        raise InputError(f"MTP layer {gap} is missing from {t.index.load_path}; the checkpoint is incomplete")
    check_flag(o.source_of("mtp_num_layers", "--mtp-num-layers"), o.mtp_num_layers, len(found),
               "the number of MTP layers found is")
    return len(found)


def kind(lt: LayerTensors) -> tuple:
    return (AttentionKind.MLA if mla.is_mla(lt) else AttentionKind.STANDARD,
            MlpKind.MOE if moe.is_moe(lt) else MlpKind.DENSE)


def infer_one(lt: LayerTensors, h: int, o, notes: list) -> LayerSpec:
    """The spec of one layer from its own shapes (biases are decided model-wide afterwards)."""
    att_kind, mlp_kind = kind(lt)
    att = mla.infer(lt, h, o, notes) if att_kind is AttentionKind.MLA else attention.infer(lt, h, o, notes)
    if mlp_kind is MlpKind.MOE:
        m = moe.infer(lt, h, o, notes)
    else:
        m = mlp.infer_gating(lt, mlp.infer_dense(lt, h, o, notes), h, o, notes)
    return LayerSpec(att, m)


def infer_all(layer_tensors: list, h: int, o, notes: list) -> tuple:
    """(spec per layer, reference layer per layer): the first layer of each kind is inferred, others follow it."""
    refs: dict = {}
    specs, ref_of = [], []
    for lt in layer_tensors:
        k = kind(lt)
        if k not in refs:
            new: list = []
            refs[k] = (lt, infer_one(lt, h, o, new))
            notes.extend(n for n in new if n not in notes)
        specs.append(refs[k][1])
        ref_of.append(refs[k][0])
    return specs, ref_of


def expected_shapes(spec: LayerSpec, h: int, norm_bias: bool) -> dict:
    """Per-layer suffix -> source shape for a layer of this spec."""
    s = norms.layer_shapes(h, norm_bias)
    if spec.attention.kind is AttentionKind.MLA:
        s.update(mla.expected_shapes(spec.attention, h, norm_bias))
    else:
        s.update(attention.expected_shapes(spec.attention, h, norm_bias))
    if spec.mlp.kind is MlpKind.MOE:
        s.update(moe.expected_shapes(spec.mlp, h))
    else:
        s.update(mlp.expected_shapes(spec.mlp, h))
    return s


def mtp_shapes(h: int) -> dict:
    return {"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h), "final_layernorm.weight": (h,)}


def _check_layer(t: Tensors, lt: LayerTensors, want: dict, ref: LayerTensors, expected_names: set) -> None:
    like = f"like {ref.label}"
    for suffix, shape in want.items():
        name = lt.key(suffix)
        expected_names.add(name)
        tensor = t.get(name)
        if tensor is None:
            raise InputError(f"tensor {name} is missing from {t.index.load_path}; the checkpoint is incomplete")
        if tuple(tensor.shape) != shape:
            raise InputError(f"{tensor.path}: {tensor.name} has shape {list(tensor.shape)}; expected {list(shape)} {like}")


def check_all(t: Tensors, c: ModelConfig, refs: list, mtp_refs: list) -> None:
    """Every layer must hold exactly the tensors of its spec with the expected shapes; nothing else may be left."""
    expected_names: set = set()
    for i, spec in enumerate(c.layers):
        _check_layer(t, t.layer(i), expected_shapes(spec, c.hidden_size, c.norm_has_bias), refs[i], expected_names)
    for k, spec in enumerate(c.mtp_layers):
        lt = t.mtp_layer(k)
        _check_layer(t, lt, expected_shapes(spec, c.hidden_size, c.norm_has_bias), mtp_refs[k], expected_names)
        for suffix, shape in mtp_shapes(c.hidden_size).items():
            name = f"mtp.layers.{k}.{suffix}"
            expected_names.add(name)
            tensor = t.need(name)
            if tuple(tensor.shape) != shape:
                raise InputError(f"{tensor.path}: {tensor.name} has shape {list(tensor.shape)}; expected {list(shape)}")
    expected_names.add("embedding.word_embeddings.weight")
    if not c.tied:
        expected_names.add("output_layer.weight")
    expected_names.update(norms.final_norm(t, c.hidden_size, c.norm_has_bias))
    extra = sorted(set(t.all) - expected_names)
    if extra:
        tensor = t.get(extra[0])
        where = layer_of(extra[0])
        owner = f"layer {refs[where].i}" if where is not None else "layer 0"
        raise InputError(
            f"{tensor.path}: tensor {tensor.name!r} does not belong to a {c.normalization} model with these "
            f"settings ({owner} has no such tensor); the checkpoint mixes configurations"
        )
