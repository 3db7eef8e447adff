"""The keys of a Megatron-LM core rank's state dict, in Megatron's order, and how each is made.

``model`` in a legacy checkpoint is ``GPTModel.state_dict()``: module
registration order, each module's parameters then its ``_extra_state``. For the
``local`` spec a layer is ``input_layernorm, self_attention (linear_proj,
linear_qkv, q/k_layernorm), pre_mlp_layernorm, mlp (linear_fc1, linear_fc2)``;
``transformer_engine`` fuses the two layer norms into ``linear_qkv`` and
``linear_fc1`` (``layer_norm_weight``/``layer_norm_bias``) and adds
``core_attention._extra_state``. The official pipeline's values for
``_extra_state``: ``None`` for local linear layers; TE modules return an empty
uint8 tensor (linear layers, attention) or the pickled empty state dict ``{}``
(ops-based TE norms, which is also what ``decoder.final_layernorm`` is whenever
Transformer Engine is installed). See FORMAT.md §2.
"""

from __future__ import annotations

from ..core.options import TransformerImpl
from ..sources.schemes import SourceLayouts, layer_key
from . import rules as R
from .entries import TE_MODULE_EXTRA_STATE, TE_NORM_EXTRA_STATE, fixed_bytes, none, tensor
from .parallel import Axis


class LayerBuilder:
    """Entries of one source layer, written as layer ``i_out`` of its PP stage."""

    def __init__(self, cfg, src: dict, i_src: int, i_out: int, impl: str, layouts: SourceLayouts):
        self.cfg, self.src, self.i_src, self.i_out = cfg, src, i_src, i_out
        self.te = impl == TransformerImpl.TRANSFORMER_ENGINE
        self.layouts = layouts
        self.spec = cfg.layers[i_src]
        self.nb = cfg.norm_has_bias

    def S(self, suffix):  # noqa: N802 - source tensor of this layer
        return self.src[layer_key(self.i_src, suffix)]

    def K(self, suffix):  # noqa: N802 - output key of this layer
        return layer_key(self.i_out, suffix)

    def extra_state(self, module):
        key = self.K(f"{module}._extra_state")
        return fixed_bytes(key, TE_MODULE_EXTRA_STATE) if self.te else none(key)

    def norm(self, module, out_module=None, te_extra=False):
        """A norm's weight (+ bias); TE fuses input/pre-MLP norms into the next linear layer."""
        out_w, out_b = (f"{out_module}.layer_norm_weight", f"{out_module}.layer_norm_bias") if out_module \
            else (f"{module}.weight", f"{module}.bias")
        ents = [tensor(self.K(out_w), R.Whole(self.S(f"{module}.weight")), 1)]
        if self.nb:
            ents.append(tensor(self.K(out_b), R.Whole(self.S(f"{module}.bias")), 1))
        if te_extra:
            ents.append(fixed_bytes(self.K(f"{module}._extra_state"), TE_NORM_EXTRA_STATE))
        return ents

    def column_parallel(self, module, rule_for, has_bias):
        """linear_qkv / linear_fc1: rows split per rank by the given rule, bias likewise."""
        ents = [tensor(self.K(f"{module}.weight"), rule_for("weight"), 2)]
        if has_bias:
            ents.append(tensor(self.K(f"{module}.bias"), rule_for("bias"), 1))
        return ents + [self.extra_state(module)]

    def row_parallel(self, module, has_bias):
        """linear_proj / linear_fc2: columns split per rank; the bias is added once, so it is replicated."""
        ents = [tensor(self.K(f"{module}.weight"), R.Chunk(self.S(f"{module}.weight"), Axis.TP, dim=1), 2)]
        if has_bias:
            ents.append(tensor(self.K(f"{module}.bias"), R.Whole(self.S(f"{module}.bias")), 1))
        return ents + [self.extra_state(module)]

    def qkv_rule(self, part):
        a = self.spec.attention
        if a.split:  # q / k / v stored separately
            q, k, v = (self.S(f"self_attention.linear_{x}.{part}") for x in "qkv")
            return R.QkvParts(q, k, v, a.num_heads, a.num_query_groups, a.head_dim)
        return R.QkvFused(self.S(f"self_attention.linear_qkv.{part}"), a.num_heads, a.num_query_groups,
                          a.head_dim, self.layouts.qkv)

    def fc1_rule(self, part):
        m = self.spec.mlp
        if m.split:  # gate / up stored separately
            return R.GatedParts(self.S(f"mlp.linear_fc1_gate.{part}"), self.S(f"mlp.linear_fc1_up.{part}"), m.ffn)
        t = self.S(f"mlp.linear_fc1.{part}")
        return R.GatedFused(t, m.ffn, self.layouts.fc1) if m.gated else R.Chunk(t)

    def attention(self) -> list:
        a = self.spec.attention
        out = []
        out += self.row_parallel("self_attention.linear_proj", a.proj_bias)
        if self.te:
            out += self.norm("input_layernorm", out_module="self_attention.linear_qkv")
        out += self.column_parallel("self_attention.linear_qkv", self.qkv_rule, a.qkv_bias)
        if a.qk_layernorm:
            out += self.norm("self_attention.q_layernorm", te_extra=self.te)
            out += self.norm("self_attention.k_layernorm", te_extra=self.te)
        return out

    def mlp(self) -> list:
        out = []
        if self.te:
            out += self.norm("pre_mlp_layernorm", out_module="mlp.linear_fc1")
        else:
            out += self.norm("pre_mlp_layernorm")
        out += self.column_parallel("mlp.linear_fc1", self.fc1_rule, self.spec.mlp.bias)
        out += self.row_parallel("mlp.linear_fc2", self.spec.mlp.bias)
        return out

    def entries(self) -> list:
        # TransformerLayer: input_layernorm, self_attention(core_attention, linear_proj, linear_qkv,
        # q_layernorm, k_layernorm), pre_mlp_layernorm, mlp(linear_fc1, linear_fc2)
        out = []
        if self.te:
            out.append(fixed_bytes(self.K("self_attention.core_attention._extra_state"), TE_MODULE_EXTRA_STATE))
        else:
            out += self.norm("input_layernorm")
        return out + self.attention() + self.mlp()


