"""Which layers exist, what each one is, and whether every tensor of every layer fits.

Layer indices must run 0..L-1 without gaps. Each layer gets a
:class:`~.config.LayerSpec`; layers of the same structural kind must match the
first layer of that kind tensor for tensor, so a damaged or mixed checkpoint is
refused naming the tensor, and anything left over that no layer explains is
refused too.
"""

from __future__ import annotations

from ..core.errors import InputError
from ..sources.schemes import layer_key, layer_of
from . import attention, mlp, norms
from .config import LayerSpec, ModelConfig
from .tensors import Tensors, check_flag


def count(t: Tensors, o, notes: list) -> int:
    """Number of layers (indices must be 0..L-1)."""
    layers = sorted({i for i in (layer_of(k) for k in t.all) if i is not None})
    if not layers:
        raise InputError(f"{t.index.load_path}: no transformer layers (decoder.layers.N.* / model.layers.N.*) found")
    n = len(layers)
    if layers[-1] != n - 1:  # sorted distinct indices: a gap somewhere
        gap = next(i for i, x in enumerate(layers) if x != i)
        raise InputError(f"layer {gap} is missing from {t.index.load_path} (found layers up to {layers[-1]}); the checkpoint is incomplete")
    check_flag("--num-layers", o.num_layers, n, "the number of layers found is")
    if o.num_layers is None:
        notes.append(f"num_layers={n}")
    return n


def expected_shapes(spec: LayerSpec, h: int, norm_bias: bool) -> dict:
    """Per-layer suffix -> source shape for a layer of this spec."""
    s = norms.layer_shapes(h, norm_bias)
    s.update(attention.expected_shapes(spec.attention, h, norm_bias))
    s.update(mlp.expected_shapes(spec.mlp, h))
    return s


def check_all(t: Tensors, c: ModelConfig) -> None:
    """Every layer must hold exactly the tensors of its spec with the expected shapes; nothing else may be left."""
    expected_names = set()
    for i, spec in enumerate(c.layers):
        want = expected_shapes(spec, c.hidden_size, c.norm_has_bias)
        for suffix, shape in want.items():
            name = layer_key(i, suffix)
            expected_names.add(name)
            tensor = t.get(name)
            if tensor is None:
                raise InputError(f"tensor {name} is missing from {t.index.load_path}; the checkpoint is incomplete")
            if tuple(tensor.shape) != shape:
                raise InputError(f"{tensor.path}: {tensor.name} has shape {list(tensor.shape)}; expected {list(shape)} like layer 0")
    expected_names.add("embedding.word_embeddings.weight")
    if not c.tied:
        expected_names.add("output_layer.weight")
    expected_names.update(norms.final_norm(t, c.hidden_size, c.norm_has_bias))
    extra = sorted(set(t.all) - expected_names)
    if extra:
        tensor = t.get(extra[0])
        raise InputError(
            f"{tensor.path}: tensor {tensor.name!r} does not belong to a {c.normalization} model with these "
            f"settings (layer 0 has no such tensor); the checkpoint mixes configurations"
        )
