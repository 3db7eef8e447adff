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

from ..core.options import Fc1Layout, TransformerImpl
from ..model.config import AttentionKind, ExpertStorage, MlpKind
from ..model.moe import reshaped_weight1
from ..sources.schemes import SourceLayouts, layer_key
from . import rules as R
from .entries import TE_MODULE_EXTRA_STATE, TE_NORM_EXTRA_STATE, OutDtype, fixed_bytes, none, tensor
from .parallel import Axis
from .pieces import Ref


class LayerBuilder:
    """Entries of one transformer layer (``spec``): source names under ``src_prefix``, keys under ``out_prefix``.

    A decoder layer is ``decoder.layers.<i>.`` in the input and ``decoder.layers.<j>.`` (its index in the PP
    stage) in the output; an MTP layer's transformer layer is ``mtp.layers.<k>.transformer_layer.`` on both.
    """

    def __init__(self, cfg, src: dict, spec, src_prefix: str, out_prefix: str, impl: str, layouts: SourceLayouts,
                 ep: int = 1, grouped_gemm: bool = False):
        self.cfg, self.src, self.spec = cfg, src, spec
        self.src_prefix, self.out_prefix = src_prefix, out_prefix
        self.te = impl == TransformerImpl.TRANSFORMER_ENGINE
        self.layouts = layouts
        self.nb = cfg.norm_has_bias
        self.ep, self.grouped_gemm = ep, grouped_gemm

    def S(self, suffix):  # noqa: N802 - source tensor of this layer
        return self.src[self.src_prefix + suffix]

    def K(self, suffix):  # noqa: N802 - output key of this layer
        return self.out_prefix + suffix

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

    def fc1_rule(self, part, prefix="mlp", m=None):
        """The fc1 of the dense MLP, or of the MLP at ``prefix`` with config ``m`` (MoE shared experts)."""
        m = m if m is not None else self.spec.mlp
        if m.split:  # gate / up stored separately
            return R.GatedParts(self.S(f"{prefix}.linear_fc1_gate.{part}"), self.S(f"{prefix}.linear_fc1_up.{part}"),
                                m.ffn)
        t = self.S(f"{prefix}.linear_fc1.{part}")  # a gated one follows --fc1-layout (mindformers interleaves it)
        return R.GatedFused(t, m.ffn, self.layouts.fc1) if m.gated else R.Chunk(t)

    def attention(self) -> list:
        a = self.spec.attention
        if a.kind is AttentionKind.MLA:
            return self.mla_attention()
        out = []
        out += self.row_parallel("self_attention.linear_proj", a.proj_bias)
        if self.te:
            out += self.norm("input_layernorm", out_module="self_attention.linear_qkv")
        out += self.column_parallel("self_attention.linear_qkv", self.qkv_rule, a.qkv_bias)
        if a.qk_layernorm:
            out += self.norm("self_attention.q_layernorm", te_extra=self.te)
            out += self.norm("self_attention.k_layernorm", te_extra=self.te)
        return out

    def mla_attention(self) -> list:
        """Multi-latent attention: every projection column-parallel by rows except linear_proj (FORMAT.md §6)."""
        a = self.spec.attention
        out = []
        if self.te:
            out.append(fixed_bytes(self.K("self_attention.core_attention._extra_state"), TE_MODULE_EXTRA_STATE))
        out += self.row_parallel("self_attention.linear_proj", False)
        if a.concat:  # mindformers' mla_qkv_concat: linear_qkv = [q_a (q_lora); c_kv (kv_lora); k_pe (rope)]
            qkv = self.S("self_attention.linear_qkv.weight")
            q_down = Ref(qkv, 0, a.q_lora_rank)
            kv_down = Ref(qkv, a.q_lora_rank, a.kv_lora_rank + a.qk_pos_emb_head_dim)
            q_up, kv_up = self.S("self_attention.linear_qb.weight"), self.S("self_attention.linear_kvb.weight")
            q_norm, kv_norm = "self_attention.q_layernorm", "self_attention.k_layernorm"
        else:
            q_down = self.S("self_attention.linear_q_down_proj.weight") if a.q_lora_rank is not None else None
            kv_down = self.S("self_attention.linear_kv_down_proj.weight")
            q_up = self.S("self_attention.linear_q_up_proj.weight") if a.q_lora_rank is not None \
                else self.S(a.q_proj)
            kv_up = self.S("self_attention.linear_kv_up_proj.weight")
            q_norm, kv_norm = "self_attention.q_layernorm", "self_attention.kv_layernorm"

        def linear(module, source, norm_module=None):
            ents = []
            if norm_module is not None and self.te and a.layernorms:  # TELayerNormColumnParallelLinear
                ents += self.norm(norm_module, out_module=module)
            return ents + self.column_parallel(module, lambda _: R.Chunk(source), False)

        if a.q_lora_rank is None:
            out += linear("self_attention.linear_q_proj", q_up)
        else:
            out += linear("self_attention.linear_q_down_proj", q_down)
            out += linear("self_attention.linear_q_up_proj", q_up, q_norm)
        out += linear("self_attention.linear_kv_down_proj", kv_down)
        out += linear("self_attention.linear_kv_up_proj", kv_up, kv_norm)
        if a.layernorms and not self.te:
            if a.q_lora_rank is not None:
                out.append(tensor(self.K("self_attention.q_layernorm.weight"), R.Whole(self.S(f"{q_norm}.weight")), 1))
            out.append(tensor(self.K("self_attention.kv_layernorm.weight"), R.Whole(self.S(f"{kv_norm}.weight")), 1))
        return out

    def moe_mlp(self) -> list:
        """Router, routed experts (EP picks them, ETP splits each), shared experts (TP) — FORMAT.md §6."""
        m = self.spec.mlp
        out = self.norm("pre_mlp_layernorm", te_extra=self.te)  # a TENorm of its own under the TE spec
        out.append(tensor(self.K("mlp.router.weight"), R.Whole(self.S("mlp.router.weight")), 2))
        if m.expert_bias:  # Megatron keeps the score-correction bias in fp32
            out.append(tensor(self.K("mlp.router.expert_bias"), R.Whole(self.S("mlp.router.expert_bias")), 1,
                              OutDtype.F32))
        local = m.num_experts // self.ep
        if m.storage is ExpertStorage.STACKED_TRANSPOSED:
            w1 = reshaped_weight1(self.S("mlp.experts.weight1"), m, self.cfg.hidden_size)
            w2 = self.S("mlp.experts.weight2")
            fc1 = [R.GatedFused(R.ExpertRef(w1, m.num_experts, i, transposed=True), m.ffn, Fc1Layout.CONCAT,
                                Axis.ETP) for i in range(local)]
            fc2 = [R.Chunk(R.ExpertRef(w2, m.num_experts, i, transposed=True), Axis.ETP, dim=1) for i in range(local)]
        else:
            gates = tuple(self.S(f"mlp.experts.{e}.linear_fc1_gate.weight") for e in range(m.num_experts))
            ups = tuple(self.S(f"mlp.experts.{e}.linear_fc1_up.weight") for e in range(m.num_experts))
            downs = tuple(self.S(f"mlp.experts.{e}.linear_fc2.weight") for e in range(m.num_experts))
            fc1 = [R.GatedParts(R.ExpertOf(gates, i), R.ExpertOf(ups, i), m.ffn, Axis.ETP) for i in range(local)]
            fc2 = [R.Chunk(R.ExpertOf(downs, i), Axis.ETP, dim=1) for i in range(local)]
        if self.grouped_gemm:  # TEGroupedMLP: one module per linear, weight<i> per local expert
            out += [tensor(self.K(f"mlp.experts.linear_fc1.weight{i}"), r, 2) for i, r in enumerate(fc1)]
            out.append(self.extra_state("mlp.experts.linear_fc1"))
            out += [tensor(self.K(f"mlp.experts.linear_fc2.weight{i}"), r, 2) for i, r in enumerate(fc2)]
            out.append(self.extra_state("mlp.experts.linear_fc2"))
        else:  # SequentialMLP
            for i in range(local):
                e = f"mlp.experts.local_experts.{i}"
                out += [tensor(self.K(f"{e}.linear_fc1.weight"), fc1[i], 2), self.extra_state(f"{e}.linear_fc1"),
                        tensor(self.K(f"{e}.linear_fc2.weight"), fc2[i], 2), self.extra_state(f"{e}.linear_fc2")]
        if m.shared is not None:
            sh = "mlp.shared_experts"  # stored like a dense gated MLP, bias-free
            out += self.column_parallel(f"{sh}.linear_fc1", lambda part: self.fc1_rule(part, sh, m.shared), False)
            out += self.row_parallel(f"{sh}.linear_fc2", False)
        return out

    def mlp(self) -> list:
        if self.spec.mlp.kind is MlpKind.MOE:
            return self.moe_mlp()
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
        if self.spec.attention.kind is AttentionKind.MLA:
            # MLA keeps its input norm (a TENorm of its own under the TE spec)
            out += self.norm("input_layernorm", te_extra=self.te)
        elif self.te:
            out.append(fixed_bytes(self.K("self_attention.core_attention._extra_state"), TE_MODULE_EXTRA_STATE))
        else:
            out += self.norm("input_layernorm")
        return out + self.attention() + self.mlp()


