"""Megatron's sharded keys (megatron/sharded.py) on hand-written entries, expectations by hand.

The expectations are Megatron r0.12's ``sharded_state_dict`` rules as FORMAT.md §7
and the model code state them (TransformerBlock layer stacking, the local spec's
keys map, SequentialMLP / TEGroupedMLP expert keys, ShardedObject unique keys,
GPTModel dropping output_layer._extra_state, the tied output layer's replica id),
written out here as literal keys, offsets and shapes.
"""

from __future__ import annotations

import argparse

from streamconv.megatron import rules as R
from streamconv.megatron.entries import EntryKind, OutDtype, fixed_bytes, none, resolve, tensor
from streamconv.megatron.parallel import Axis, ParallelSizes, Rank, RankCoord
from streamconv.megatron.sharded import ShardedChunk, ShardedObj, ShardedView, sharded_object_key, stacks_layers
from streamconv.sources.header import TensorInfo
from streamconv.sources.tensor import SourceTensor


def src(name, *shape):
    n = 1
    for s in shape:
        n *= s
    return SourceTensor(name, name, "/nonexistent", TensorInfo(name, "F32", tuple(shape), 0, 4 * n))


def args(**kw):
    a = dict(num_layers=4, transformer_impl="local", untie_embeddings_and_output_weights=True, moe_layer_freq=1,
             num_experts=None)
    a.update(kw)
    return argparse.Namespace(**a)


def at(tp=0, TP=2, ep=0, EP=1, pp=0, etp=None, ETP=None):
    sizes = ParallelSizes(tp=TP, pp=2, ep=EP, etp=ETP)
    return Rank(RankCoord(tp=tp, pp=pp, ep=ep, etp=tp if etp is None else etp), sizes)


def items(spec, rank, a=None, layers=range(2, 4)):
    e = resolve(spec, rank)
    return ShardedView(a or args(), rank.sizes).items(e, rank, layers)


H = 6
NORM = src("n", H)
QKV = src("qkv", 16, H)
FC1 = src("fc1", 8, H)  # ffn 4, [gate; up]
PROJ = src("proj", H, 8)
EMB = src("emb", 10, H)


