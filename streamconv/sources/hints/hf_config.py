"""Hints from a Hugging Face ``config.json`` (Llama, Qwen2/3, Qwen3-MoE, DeepSeek-V3 families).

Key mapping (FORMAT.md §6 "HF config -> Megatron flags", checked against real
Megatron r0.12 and transformers): ``rope_theta`` -> rotary_base,
``max_position_embeddings``, ``rms_norm_eps`` -> norm_epsilon,
``num_experts_per_tok`` -> moe_router_topk; DeepSeek-V3 routes with sigmoid
scores, ``routed_scaling_factor`` and, with ``n_group`` > 1, group-limited
top-k (``n_group``/``topk_group``); Qwen3-MoE uses softmax, where
``norm_topk_prob: false`` means Megatron's ``--moe-router-pre-softmax``. Yarn
``rope_scaling`` maps to rotary_scaling_factor / mscale / mscale_all_dim with
max_position_embeddings = ``original_max_position_embeddings``; Llama 3.1's
``llama3`` scaling (factor 8, low/high frequency factors 1/4, original context
8192: the only one Megatron r0.12's ``RotaryEmbedding(rope_scaling=True)``
computes, ``pretrain_gpt.py`` never passes another factor) maps to
``use_rope_scaling``. Model dimensions are hints too, checked against the
shapes like flags. Both config styles are read: ``rope_theta`` /
``rope_scaling`` (transformers 4) and ``rope_parameters`` (transformers 5).

A checkpoint with Hugging Face *names* is converted only together with its
config.json (:func:`check_hf_input`): the same tensor names are used by
architectures with other maths (Gemma's ``1 + weight`` norms, Mistral's sliding
window), so ``architectures[0]`` must be one of :data:`FAMILIES`, what Megatron
cannot express for them is refused in one line, and every dimension config.json
states must be the tensors' (a contradiction names config.json and the key).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from ...core.errors import InputError
from ..schemes.base import layer_indices
from . import Hint, load_json

SIGMOID_ROUTED = ("deepseek_v3",)

#: Llama 3.1's rope scaling: what Megatron r0.12's RotaryEmbedding(rope_scaling=True) hard-codes
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def rope(cfg: dict) -> tuple:
    """(rope base, its key, scaling dict or None, its key), from either config style."""
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else None
    theta, theta_key = cfg.get("rope_theta"), "rope_theta"
    if theta is None and params:
        theta, theta_key = params.get("rope_theta"), "rope_parameters.rope_theta"
    scaling, scaling_key = cfg.get("rope_scaling"), "rope_scaling"
    if scaling is None and params and params.get("rope_type", "default") != "default":
        scaling, scaling_key = params, "rope_parameters"
    return theta, theta_key, scaling, scaling_key


def is_llama3_scaling(rs: dict) -> bool:
    return (rs.get("rope_type", rs.get("type")) == "llama3"
            and all(isinstance(rs.get(k), (int, float)) and float(rs[k]) == v for k, v in LLAMA3_SCALING.items()))


def read(path: str) -> dict:
    cfg = load_json(path)
    name = os.path.basename(path)
    out: dict = {}

    def put(field, key, value=None, transform=None):
        v = cfg.get(key) if value is None else value
        if v is None:
            return
        out[field] = Hint(transform(v) if transform else v, f"{name} {key}")

    qc = cfg.get("quantization_config")
    if qc is not None:  # FP8 with 128x128 block scales is read (sources/fp8.py); other schemes store other tensors
        block = qc.get("weight_block_size") if isinstance(qc, dict) else None
        if not isinstance(qc, dict) or qc.get("quant_method") != "fp8" or qc.get("fmt", "e4m3") != "e4m3" \
                or (block is not None and list(block) != [128, 128]):
            raise InputError(f"{path}: quantization_config {_shown(qc) if isinstance(qc, dict) else qc!r}: streamconv "
                             "reads unquantized weights, and FP8 e4m3 ones with 128x128 block scales; dequantize "
                             "this model first")
    theta, theta_key, rs, rs_key = rope(cfg)
    put("rotary_base", theta_key, theta, transform=lambda v: int(v) if float(v).is_integer() else float(v))
    put("max_position_embeddings", "max_position_embeddings", transform=int)
    eps_key = "rms_norm_eps" if "rms_norm_eps" in cfg else "layer_norm_eps"
    put("norm_epsilon", eps_key, transform=float)
    put("num_layers", "num_hidden_layers", transform=int)
    put("hidden_size", "hidden_size", transform=int)
    put("num_attention_heads", "num_attention_heads", transform=int)
    put("num_query_groups", "num_key_value_heads", transform=int)
    model_type = cfg.get("model_type", "")
    if cfg.get("head_dim") is not None and model_type not in SIGMOID_ROUTED:  # DeepSeek's head_dim is the rope dim
        put("kv_channels", "head_dim", transform=int)
    if cfg.get("tie_word_embeddings") is False:
        out["untie_embeddings_and_output_weights"] = Hint(True, f"{name} tie_word_embeddings")
    put("ffn_hidden_size", "intermediate_size", transform=int)
    if cfg.get("kv_lora_rank"):  # multi-latent attention: every dimension, checked against the shapes
        out.pop("num_query_groups", None)
        for key, field in (("q_lora_rank", "q_lora_rank"), ("kv_lora_rank", "kv_lora_rank"),
                           ("qk_nope_head_dim", "qk_head_dim"), ("qk_rope_head_dim", "qk_pos_emb_head_dim"),
                           ("v_head_dim", "v_head_dim")):
            put(field, key, transform=int)

    experts = cfg.get("num_experts") or cfg.get("n_routed_experts")
    if experts:
        put("num_experts", "num_experts" if cfg.get("num_experts") else "n_routed_experts", transform=int)
        put("moe_ffn_hidden_size", "moe_intermediate_size", transform=int)
        if cfg.get("n_shared_experts") and cfg.get("moe_intermediate_size"):
            out["moe_shared_expert_intermediate_size"] = Hint(
                int(cfg["n_shared_experts"]) * int(cfg["moe_intermediate_size"]),
                f"{name} n_shared_experts x moe_intermediate_size")
        layers = cfg.get("num_hidden_layers")
        if layers and cfg.get("first_k_dense_replace") is not None:
            k = int(cfg["first_k_dense_replace"])
            out["moe_layer_freq"] = Hint([0] * k + [1] * (layers - k), f"{name} first_k_dense_replace")
        elif layers and ("mlp_only_layers" in cfg or "decoder_sparse_step" in cfg):
            dense, step = set(cfg.get("mlp_only_layers") or ()), int(cfg.get("decoder_sparse_step") or 1)
            out["moe_layer_freq"] = Hint([int(i not in dense and (i + 1) % step == 0) for i in range(layers)],
                                         f"{name} mlp_only_layers/decoder_sparse_step")
        put("moe_router_topk", "num_experts_per_tok", transform=int)
        if model_type in SIGMOID_ROUTED or cfg.get("scoring_func") == "sigmoid":
            out["moe_router_score_function"] = Hint("sigmoid", f"{name} model_type {model_type}")
            put("moe_router_topk_scaling_factor", "routed_scaling_factor", transform=float)
            if (cfg.get("n_group") or 1) > 1:
                put("moe_router_num_groups", "n_group", transform=int)
                put("moe_router_group_topk", "topk_group", transform=int)
            if cfg.get("norm_topk_prob") is False and (cfg.get("num_experts_per_tok") or 1) > 1:
                raise InputError(f"{path}: norm_topk_prob false with sigmoid routing is not expressible in "
                                 "Megatron r0.12 (it always normalises the top-k sigmoid scores)")
        else:
            out["moe_router_score_function"] = Hint("softmax", f"{name} model_type {model_type}")
            if "norm_topk_prob" in cfg:
                out["moe_router_pre_softmax"] = Hint(not cfg["norm_topk_prob"], f"{name} norm_topk_prob")
    if isinstance(rs, dict):
        kind = rs.get("type") or rs.get("rope_type")
        if kind == "yarn":
            out["rotary_scaling_factor"] = Hint(float(rs.get("factor", 1.0)), f"{name} {rs_key}.factor")
            for src_key, field in (("mscale", "mscale"), ("mscale_all_dim", "mscale_all_dim")):
                if rs.get(src_key) is not None:
                    out[field] = Hint(float(rs[src_key]), f"{name} {rs_key}.{src_key}")
            if rs.get("original_max_position_embeddings"):
                out["max_position_embeddings"] = Hint(int(rs["original_max_position_embeddings"]),
                                                      f"{name} {rs_key}.original_max_position_embeddings")
        elif is_llama3_scaling(rs):
            out["use_rope_scaling"] = Hint(True, f"{name} {rs_key} llama3")
        elif kind not in (None, "default"):
            raise InputError(f"{name} {rs_key} {_shown(rs)} is not supported: Megatron r0.12 takes only yarn rope "
                             "scaling (multi-latent attention) and Llama 3.1's (rope_type llama3, factor 8, "
                             "low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 8192)")
    if cfg.get("num_nextn_predict_layers"):  # DeepSeek's MTP layers: compared with the weights (settings.mtp_note)
        out["_mtp_layers"] = Hint(int(cfg["num_nextn_predict_layers"]), f"{name} num_nextn_predict_layers")
    return out


def _shown(rs: dict) -> str:
    return json.dumps({k: v for k, v in rs.items() if k != "rope_theta"}, sort_keys=True)


# ---------------------------------------------------------------------------- checkpoints with HF names
@dataclass(frozen=True)
class Family:
    """What an architecture fixes that its config.json may leave out."""

    model_type: str
    qk_norm: bool  # q_norm / k_norm per head (Qwen3)
    qkv_bias: bool | None  # None: config.json attention_bias decides (Llama, Qwen3); Qwen2: always
    mlp_bias_key: bool  # config.json mlp_bias exists (Llama)
    mla: bool = False  # multi-latent attention: no q/k/v heads to check, yarn rope scaling allowed


#: architectures[0] -> family: the Hugging Face models whose weights streamconv reads under HF names
FAMILIES = {
    "LlamaForCausalLM": Family("llama", qk_norm=False, qkv_bias=None, mlp_bias_key=True),
    "Qwen2ForCausalLM": Family("qwen2", qk_norm=False, qkv_bias=True, mlp_bias_key=False),
    "Qwen3ForCausalLM": Family("qwen3", qk_norm=True, qkv_bias=None, mlp_bias_key=False),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", qk_norm=True, qkv_bias=None, mlp_bias_key=False),
    "DeepseekV3ForCausalLM": Family("deepseek_v3", qk_norm=False, qkv_bias=False, mlp_bias_key=False, mla=True),
}


def check_hf_input(path: str | None, tensors: dict, load_dir: str) -> tuple:
    """Refuse a Hugging Face-named checkpoint that cannot be converted faithfully; return (drop, notes).

    ``tensors``: canonical name -> source tensor. ``drop``: canonical names config.json says transformers
    never reads (a tied model's stored ``lm_head.weight``).
    """
    if path is None:
        raise InputError(
            f"{load_dir}: Hugging Face weights without a config.json beside them; streamconv needs the model's "
            "config.json to tell the architecture (other models share these names) and the values the weights "
            "cannot tell: put it beside the weights or pass --model-config FILE")
    if not path.endswith(".json"):
        raise InputError(f"--model-config {path}: Hugging Face weights come with a config.json, not a mindformers YAML")
    c = _HfConfig(path, load_json(path))
    c.check_maths()
    c.check_shapes(tensors)
    return c.tied(tensors)


class _HfConfig:
    def __init__(self, path: str, raw: dict):
        self.path, self.raw = path, raw
        archs = raw.get("architectures")
        if archs is not None and (not isinstance(archs, list) or not archs or not isinstance(archs[0], str)):
            raise self._fail("architectures", f"is {archs!r}; expected a list such as [\"LlamaForCausalLM\"]")
        if archs:
            arch = archs[0]
        else:  # no architectures: the model_type names the family
            mt = raw.get("model_type")
            arch = next((a for a, f in FAMILIES.items() if f.model_type == mt), f"model_type {mt!r}")
        if arch not in FAMILIES:
            raise InputError(f"{path}: architecture {arch} is not supported for Hugging Face input; streamconv "
                             f"converts {', '.join(FAMILIES)}")
        self.architecture, self.family = arch, FAMILIES[arch]

    def _fail(self, key: str, what: str) -> InputError:
        return InputError(f"{self.path}: {key} {what}")

    def int_key(self, key: str):
        v = self.raw.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise self._fail(key, f"is {v!r}; expected a positive integer")
        return v

    def bool_key(self, key: str):
        v = self.raw.get(key)
        if v is not None and not isinstance(v, bool):
            raise self._fail(key, f"is {v!r}; expected true or false")
        return v

    # ------------------------------------------------------------------ what Megatron cannot express
    def check_maths(self) -> None:
        act = self.raw.get("hidden_act", "silu")
        if act != "silu":
            raise self._fail("hidden_act", f"is {act!r}; Megatron's --swiglu is SiLU-gated, so only 'silu' converts")
        if self.bool_key("use_sliding_window"):
            raise self._fail("use_sliding_window", "is true; Megatron core_r0.12 GPT models have no sliding-window "
                                                   "attention, so this model cannot be converted")
        theta, theta_key, rs, rs_key = rope(self.raw)
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                  or not math.isfinite(theta) or theta <= 0 or theta != int(theta)):
            raise self._fail(theta_key, f"is {theta!r}; Megatron's --rotary-base is a positive integer")
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise self._fail(rs_key, f"is {rs!r}; expected an object or null")
        if rs.get("rope_type", rs.get("type")) == "default" or is_llama3_scaling(rs):
            return
        if self.family.mla and rs.get("rope_type", rs.get("type")) == "yarn":
            return  # Megatron r0.12's MLA takes yarn (rotary_scaling_factor, mscale, mscale_all_dim)
        raise self._fail(rs_key, f"{_shown(rs)} cannot be expressed in Megatron core_r0.12 for this model, whose "
                                 "only rope scaling is Llama 3.1's (rope_type llama3, factor 8, low_freq_factor 1, "
                                 "high_freq_factor 4, original_max_position_embeddings 8192)")

    # ------------------------------------------------------------------ dimensions against the weights
    def _disagree(self, key: str, value, tensor, what: str) -> InputError:
        return InputError(f"{self.path}: {key} {value} contradicts the weights: {tensor.name} in "
                          f"{os.path.basename(tensor.path)} {what}; config.json and the weights are not the same model")

    def heads(self) -> tuple:
        """(heads, kv heads, head dim), each None when config.json lacks it."""
        nq, ng, d, h = (self.int_key(k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                                  "hidden_size"))
        ng = nq if ng is None else ng  # transformers: None means multi-head attention
        if d is None and nq is not None and h is not None:
            if h % nq:
                raise self._fail("num_attention_heads", f"{nq} does not divide hidden_size {h} and there is no head_dim")
            d = h // nq
        if nq is not None and ng is not None and nq % ng:
            raise self._fail("num_key_value_heads", f"{ng} does not divide num_attention_heads {nq}")
        return nq, ng, d

    def check_shapes(self, tensors: dict) -> None:
        """Every dimension config.json states must be the one the tensors have (layer 0 stands for all)."""
        emb = tensors.get("embedding.word_embeddings.weight")
        if emb is not None and len(emb.shape) == 2:
            for key, dim, what in (("vocab_size", 0, "rows"), ("hidden_size", 1, "columns")):
                value = self.int_key(key)
                if value is not None and emb.shape[dim] != value:
                    raise self._disagree(key, value, emb, f"has {emb.shape[dim]} {what}")
        layers = layer_indices(tensors)
        n = self.int_key("num_hidden_layers")
        if n is not None and layers and len(layers) != n:
            raise InputError(f"{self.path}: num_hidden_layers {n} contradicts the weights: they hold {len(layers)} "
                             f"layers (model.layers.{layers[0]}..{layers[-1]}); config.json and the weights are not "
                             "the same model")
        if self.family.mla:  # MLA's dimensions are hints checked by the model inference (model/mla.py)
            return
        nq, ng, d = self.heads()
        dkey = "head_dim" if self.raw.get("head_dim") is not None else "hidden_size / num_attention_heads"
        qn = tensors.get("decoder.layers.0.self_attention.q_layernorm.weight")
        if qn is not None and d is not None and qn.shape[0] != d:
            raise self._disagree(dkey, d, qn, f"has {qn.shape[0]} entries (one per head dim)")
        for key, value, name, rows in (
            ("num_attention_heads", nq, "self_attention.linear_q.weight", None if nq is None or d is None else nq * d),
            ("num_key_value_heads", ng, "self_attention.linear_k.weight", None if ng is None or d is None else ng * d),
            ("intermediate_size", self.int_key("intermediate_size"), "mlp.linear_fc1_gate.weight", None),
        ):
            tensor = tensors.get(f"decoder.layers.0.{name}")
            if tensor is None or value is None:
                continue
            want = value if rows is None else rows
            if tensor.shape[0] != want:
                shown = value if rows is None else f"{value} (x {dkey} {d} = {rows} rows)"
                raise self._disagree(key, shown, tensor, f"has {tensor.shape[0]} rows")
        self._check_structure(tensors)

    def _check_structure(self, tensors: dict) -> None:
        """Biases and q/k norm as the architecture and config.json say."""
        fam, arch = self.family, self.architecture
        q = tensors.get("decoder.layers.0.self_attention.linear_q.weight")
        if q is None:
            return
        has = lambda suffix: f"decoder.layers.0.{suffix}" in tensors  # noqa: E731
        qkv_bias = fam.qkv_bias if fam.qkv_bias is not None else bool(self.bool_key("attention_bias"))
        key = "attention_bias" if fam.qkv_bias is None else f"architecture {arch}"
        if has("self_attention.linear_q.bias") != qkv_bias:
            raise InputError(f"{self.path}: {key} says q/k/v {'have' if qkv_bias else 'have no'} biases, but "
                             f"{q.name.replace('weight', 'bias')} is {'missing' if qkv_bias else 'present'}; "
                             "config.json and the weights are not the same model")
        mlp_bias = bool(self.bool_key("mlp_bias")) if fam.mlp_bias_key else False
        if has("mlp.linear_fc1_gate.bias") != mlp_bias:
            raise InputError(f"{self.path}: {'mlp_bias' if fam.mlp_bias_key else 'architecture ' + arch} says the MLP "
                             f"{'has' if mlp_bias else 'has no'} biases, but layer 0's gate_proj.bias is "
                             f"{'missing' if mlp_bias else 'present'}; config.json and the weights are not the same model")
        if has("self_attention.q_layernorm.weight") != fam.qk_norm:
            raise InputError(f"{self.path}: architecture {arch} {'has' if fam.qk_norm else 'has no'} q_norm/k_norm, "
                             f"but layer 0's self_attn.q_norm.weight is {'missing' if fam.qk_norm else 'present'}; "
                             "config.json and the weights are not the same model")

    def tied(self, tensors: dict) -> tuple:
        """(drop, notes): a tied model's stored lm_head is what transformers never reads."""
        tie = self.bool_key("tie_word_embeddings")
        out = tensors.get("output_layer.weight")
        if tie is False and out is None:
            emb = tensors.get("embedding.word_embeddings.weight")
            where = os.path.basename(emb.path) if emb is not None else "the checkpoint"
            raise InputError(f"{self.path}: tie_word_embeddings is false, but {where} has no lm_head.weight; "
                             "the checkpoint is incomplete")
        if tie and out is not None:
            return ("output_layer.weight",), [
                f"lm_head.weight is not converted: {os.path.basename(self.path)} tie_word_embeddings is true, so "
                "transformers uses the embeddings as the output layer (and so does Megatron)"]
        return (), []
