"""Embedding, output layer and vocabulary padding.

The embedding gives the hidden size and the source vocabulary; the output
layer is either absent (tied embeddings) or the same shape. The padded size is
Megatron's rule (FORMAT.md §2 "Vocab"): with a true vocabulary size, round up
to a multiple of ``make_vocab_size_divisible_by x TP``; without one, keep the
rows as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import FlagError, InputError
from .tensors import Tensors, check_flag


@dataclass(frozen=True)
class Vocab:
    hidden_size: int
    source_vocab: int
    padded_vocab_size: int
    tied: bool


def padded_vocab(true_vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's ``_vocab_size_with_padding``: round up to a multiple of divisible_by * TP."""
    multiple = divisible_by * tp
    return ((true_vocab + multiple - 1) // multiple) * multiple


def embedding(t: Tensors, o) -> tuple:
    """(source vocab rows, hidden size) from the word embeddings."""
    emb = t.need("embedding.word_embeddings.weight")
    if len(emb.shape) != 2:
        raise InputError(f"{emb.path}: {emb.name} has shape {list(emb.shape)}; expected [vocab, hidden]")
    vocab, h = emb.shape
    check_flag(o.source_of("hidden_size", "--hidden-size"), o.hidden_size, h, f"{emb.name} {list(emb.shape)} gives hidden size")
    return vocab, h


def output_layer(t: Tensors, o) -> bool:
    """True if the output layer is tied to the embeddings (no output_layer.weight)."""
    emb = t.need("embedding.word_embeddings.weight")
    out = t.get("output_layer.weight")
    tied = out is None
    if o.untie_embeddings_and_output_weights and tied:
        raise FlagError("--untie-embeddings-and-output-weights given, but the checkpoint has no output_layer weight")
    if out is not None and out.shape != emb.shape:
        raise InputError(f"{out.path}: {out.name} has shape {list(out.shape)} but the embedding is {list(emb.shape)}")
    return tied


def padded_size(vocab: int, o) -> int:
    """Rows of the output tables, by the flags: the output's own size, Megatron's padding, or as stored."""
    if o.padded_vocab_override is not None:
        return o.padded_vocab_override
    if o.true_vocab_size is not None:
        if o.true_vocab_size < 1:
            raise FlagError(f"--true-vocab-size {o.true_vocab_size}: must be positive")
        return padded_vocab(o.true_vocab_size, o.make_vocab_size_divisible_by, o.target_tensor_parallel_size)
    if o.padded_vocab_size is not None and o.padded_vocab_size != vocab:
        raise FlagError(
            f"--padded-vocab-size {o.padded_vocab_size} contradicts the checkpoint's {vocab} embedding rows; "
            "pass --true-vocab-size to pad or trim the vocabulary"
        )
    return vocab