def test_stacked_local_norm_is_the_te_name_on_the_layer_axis():
    spec = tensor("decoder.layers.1.input_layernorm.weight", R.Whole(NORM), 1)
    # stage 1 of PP 2 holds layers 2, 3: its layer 1 is global layer 3 of 4
    assert items(spec, at(0)) == [ShardedChunk("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                                               (4, H), (3, 0), (1, H), 0, H)]
    assert items(spec, at(1)) == []  # a TP replica
    spec = tensor("decoder.layers.0.pre_mlp_layernorm.bias", R.Whole(NORM), 1)
    assert items(spec, at(0))[0].key == "decoder.layers.mlp.linear_fc1.layer_norm_bias"


def test_te_names_are_kept_and_mla_local_names_are_not_mapped():
    spec = tensor("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", R.Whole(NORM), 1)
    assert items(spec, at(0), args(transformer_impl="transformer_engine"))[0].key == \
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    spec = tensor("decoder.layers.0.input_layernorm.weight", R.Whole(NORM), 1)
    assert items(spec, at(0), args(multi_latent_attention=True))[0].key == "decoder.layers.input_layernorm.weight"


def test_column_and_row_parallel_chunks():
    qkv = tensor("decoder.layers.0.self_attention.linear_qkv.weight", R.QkvFused(QKV, 4, 2, 2), 2)
    assert items(qkv, at(1)) == [ShardedChunk("decoder.layers.self_attention.linear_qkv.weight",
                                              (4, 16, H), (2, 8, 0), (1, 8, H), 0, 8)]
    proj = tensor("decoder.layers.1.self_attention.linear_proj.weight", R.Chunk(PROJ, dim=1), 2)
    assert items(proj, at(1)) == [ShardedChunk("decoder.layers.self_attention.linear_proj.weight",
                                               (4, H, 8), (3, 0, 4), (1, H, 4), 0, H)]


def test_gated_fc1_is_two_chunks_gate_then_up():
    fc1 = tensor("decoder.layers.0.mlp.linear_fc1.weight", R.GatedFused(FC1, 4, "concat"), 2)
    key = "decoder.layers.mlp.linear_fc1.weight"
    assert items(fc1, at(1)) == [ShardedChunk(key, (4, 8, H), (2, 2, 0), (1, 2, H), 0, 2),
                                 ShardedChunk(key, (4, 8, H), (2, 6, 0), (1, 2, H), 2, 4)]


def test_extra_state_objects():
    local = none("decoder.layers.1.mlp.linear_fc1._extra_state")
    assert items(local, at(0)) == [ShardedObj("decoder.layers.mlp.linear_fc1._extra_state", (3,), (4,), None)]
    assert items(local, at(0))[0].unique_key == "decoder.layers.mlp.linear_fc1._extra_state/shard_3_4"
    assert items(local, at(1)) == []
    te = fixed_bytes("decoder.layers.0.self_attention.core_attention._extra_state", b"")
    assert items(te, at(0)) == [ShardedObj("decoder.layers.self_attention.core_attention._extra_state",
                                           (2,), (4,), b"")]
    final = fixed_bytes("decoder.final_layernorm._extra_state", b"\x80\x04}\x94.")
    assert items(final, at(0), args(transformer_impl="transformer_engine"))[0].unique_key == \
        "decoder.final_layernorm._extra_state/shard_0_1"
    assert items(final, at(0)) == []  # local spec: a torch norm (no TE), no extra state
    assert items(none("output_layer._extra_state"), at(0)) == []


def test_embedding_and_output_layer():
    emb = tensor("embedding.word_embeddings.weight", R.VocabChunk(EMB, 12), 2)
    assert items(emb, at(1)) == [ShardedChunk("embedding.word_embeddings.weight", (12, H), (6, 0), (6, H), 0, 6)]
    out = tensor("output_layer.weight", R.VocabChunk(EMB, 12), 2)
    assert items(out, at(0))[0].key == "output_layer.weight"
    # tied, PP > 1: the last stage's copy is a replica of the first stage's embedding
    assert items(out, at(0), args(untie_embeddings_and_output_weights=False)) == []


def test_ep_replicas_of_dense_weights_are_not_stored():
    qkv = tensor("decoder.layers.0.self_attention.linear_qkv.weight", R.QkvFused(QKV, 4, 2, 2), 2)
    a = args(num_experts=4)
    assert items(qkv, at(1, ep=0, EP=2), a) != []
    assert items(qkv, at(1, ep=1, EP=2), a) == []  # dense data-parallel rank 1


def test_non_homogeneous_layers_keep_their_global_index():
    assert not stacks_layers(args(moe_layer_freq=[0, 1, 1, 1])) and not stacks_layers(args(moe_layer_freq=2))
    assert stacks_layers(args(moe_layer_freq=1))
    fc2 = tensor("decoder.layers.1.mlp.linear_fc2.weight", R.Chunk(PROJ, dim=1), 2)
    assert items(fc2, at(0), args(moe_layer_freq=[0, 1, 1, 1])) == [
        ShardedChunk("decoder.layers.3.mlp.linear_fc2.weight", (H, 8), (0, 0), (H, 4), 0, H)]
    x = none("decoder.layers.0.mlp.linear_fc2._extra_state")
    assert items(x, at(0), args(moe_layer_freq=[0, 1, 1, 1]))[0].unique_key == \
        "decoder.layers.2.mlp.linear_fc2._extra_state/shard_0_1"


STACK1 = src("weight1", 4 * H, 8)  # 4 experts, each stored [in=H, out=2F=8]


def test_sequential_experts_on_the_expert_axis():
    # EP 2: rank ep 1's local expert 1 is global expert 3 of 4; ETP 1
    rule = R.GatedFused(R.ExpertRef(STACK1, 4, 1, transposed=True), 4, "concat", Axis.ETP)
    spec = tensor("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight", rule, 2)
    rank = at(0, TP=1, ep=1, EP=2)
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    assert items(spec, rank, args(num_experts=4)) == [
        ShardedChunk(key, (4, 4, 8, H), (2, 3, 0, 0), (1, 1, 4, H), 0, 4),
        ShardedChunk(key, (4, 4, 8, H), (2, 3, 4, 0), (1, 1, 4, H), 4, 8)]
    x = none("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1._extra_state")
    assert items(x, rank, args(num_experts=4))[0].unique_key == \
        "decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_2.3_4.4"


def test_grouped_experts_match_sequential_keys():
    rank = at(0, TP=1, ep=1, EP=2)
    a = args(num_experts=4, moe_layer_freq=[0, 1, 1, 1])
    fc2 = tensor("decoder.layers.1.mlp.experts.linear_fc2.weight0",
                 R.Whole(R.ExpertRef(src("weight2", 4 * 4, H), 4, 0, transposed=True)), 2)
    assert items(fc2, rank, a) == [ShardedChunk("decoder.layers.3.mlp.experts.experts.linear_fc2.weight",
                                                (4, H, 4), (2, 0, 0), (1, H, 4), 0, H)]
    x = fixed_bytes("decoder.layers.1.mlp.experts.linear_fc2._extra_state", b"")
    assert [o.unique_key for o in items(x, rank, a)] == [
        "decoder.layers.3.mlp.experts.experts.linear_fc2._extra_state/shard_2_4",
        "decoder.layers.3.mlp.experts.experts.linear_fc2._extra_state/shard_3_4"]


def test_unique_key_format():
    assert sharded_object_key("a.b_c._extra_state", (2, 0), (4, 1)) == "a.b_c._extra_state/shard_2.0_4.1"
    e = resolve(fixed_bytes("decoder.layers.0.x._extra_state", b"ab"), at(0))
    assert e.kind is EntryKind.BYTES and e.dtype is OutDtype.UINT8


def test_mtp_layer_keys_and_the_mtp_stage_embedding():
    """MultiTokenPredictionBlock: layers keyed by their global index, never stacked; the MTP stage's own
    embedding copy is a replica (tie_word_embeddings_state_dict, replica id (1, 0, dp))."""
    a = args(num_experts=4, moe_layer_freq=1, multi_latent_attention=True)
    last = at(0, TP=1, pp=1)
    w = tensor("mtp.layers.0.transformer_layer.input_layernorm.weight", R.Whole(NORM), 1)
    assert items(w, last, a) == [ShardedChunk("mtp.layers.0.transformer_layer.input_layernorm.weight",
                                              (H,), (0,), (H,), 0, H)]
    x = none("mtp.layers.0.transformer_layer.mlp.experts.local_experts.1.linear_fc2._extra_state")
    assert items(x, at(0, TP=1, ep=1, EP=2, pp=1), a)[0].unique_key == \
        "mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc2._extra_state/shard_3_4"
    eh = tensor("mtp.layers.0.eh_proj.weight", R.Chunk(src("eh", 8, 2 * H)), 2)
    assert items(eh, at(1, TP=2, pp=1), a) == [ShardedChunk("mtp.layers.0.eh_proj.weight", (8, 2 * H), (4, 0),
                                                            (4, 2 * H), 0, 4)]
    assert items(fixed_bytes("mtp.layers.0.enorm._extra_state", b""), last, a)[0].unique_key == \
        "mtp.layers.0.enorm._extra_state/shard_0_1"
    emb = tensor("embedding.word_embeddings.weight", R.VocabChunk(EMB, 12), 2)
    assert items(emb, at(0, TP=1, pp=1), a) == []
    assert items(emb, at(0, TP=1, pp=0), a) != []
    # the local keys map applies to the MTP transformer layer as to the decoder's (standard attention)
    w = tensor("mtp.layers.0.transformer_layer.pre_mlp_layernorm.weight", R.Whole(NORM), 1)
    assert items(w, last, args(num_experts=4))[0].key == "mtp.layers.0.transformer_layer.mlp.linear_fc1.layer_norm_weight"