def stage_layers(cfg, pp_size: int, stage: int) -> range:
    """Source layers of PP stage ``stage`` (contiguous, equal shares)."""
    per = cfg.num_layers // pp_size
    return range(stage * per, (stage + 1) * per)


def stage_entries(cfg, src: dict, stage: int, pp_size: int, impl: str, layouts: SourceLayouts) -> list:
    """All entry specs of PP stage ``stage`` (identical key lists on every rank of the stage)."""
    first, last = stage == 0, stage == pp_size - 1
    vocab_rule = R.VocabChunk(src["embedding.word_embeddings.weight"], cfg.padded_vocab_size)
    out: list = []
    if first:
        out.append(tensor("embedding.word_embeddings.weight", vocab_rule, 2))
    for j, i in enumerate(stage_layers(cfg, pp_size, stage)):
        out += LayerBuilder(cfg, src, i, j, impl, layouts).entries()
    if last:
        out.append(tensor("decoder.final_layernorm.weight", R.Whole(src["decoder.final_layernorm.weight"]), 1))
        if cfg.norm_has_bias:
            out.append(tensor("decoder.final_layernorm.bias", R.Whole(src["decoder.final_layernorm.bias"]), 1))
        out.append(fixed_bytes("decoder.final_layernorm._extra_state", TE_NORM_EXTRA_STATE))
        if not cfg.tied:
            out.append(tensor("output_layer.weight", R.VocabChunk(src["output_layer.weight"], cfg.padded_vocab_size), 2))
        elif pp_size > 1:
            # Megatron keeps a copy of the (padded) word embeddings on the last stage.
            out.append(tensor("output_layer.weight", vocab_rule, 2))
        # GPTModel's output layer is Megatron's own ColumnParallelLinear under both specs.
        out.append(none("output_layer._extra_state"))
    return out
