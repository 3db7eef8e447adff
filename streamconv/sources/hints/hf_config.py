"""A Hugging Face ``config.json``: the architecture check, the values the weights cannot tell, the dimensions.

The weights of a Llama/Qwen model do not say its rope base, context length or
norm epsilon, and the same tensor names are used by architectures with other
maths (Gemma's ``1 + weight`` norms, Mistral's sliding window), so a Hugging
Face checkpoint is converted only together with its ``config.json``: the one
beside the weights, or the one ``--model-config`` names.

:func:`load` reads the file and refuses, in one line each, what Megatron
core_r0.12.0 cannot express: an architecture other than :data:`FAMILIES`, a
sliding window, an activation other than SiLU, a ``rope_scaling`` other than
Llama 3.1's (the only one ``pretrain_gpt.py`` builds: ``--use-rope-scaling``
with its fixed factor 8, low/high frequency factors 1/4 and original context
8192; its ``--rope-scaling-factor`` is never passed to the model).
:meth:`HfConfig.hints` checks every dimension against the tensor shapes (a
contradiction names config.json and the key) and returns the hints.

Both config styles are read: ``rope_theta`` / ``rope_scaling`` (transformers 4)
and ``rope_parameters`` (transformers 5).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

from ...core.errors import InputError
from ...core.options import ConvertOptions
from ..schemes import layer_of

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class Family:
    """What an architecture fixes that its config.json may leave out."""

    model_type: str
    qk_norm: bool  # q_norm / k_norm per head (Qwen3)
    qkv_bias: bool | None  # None: config.json attention_bias decides (Llama, Qwen3); Qwen2: always
    mlp_bias_key: bool  # config.json mlp_bias exists (Llama)


#: architectures[0] -> family; the only Hugging Face models streamconv converts
FAMILIES = {
    "LlamaForCausalLM": Family("llama", qk_norm=False, qkv_bias=None, mlp_bias_key=True),
    "Qwen2ForCausalLM": Family("qwen2", qk_norm=False, qkv_bias=True, mlp_bias_key=False),
    "Qwen3ForCausalLM": Family("qwen3", qk_norm=True, qkv_bias=None, mlp_bias_key=False),
}

#: Llama 3.1's rope scaling: what Megatron r0.12's RotaryEmbedding(rope_scaling=True) hard-codes
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}

_DEFAULT_SEQ_LENGTH = next(f.default for f in fields(ConvertOptions) if f.name == "seq_length")


def find(load_path: str, explicit: str | None) -> str | None:
    """The config file to read: ``--model-config``, else ``config.json`` beside the input, else None."""
    if explicit:
        if not os.path.isfile(explicit):
            raise InputError(f"--model-config {explicit}: no such file; name the model's config.json")
        return explicit
    if os.path.basename(load_path) == CONFIG_NAME and os.path.isfile(load_path):
        return load_path  # --load-dir model/config.json: the model directory
    d = load_path if os.path.isdir(load_path) else os.path.dirname(os.path.abspath(load_path))
    path = os.path.join(d, CONFIG_NAME)
    return path if os.path.isfile(path) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except RecursionError:
        raise InputError(f"{path}: cannot read it (JSON nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a JSON {type(obj).__name__}, not a model config object")
    return obj


def is_model_config(obj: dict) -> bool:
    return "architectures" in obj or "model_type" in obj


def load(path: str, explicit: bool = True) -> "HfConfig | None":
    """Read ``path`` and refuse what Megatron cannot express for these models.

    A ``config.json`` that was only found beside the input and is no model config is ignored (None).
    """
    raw = _read_json(path)
    name = os.path.basename(path)
    if not is_model_config(raw):
        if not explicit:
            return None
        raise InputError(f"{path}: has neither 'architectures' nor 'model_type'; it is not a Hugging Face model config")
    archs = raw.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not archs or not isinstance(archs[0], str)):
        raise InputError(f"{path}: 'architectures' is {archs!r}; expected a list of class names such as [\"LlamaForCausalLM\"]")
    if archs:
        arch = archs[0]
    else:  # no architectures: the model_type names the family
        arch = next((a for a, f in FAMILIES.items() if f.model_type == raw.get("model_type")), str(raw.get("model_type")))
    if arch not in FAMILIES:
        raise InputError(f"{path}: architecture {arch} is not supported; streamconv converts "
                         f"{', '.join(FAMILIES)} (Hugging Face input)")
    cfg = HfConfig(path, name, raw, arch, FAMILIES[arch])
    cfg.check_maths()
    return cfg


@dataclass
class HfConfig:
    path: str
    name: str  # "config.json", as notes and errors call it
    raw: dict
    architecture: str
    family: Family

    # ------------------------------------------------------------------ reading keys
    def where(self, key: str) -> str:
        return f"{self.name} {key}"

    def _fail(self, key: str, what: str) -> InputError:
        return InputError(f"{self.path}: {key} {what}")

    def int_key(self, key: str, positive: bool = True):
        v = self.raw.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or (positive and v < 1):
            raise self._fail(key, f"is {v!r}; expected a positive integer")
        return v

    def float_key(self, key: str):
        v = self.raw.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise self._fail(key, f"is {v!r}; expected a non-negative number")
        return float(v)

    def bool_key(self, key: str):
        v = self.raw.get(key)
        if v is None:
            return None
        if not isinstance(v, bool):
            raise self._fail(key, f"is {v!r}; expected true or false")
        return v

    def rope(self) -> tuple:
        """(rope base or None, its key, scaling dict or None, its key) in either config style."""
        params = self.raw.get("rope_parameters")
        if params is not None and not isinstance(params, dict):
            raise self._fail("rope_parameters", f"is {params!r}; expected an object")
        theta, theta_key = self.raw.get("rope_theta"), "rope_theta"
        if theta is None and params:
            theta, theta_key = params.get("rope_theta"), "rope_parameters.rope_theta"
        scaling, scaling_key = self.raw.get("rope_scaling"), "rope_scaling"
        if scaling is None and params and params.get("rope_type", "default") != "default":
            scaling, scaling_key = params, "rope_parameters"
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                                  or not math.isfinite(theta) or theta <= 0):
            raise self._fail(theta_key, f"is {theta!r}; expected a positive number")
        return theta, theta_key, scaling, scaling_key

    # ------------------------------------------------------------------ what Megatron cannot express
    def check_maths(self) -> None:
        act = self.raw.get("hidden_act", "silu")
        if act != "silu":
            raise self._fail("hidden_act", f"is {act!r}; Megatron's --swiglu is SiLU-gated, so only 'silu' converts")
        if self.bool_key("use_sliding_window"):
            raise self._fail("use_sliding_window", "is true; Megatron core_r0.12 GPT models have no sliding-window "
                                                   "attention, so this model cannot be converted")
        theta, theta_key, _, _ = self.rope()
        if theta is not None and theta != int(theta):
            raise self._fail(theta_key, f"is {theta!r}; Megatron's --rotary-base is an integer")
        self.rope_scaling()

    def rope_scaling(self) -> bool:
        """True for Llama 3.1's rope scaling (Megatron's --use-rope-scaling), False for none; else refuse."""
        _, _, s, key = self.rope()
        if s is None:
            return False
        if not isinstance(s, dict):
            raise self._fail(key, f"is {s!r}; expected an object or null")
        kind = s.get("rope_type", s.get("type"))
        if kind == "default":
            return False
        if kind == "llama3" and all(isinstance(s.get(k), (int, float)) and float(s[k]) == v
                                    for k, v in LLAMA3_SCALING.items()):
            return True
        shown = json.dumps({k: v for k, v in s.items() if k != "rope_theta"}, sort_keys=True)
        raise self._fail(key, f"{shown} cannot be expressed in Megatron core_r0.12, whose only rope scaling is "
                              "Llama 3.1's (rope_type llama3, factor 8, low_freq_factor 1, high_freq_factor 4, "
                              "original_max_position_embeddings 8192)")

    # ------------------------------------------------------------------ dimensions against the weights
    def _disagree(self, key: str, value, tensor, what: str) -> InputError:
        return InputError(f"{self.path}: {key} {value} contradicts the weights: {tensor.name} in "
                          f"{os.path.basename(tensor.path)} {what}; config.json and the weights are not the same model")

    def heads(self) -> tuple:
        """(heads, kv heads, head dim), each None when config.json lacks it."""
        nq = self.int_key("num_attention_heads")
        ng = self.int_key("num_key_value_heads")
        if ng is None:
            ng = nq  # transformers: None means multi-head attention
        d = self.int_key("head_dim")
        h = self.int_key("hidden_size")
        if d is None and nq is not None and h is not None:
            if h % nq:
                raise self._fail("num_attention_heads", f"{nq} does not divide hidden_size {h} and there is no head_dim")
            d = h // nq
        if nq is not None and ng is not None and nq % ng:
            raise self._fail("num_key_value_heads", f"{ng} does not divide num_attention_heads {nq}")
        return nq, ng, d

    def check_shapes(self, tensors: dict) -> None:
        """Every dimension config.json states must be the one the tensors have (layer 0 stands for all)."""
        def t(name):
            return tensors.get(name)

        emb = t("embedding.word_embeddings.weight")
        if emb is not None and len(emb.shape) == 2:
            for key, value, dim, what in (("vocab_size", self.int_key("vocab_size"), 0, "rows"),
                                          ("hidden_size", self.int_key("hidden_size"), 1, "columns")):
                if value is not None and emb.shape[dim] != value:
                    raise self._disagree(key, value, emb, f"has {emb.shape[dim]} {what}")
        layers = sorted({i for i in (layer_of(k) for k in tensors) if i is not None})
        n = self.int_key("num_hidden_layers")
        if n is not None and layers and len(layers) != n:
            raise InputError(f"{self.path}: num_hidden_layers {n} contradicts the weights: they hold {len(layers)} "
                             f"layers (model.layers.{layers[0]}..{layers[-1]}); config.json and the weights are not "
                             "the same model")
        nq, ng, d = self.heads()
        dkey = "head_dim" if self.raw.get("head_dim") is not None else "hidden_size / num_attention_heads"
        qn = t("decoder.layers.0.self_attention.q_layernorm.weight")
        if qn is not None and d is not None and qn.shape[0] != d:
            raise self._disagree(dkey, d, qn, f"has {qn.shape[0]} entries (one per head dim)")
        for key, value, name, rows in (
            ("num_attention_heads", nq, "self_attention.linear_q.weight", None if nq is None or d is None else nq * d),
            ("num_key_value_heads", ng, "self_attention.linear_k.weight", None if ng is None or d is None else ng * d),
            ("intermediate_size", self.int_key("intermediate_size"), "mlp.linear_fc1_gate.weight", None),
        ):
            tensor = t(f"decoder.layers.0.{name}")
            if tensor is None or value is None:
                continue
            want = value if rows is None else rows
            if tensor.shape[0] != want:
                shown = value if rows is None else f"{value} (x {dkey} {d} = {rows} rows)"
                raise self._disagree(key, shown, tensor, f"has {tensor.shape[0]} rows")
        self._check_structure(tensors)

    def _check_structure(self, tensors: dict) -> None:
        """Biases, q/k norm and tied output as the architecture and config.json say."""
        fam, arch = self.family, self.architecture
        q = tensors.get("decoder.layers.0.self_attention.linear_q.weight")
        if q is None:
            return
        has = lambda suffix: f"decoder.layers.0.{suffix}" in tensors  # noqa: E731
        qkv_bias = fam.qkv_bias if fam.qkv_bias is not None else bool(self.bool_key("attention_bias"))
        key = "attention_bias" if fam.qkv_bias is None else f"architectures {arch}"
        if has("self_attention.linear_q.bias") != qkv_bias:
            state = "present" if not qkv_bias else "missing"
            raise InputError(f"{self.path}: {key} says q/k/v {'have' if qkv_bias else 'have no'} biases, but "
                             f"{q.name.replace('weight', 'bias')} is {state}; config.json and the weights are not the same model")
        mlp_bias = bool(self.bool_key("mlp_bias")) if fam.mlp_bias_key else False
        if has("mlp.linear_fc1_gate.bias") != mlp_bias:
            raise InputError(f"{self.path}: {'mlp_bias' if fam.mlp_bias_key else 'architectures ' + arch} says the MLP "
                             f"{'has' if mlp_bias else 'has no'} biases, but layer 0's gate_proj.bias is "
                             f"{'missing' if mlp_bias else 'present'}; config.json and the weights are not the same model")
        if has("self_attention.q_layernorm.weight") != fam.qk_norm:
            raise InputError(f"{self.path}: architecture {arch} {'has' if fam.qk_norm else 'has no'} q_norm/k_norm, "
                             f"but layer 0's self_attn.q_norm.weight is {'missing' if fam.qk_norm else 'present'}; "
                             "config.json and the weights are not the same model")

    def tied(self, tensors: dict) -> tuple:
        """(tied, drop): drop lists canonical names config.json says transformers never reads."""
        tie = self.bool_key("tie_word_embeddings")
        out = tensors.get("output_layer.weight")
        if tie is None:
            return out is None, ()
        if not tie and out is None:
            emb = tensors.get("embedding.word_embeddings.weight")
            where = os.path.basename(emb.path) if emb is not None else "the checkpoint"
            raise InputError(f"{self.path}: tie_word_embeddings is false, but {where} has no lm_head.weight; "
                             "the checkpoint is incomplete")
        if tie and out is not None:
            return True, ("output_layer.weight",)  # transformers ties lm_head to the embeddings and ignores it
        return tie, ()

    # ------------------------------------------------------------------ the hints
    def collect(self, tensors: dict) -> tuple:
        """(hints, drop, notes) after checking config.json against the tensors (canonical name -> tensor)."""
        self.check_shapes(tensors)
        tied, drop = self.tied(tensors)
        hints: dict = {}
        notes: list = []

        def put(fld, value, key):
            if value is not None:
                hints[fld] = (value, self.where(key))

        put("num_layers", self.int_key("num_hidden_layers"), "num_hidden_layers")
        put("hidden_size", self.int_key("hidden_size"), "hidden_size")
        put("ffn_hidden_size", self.int_key("intermediate_size"), "intermediate_size")
        nq, ng, _ = self.heads()
        put("num_attention_heads", nq, "num_attention_heads")
        if ng is not None and ng != nq:  # multi-head attention keeps Megatron's num_query_groups unset
            put("num_query_groups", ng, "num_key_value_heads")
        put("kv_channels", self.int_key("head_dim"), "head_dim")
        if not tied:
            put("untie_embeddings_and_output_weights", True, "tie_word_embeddings false")
        theta, theta_key, _, scaling_key = self.rope()
        if theta is not None:
            put("rotary_base", int(theta), theta_key)
        max_pos = self.int_key("max_position_embeddings")
        put("max_position_embeddings", max_pos, "max_position_embeddings")
        if max_pos is not None and max_pos < _DEFAULT_SEQ_LENGTH:
            hints["seq_length"] = (max_pos, f"{self.where('max_position_embeddings')}, shorter than the default "
                                            f"{_DEFAULT_SEQ_LENGTH}")
        put("norm_epsilon", self.float_key("rms_norm_eps"), "rms_norm_eps")
        if self.rope_scaling():
            put("use_rope_scaling", True, scaling_key)
        if drop:
            notes.append(f"lm_head.weight is not converted: {self.name} tie_word_embeddings is true, so transformers "
                         "uses the embeddings as the output layer (and so does Megatron)")
        return hints, drop, notes