def stage_entries(cfg, src: dict, stage: int, sizes, impl: str, layouts: SourceLayouts,
                  grouped_gemm: bool = False) -> list:
    """All entry specs of PP stage ``stage`` (identical key lists on every rank of the stage)."""
    pp_size = sizes.pp
    first, last = stage == 0, stage == pp_size - 1
    vocab_rule = R.VocabChunk(src["embedding.word_embeddings.weight"], cfg.padded_vocab_size)
    te = impl == TransformerImpl.TRANSFORMER_ENGINE

    def builder(spec, src_prefix, out_prefix):
        return LayerBuilder(cfg, src, spec, src_prefix, out_prefix, impl, layouts, sizes.ep, grouped_gemm)

    out: list = []
    # with MTP layers the last stage needs the embeddings too (Megatron builds them there)
    if first or (last and cfg.mtp_layers):
        out.append(tensor("embedding.word_embeddings.weight", vocab_rule, 2))
    for j, i in enumerate(sizes.stage_layers(cfg.num_layers, stage)):
        out += builder(cfg.layers[i], layer_key(i, ""), layer_key(j, "")).entries()
    if last:
        out.append(tensor("decoder.final_layernorm.weight", R.Whole(src["decoder.final_layernorm.weight"]), 1))
        if cfg.norm_has_bias:
            out.append(tensor("decoder.final_layernorm.bias", R.Whole(src["decoder.final_layernorm.bias"]), 1))
        if cfg.moe is None or te:
            # the dense spec's final norm is a TE norm wherever TE is installed (FORMAT.md §2); the MoE block
            # spec's local final norm has no extra state (§6)
            out.append(fixed_bytes("decoder.final_layernorm._extra_state", TE_NORM_EXTRA_STATE))
        out += mtp_entries(cfg, builder, te)
        if not cfg.tied:
            out.append(tensor("output_layer.weight", R.VocabChunk(src["output_layer.weight"], cfg.padded_vocab_size), 2))
        elif pp_size > 1 and not cfg.mtp_layers:
            # Megatron keeps a copy of the (padded) word embeddings on the last stage.
            out.append(tensor("output_layer.weight", vocab_rule, 2))
        # GPTModel's output layer is Megatron's own ColumnParallelLinear under both specs.
        out.append(none("output_layer._extra_state"))
    return out


def mtp_entries(cfg, builder, te: bool) -> list:
    """Multi-token-prediction layers (last stage): enorm, hnorm, eh_proj [H/TP, 2H], a layer, final norm."""
    out = []
    for k, spec in enumerate(cfg.mtp_layers):
        p = f"mtp.layers.{k}."
        own = builder(spec, p, p)  # the MTP layer's own norms and eh_proj
        out += own.norm("enorm", te_extra=te) + own.norm("hnorm", te_extra=te)
        out.append(tensor(own.K("eh_proj.weight"), R.Chunk(own.S("eh_proj.weight")), 2))
        out.append(own.extra_state("eh_proj"))
        out += builder(spec, p + "transformer_layer.", p + "transformer_layer.").entries()
        out += own.norm("final_layernorm", te_extra=te)
    return out
