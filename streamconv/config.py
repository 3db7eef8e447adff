"""Work out the model's dimensions from tensor shapes, and check the flags against them.

Shapes decide everything they can decide unambiguously (layers, hidden, ffn,
vocab, biases, gated MLP, qk-layernorm, tied output). A flag that was given must
agree with the shapes; a disagreement is an error that names both. What shapes
cannot tell (the head count when the head dim is unknown, the sequence length)
must come from flags. TP/PP divisibility is checked here too, before anything is
written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import FlagError, InputError
from .names import layer_key
from .options import FC1_LAYOUTS, QKV_LAYOUTS, TRANSFORMER_IMPLS, ConvertOptions
from .source import SourceIndex
from .st_header import FLOAT_WEIGHT_DTYPES


@dataclass
class ModelConfig:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    source_vocab: int
    padded_vocab_size: int
    swiglu: bool
    add_bias_linear: bool
    add_qkv_bias: bool
    normalization: str
    qk_layernorm: bool
    tied: bool
    seq_length: int
    max_position_embeddings: int
    position_embedding_type: str
    qkv_split: bool  # legacy separate wq/wk/wv
    fc1_split: bool  # legacy separate w1/w3
    tp: int
    pp: int
    inferred: list = field(default_factory=list)  # notes on values taken from shapes

    @property
    def group_query_attention(self) -> bool:
        return self.num_query_groups != self.num_attention_heads

    @property
    def norm_has_bias(self) -> bool:
        return self.normalization == "LayerNorm"


def padded_vocab(true_vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's ``_vocab_size_with_padding``: round up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tp
    return ((true_vocab + multiple - 1) // multiple) * multiple


def _check_flag(flag: str, given, found, what: str) -> None:
    """``what`` reads "<evidence> gives <quantity>" and is followed by the value found."""
    if given is not None and given != found:
        raise FlagError(f"{flag} {given} contradicts the checkpoint: {what} {found}")


def _need(index: SourceIndex, name: str, why: str = ""):
    t = index.tensors.get(name)
    if t is None:
        raise InputError(
            f"tensor {name} is missing from {index.load_path}{why}; the checkpoint is incomplete "
            "(or not a GPT model)"
        )
    return t


def _shape(index, name):
    t = index.tensors.get(name)
    return None if t is None else t.shape


def resolve_config(index: SourceIndex, o: ConvertOptions) -> ModelConfig:
    """Return the model configuration, or raise naming the conflicting flag/tensor."""
    notes: list = []
    if o.saver_transformer_impl not in TRANSFORMER_IMPLS:
        raise FlagError(f"--saver-transformer-impl {o.saver_transformer_impl!r}: choose local or transformer_engine")
    if o.fc1_layout not in FC1_LAYOUTS:
        raise FlagError(f"--fc1-layout {o.fc1_layout!r}: choose interleaved or concat")
    if o.qkv_layout not in QKV_LAYOUTS:
        raise FlagError(f"--qkv-layout {o.qkv_layout!r}: choose grouped or contiguous")
    if o.make_vocab_size_divisible_by is None or o.make_vocab_size_divisible_by < 1:
        raise FlagError(f"--make-vocab-size-divisible-by {o.make_vocab_size_divisible_by}: must be a positive integer")
    tp, pp = o.target_tensor_parallel_size, o.target_pipeline_parallel_size
    if tp is None or tp < 1:
        raise FlagError(f"--target-tensor-parallel-size {tp}: must be a positive integer")
    if pp is None or pp < 1:
        raise FlagError(f"--target-pipeline-parallel-size {pp}: must be a positive integer")
    if o.position_embedding_type not in ("rope", "none"):
        raise FlagError(
            f"--position-embedding-type {o.position_embedding_type}: mindformers GPT checkpoints have no "
            "learned position embeddings; use rope (or none)"
        )

    for t in index.tensors.values():
        if t.dtype not in FLOAT_WEIGHT_DTYPES:
            raise InputError(f"{t.path}: weight {t.name!r} has dtype {t.dtype}; expected F32, F16 or BF16")

    emb = _need(index, "embedding.word_embeddings.weight")
    if len(emb.shape) != 2:
        raise InputError(f"{emb.path}: {emb.name} has shape {list(emb.shape)}; expected [vocab, hidden]")
    vocab, h = emb.shape
    _check_flag("--hidden-size", o.hidden_size, h, f"{emb.name} {list(emb.shape)} gives hidden size")

    layers = sorted({int(k.split(".")[2]) for k in index.tensors if k.startswith("decoder.layers.")})
    if not layers:
        raise InputError(f"{index.load_path}: no transformer layers (decoder.layers.N.* / model.layers.N.*) found")
    n_layers = len(layers)
    if layers[-1] != n_layers - 1:  # sorted distinct indices: a gap somewhere
        gap = next(i for i, x in enumerate(layers) if x != i)
        raise InputError(f"layer {gap} is missing from {index.load_path} (found layers up to {layers[-1]}); the checkpoint is incomplete")
    _check_flag("--num-layers", o.num_layers, n_layers, "the number of layers found is")
    if o.num_layers is None:
        notes.append(f"num_layers={n_layers}")

    l0 = lambda s: layer_key(0, s)  # noqa: E731
    qkv_split = _shape(index, l0("self_attention.linear_qkv.weight")) is None and _shape(index, l0("self_attention.linear_q.weight")) is not None
    fc1_split = _shape(index, l0("mlp.linear_fc1.weight")) is None and _shape(index, l0("mlp.linear_fc1_gate.weight")) is not None

    proj = _need(index, l0("self_attention.linear_proj.weight"))
    fc2 = _need(index, l0("mlp.linear_fc2.weight"))
    if len(proj.shape) != 2 or proj.shape[0] != h:
        raise InputError(f"{proj.path}: {proj.name} has shape {list(proj.shape)}; expected [{h}, heads*head_dim]")
    if len(fc2.shape) != 2 or fc2.shape[0] != h:
        raise InputError(f"{fc2.path}: {fc2.name} has shape {list(fc2.shape)}; expected [{h}, ffn]")
    q_total = proj.shape[1]
    ffn = fc2.shape[1]
    _check_flag("--ffn-hidden-size", o.ffn_hidden_size, ffn, f"{fc2.name} {list(fc2.shape)} gives ffn hidden size")

    if qkv_split:
        wq = _need(index, l0("self_attention.linear_q.weight"))
        wk = _need(index, l0("self_attention.linear_k.weight"))
        if wq.shape[0] != q_total:
            raise InputError(f"{wq.path}: {wq.name} has {wq.shape[0]} rows but {proj.name} has {q_total} columns")
        kv_total = wk.shape[0]
    else:
        qkv = _need(index, l0("self_attention.linear_qkv.weight"))
        rows = qkv.shape[0]
        if len(qkv.shape) != 2 or qkv.shape[1] != h or rows <= q_total or (rows - q_total) % 2:
            raise InputError(
                f"{qkv.path}: {qkv.name} has shape {list(qkv.shape)}, which does not fit "
                f"(heads + 2*groups)*head_dim rows with heads*head_dim = {q_total} (from {proj.name})"
            )
        kv_total = (rows - q_total) // 2

    qln = _shape(index, l0("self_attention.q_layernorm.weight"))
    qk_ln = qln is not None
    if o.qk_layernorm and not qk_ln:
        raise FlagError(f"--qk-layernorm given, but {index.load_path} has no self_attention.q_layernorm weights")
    head_dim = None
    if qk_ln:
        head_dim = qln[0]
        if not o.qk_layernorm:
            notes.append("qk_layernorm")
    if head_dim is None and o.kv_channels:
        head_dim = o.kv_channels
    if head_dim is None and o.num_attention_heads:
        if q_total % o.num_attention_heads:
            raise FlagError(f"--num-attention-heads {o.num_attention_heads} does not divide {proj.name}'s {q_total} columns")
        head_dim = q_total // o.num_attention_heads
    if head_dim is None and o.num_query_groups:
        if kv_total % o.num_query_groups:
            raise FlagError(f"--num-query-groups {o.num_query_groups} does not divide the {kv_total} key rows of layer 0")
        head_dim = kv_total // o.num_query_groups
    if head_dim is None:
        raise FlagError(
            "cannot tell the number of attention heads from the shapes alone; pass --num-attention-heads "
            "(and --num-query-groups for GQA)"
        )
    if o.kv_channels is not None and o.kv_channels != head_dim:
        raise FlagError(f"--kv-channels {o.kv_channels} contradicts the checkpoint: the q_layernorm size gives head dim {head_dim}")
    if q_total % head_dim or kv_total % head_dim:
        raise FlagError(
            f"head dim {head_dim} does not divide the query ({q_total}) and key ({kv_total}) rows; "
            "check --num-attention-heads / --num-query-groups"
        )
    nq, ng = q_total // head_dim, kv_total // head_dim
    _check_flag("--num-attention-heads", o.num_attention_heads, nq, f"with head dim {head_dim}, {proj.name} {list(proj.shape)} gives a head count of")
    _check_flag("--num-query-groups", o.num_query_groups, ng, f"with head dim {head_dim}, layer 0's key/value rows give a query-group count of")
    if nq % ng:
        raise InputError(f"{nq} attention heads are not a multiple of {ng} query groups; the checkpoint is not a GQA model")
    if nq * head_dim != h:
        notes.append(
            f"heads x head dim = {nq} x {head_dim} = {nq * head_dim}, not the hidden size {h} (normal for Qwen3; "
            "if this file is one rank's slice of per-rank training output, merge it first)"
        )
    if o.num_attention_heads is None:
        notes.append(f"num_attention_heads={nq}")
    if o.num_query_groups is None and ng != nq:
        notes.append(f"num_query_groups={ng}")

    if fc1_split:
        gate = _need(index, l0("mlp.linear_fc1_gate.weight"))
        _need(index, l0("mlp.linear_fc1_up.weight"))
        if gate.shape != (ffn, h):
            raise InputError(f"{gate.path}: {gate.name} has shape {list(gate.shape)}; expected [{ffn}, {h}]")
        gated = True
    else:
        fc1 = _need(index, l0("mlp.linear_fc1.weight"))
        if len(fc1.shape) != 2 or fc1.shape[1] != h or fc1.shape[0] not in (ffn, 2 * ffn):
            raise InputError(f"{fc1.path}: {fc1.name} has shape {list(fc1.shape)}; expected [{2 * ffn} or {ffn}, {h}]")
        gated = fc1.shape[0] == 2 * ffn
    if o.swiglu and not gated:
        raise FlagError(f"--swiglu given, but layer 0's linear_fc1 has {ffn} rows = ffn (not 2*ffn): the MLP is not gated")
    if gated and not o.swiglu:
        notes.append("swiglu (linear_fc1 has 2*ffn rows)")

    has = lambda s: l0(s) in index.tensors  # noqa: E731
    lin_bias = [has("self_attention.linear_proj.bias"), has("mlp.linear_fc2.bias")]
    lin_bias.append(has("mlp.linear_fc1_gate.bias") if fc1_split else has("mlp.linear_fc1.bias"))
    qkv_bias = has("self_attention.linear_q.bias") if qkv_split else has("self_attention.linear_qkv.bias")
    if any(lin_bias) and not all(lin_bias):
        raise InputError(
            "layer 0 has biases on some linear layers but not all (linear_proj, linear_fc1, linear_fc2); "
            "Megatron's add_bias_linear needs all of them"
        )
    add_bias = all(lin_bias)
    if o.add_bias_linear and not add_bias:
        raise FlagError("--add-bias-linear given, but the checkpoint has no linear_proj/linear_fc1/linear_fc2 biases")
    if o.add_qkv_bias and not qkv_bias:
        raise FlagError("--add-qkv-bias given, but the checkpoint has no linear_qkv bias")
    if add_bias and not qkv_bias:
        raise InputError("the checkpoint has linear biases but no linear_qkv bias; Megatron's add_bias_linear needs it")
    if add_bias and not o.add_bias_linear:
        notes.append("add_bias_linear")

    norm_bias = has("input_layernorm.bias")
    norm = "LayerNorm" if norm_bias else "RMSNorm"
    if o.normalization is not None and o.normalization != norm:
        why = "has norm biases" if norm_bias else "has no norm biases (LayerNorm needs them)"
        raise FlagError(f"--normalization {o.normalization} contradicts the checkpoint: layer 0's input_layernorm {why}; it is {norm}")
    if o.normalization is None:
        notes.append(f"normalization={norm}")

    out = index.tensors.get("output_layer.weight")
    tied = out is None
    if o.untie_embeddings_and_output_weights and tied:
        raise FlagError("--untie-embeddings-and-output-weights given, but the checkpoint has no output_layer weight")
    if out is not None and out.shape != emb.shape:
        raise InputError(f"{out.path}: {out.name} has shape {list(out.shape)} but the embedding is {list(emb.shape)}")

    if not o.seq_length or o.seq_length < 1:
        raise FlagError(f"--seq-length {o.seq_length}: must be a positive integer")
    # The official loader's --max-position-embeddings defaults to 2048 and must be >= seq_length.
    max_pos = o.max_position_embeddings or max(2048, o.seq_length)
    if max_pos < o.seq_length:
        raise FlagError(f"--max-position-embeddings {max_pos} is smaller than --seq-length {o.seq_length}")

    if o.padded_vocab_override is not None:
        padded = o.padded_vocab_override
    elif o.true_vocab_size is not None:
        if o.true_vocab_size < 1:
            raise FlagError(f"--true-vocab-size {o.true_vocab_size}: must be positive")
        padded = padded_vocab(o.true_vocab_size, o.make_vocab_size_divisible_by, tp)
    else:
        padded = vocab
        if o.padded_vocab_size is not None and o.padded_vocab_size != vocab:
            raise FlagError(
                f"--padded-vocab-size {o.padded_vocab_size} contradicts the checkpoint's {vocab} embedding rows; "
                "pass --true-vocab-size to pad or trim the vocabulary"
            )

    cfg = ModelConfig(
        num_layers=n_layers, hidden_size=h, ffn_hidden_size=ffn, num_attention_heads=nq,
        num_query_groups=ng, kv_channels=head_dim, source_vocab=vocab, padded_vocab_size=padded,
        swiglu=gated, add_bias_linear=add_bias, add_qkv_bias=qkv_bias, normalization=norm,
        qk_layernorm=qk_ln, tied=tied, seq_length=o.seq_length, max_position_embeddings=max_pos,
        position_embedding_type=o.position_embedding_type, qkv_split=qkv_split, fc1_split=fc1_split,
        tp=tp, pp=pp, inferred=notes,
    )
    _check_parallel(cfg)
    _check_all_layers(index, cfg)
    return cfg


def _check_parallel(c: ModelConfig) -> None:
    tp, pp = c.tp, c.pp
    if c.num_query_groups % tp:
        raise FlagError(f"--target-tensor-parallel-size {tp} does not divide the {c.num_query_groups} query groups; choose a TP that does")
    if c.num_attention_heads % tp:
        raise FlagError(f"--target-tensor-parallel-size {tp} does not divide the {c.num_attention_heads} attention heads")
    if c.ffn_hidden_size % tp:
        raise FlagError(f"--target-tensor-parallel-size {tp} does not divide ffn hidden size {c.ffn_hidden_size}")
    if c.padded_vocab_size % tp:
        raise FlagError(
            f"--target-tensor-parallel-size {tp} does not divide the vocabulary of {c.padded_vocab_size} rows; "
            "pass --true-vocab-size to pad it"
        )
    if c.num_layers % pp:
        raise FlagError(f"--target-pipeline-parallel-size {pp} does not divide the {c.num_layers} layers")


def expected_layer_shapes(c: ModelConfig) -> dict:
    """Canonical per-layer suffix -> source shape the checkpoint must have."""
    h, d, nq, ng, ffn = c.hidden_size, c.kv_channels, c.num_attention_heads, c.num_query_groups, c.ffn_hidden_size
    s = {
        "input_layernorm.weight": (h,),
        "self_attention.linear_proj.weight": (h, nq * d),
        "pre_mlp_layernorm.weight": (h,),
        "mlp.linear_fc2.weight": (h, ffn),
    }
    if c.norm_has_bias:
        s["input_layernorm.bias"] = (h,)
        s["pre_mlp_layernorm.bias"] = (h,)
    if c.qkv_split:
        s["self_attention.linear_q.weight"] = (nq * d, h)
        s["self_attention.linear_k.weight"] = (ng * d, h)
        s["self_attention.linear_v.weight"] = (ng * d, h)
        if c.add_qkv_bias:
            s["self_attention.linear_q.bias"] = (nq * d,)
            s["self_attention.linear_k.bias"] = (ng * d,)
            s["self_attention.linear_v.bias"] = (ng * d,)
    else:
        s["self_attention.linear_qkv.weight"] = ((nq + 2 * ng) * d, h)
        if c.add_qkv_bias:
            s["self_attention.linear_qkv.bias"] = ((nq + 2 * ng) * d,)
    if c.qk_layernorm:
        s["self_attention.q_layernorm.weight"] = (d,)
        s["self_attention.k_layernorm.weight"] = (d,)
        if c.norm_has_bias:
            s["self_attention.q_layernorm.bias"] = (d,)
            s["self_attention.k_layernorm.bias"] = (d,)
    if c.fc1_split:
        s["mlp.linear_fc1_gate.weight"] = (ffn, h)
        s["mlp.linear_fc1_up.weight"] = (ffn, h)
        if c.add_bias_linear:
            s["mlp.linear_fc1_gate.bias"] = (ffn,)
            s["mlp.linear_fc1_up.bias"] = (ffn,)
    else:
        rows = 2 * ffn if c.swiglu else ffn
        s["mlp.linear_fc1.weight"] = (rows, h)
        if c.add_bias_linear:
            s["mlp.linear_fc1.bias"] = (rows,)
    if c.add_bias_linear:
        s["self_attention.linear_proj.bias"] = (h,)
        s["mlp.linear_fc2.bias"] = (h,)
    return s


def _check_all_layers(index: SourceIndex, c: ModelConfig) -> None:
    """Every layer must hold exactly the expected tensors with the expected shapes."""
    want = expected_layer_shapes(c)
    expected_names = set()
    for i in range(c.num_layers):
        for suffix, shape in want.items():
            name = layer_key(i, suffix)
            expected_names.add(name)
            t = index.tensors.get(name)
            if t is None:
                raise InputError(f"tensor {name} is missing from {index.load_path}; the checkpoint is incomplete")
            if tuple(t.shape) != shape:
                raise InputError(f"{t.path}: {t.name} has shape {list(t.shape)}; expected {list(shape)} like layer 0")
    expected_names.update({"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"})
    if not c.tied:
        expected_names.add("output_layer.weight")
    if c.norm_has_bias:
        expected_names.add("decoder.final_layernorm.bias")
    fin = _need(index, "decoder.final_layernorm.weight")
    if tuple(fin.shape) != (c.hidden_size,):
        raise InputError(f"{fin.path}: {fin.name} has shape {list(fin.shape)}; expected [{c.hidden_size}]")
    if c.norm_has_bias:
        _need(index, "decoder.final_layernorm.bias")
    extra = sorted(set(index.tensors) - expected_names)
    if extra:
        t = index.tensors[extra[0]]
        raise InputError(
            f"{t.path}: tensor {t.name!r} does not belong to a {c.normalization} model with these "
            f"settings (layer 0 has no such tensor); the checkpoint mixes configurations"
        )
