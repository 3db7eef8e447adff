#!/usr/bin/env python3
"""Dump what real Megatron-Core r0.12 puts in a checkpoint, per rank, for a model and a parallel layout.

Independent ground truth for streamconv's MoE/MLA and torch_dist work: nothing here
comes from streamconv; every name, shape, offset and replica id is read off the model
that Megatron's own ``pretrain_gpt.model_provider`` builds from Megatron's own parsed
arguments (see scripts/_mcore_cpu.py for how, and for the CPU stand-ins). Not part of
CI. No tensor data is dumped.

Environment (once; torch is pinned: an unpinned torch pulls a multi-GB CUDA build, so
every pip command that could touch torch names ``torch==2.13.0`` again, which keeps the
resolver from swapping it for the one transformers or megatron-core would like):

    python3 -m venv /work/venv-mcore
    /work/venv-mcore/bin/pip install "torch==2.13.0"
    /work/venv-mcore/bin/pip install "torch==2.13.0" "megatron-core==0.12.*" "transformers==4.57.*" \
        numpy safetensors pytest psutil
    # the Megatron-LM training side (pretrain_gpt.py, megatron/training), branch core_r0.12.0,
    # e.g. from a bare clone: git --git-dir=<clone> archive core_r0.12.0 megatron/training \
    #     megatron/legacy pretrain_gpt.py tools | tar -x -C /tmp/mlm
    export MEGATRON_LM=/tmp/mlm

Checked with megatron-core 0.12.3, torch 2.13.0+cpu, transformers 4.57.6, numpy 2.4.6
(megatron-core 0.12.x pulls zarr/ml-dtypes, which need numpy >= 2; the one numpy-2 break
in megatron-core, ``np.product``, has a stand-in), psutil (megatron's dist-checkpoint
writer imports it). ``pip check`` is clean.

Run:

    /work/venv-mcore/bin/python scripts/megatron_truth.py --all            # every case -> tests/data/megatron_truth/
    /work/venv-mcore/bin/python scripts/megatron_truth.py --case qwen3_moe_tp2_ep2
    /work/venv-mcore/bin/python scripts/megatron_truth.py --hf-config X/config.json --tp 2 --pp 2 --ep 2 \\
        --etp 1 [--num-layers 4] [--mtp-layers 1] [--moe-grouped-gemm] --out my.json
    /work/venv-mcore/bin/python scripts/megatron_truth.py --list

One process per rank (gloo, CPU). Each rank dumps:

* ``legacy``: the file ``megatron.training.checkpointing.get_checkpoint_name`` gives it
  (relative to the save dir, iteration 1), whether ``save_checkpoint`` would write it
  (legacy format: only expert-data-parallel rank 0 writes), and
  ``model.state_dict_for_save_checkpoint()`` in order: ``[key, shape, dtype]`` for
  tensors, ``[key, null, type, value]`` for anything else (``_extra_state``). Dtypes are
  those of the bf16 model as built (``Float16Module`` casts every float buffer);
  ``dtype_after_forward`` lists the entries whose dtype the first forward changes
  (``TopKRouter._maintain_float32_expert_bias``, the first thing its forward does, is
  called to find them: a checkpoint written after training carries that dtype).
* ``dist``: ``model.sharded_state_dict()`` (what ``generate_state_dict`` stores for
  ``--ckpt-format torch_dist``) after Megatron's ``save_preprocess`` (factories applied,
  sharding integrity validated across all ranks): for every ShardedTensor its key,
  global shape/offset, local shape, axis_fragmentations, replica_id, prepend_axis_num,
  flattened_range, dtype, allow_shape_mismatch, ``main`` (replica_id all zeros: the
  chunk this rank writes), ``sd`` (the state-dict key it came from) and ``factory``
  (made by a ShardedTensorFactory); for every ShardedObject its key, unique_key,
  global shape/offset, replica_id, data type and value, and the bytes Megatron's
  torch_dist strategy stores for it (``torch.save([data])``: its length).

``--write-checkpoints`` additionally runs Megatron's real ``save_checkpoint`` (torch and
torch_dist, random weights, as a training run saves: with RNG and rerun state) into a
temporary dir and adds a ``written`` section: the files, the top-level keys of each
legacy file, common.pt's keys, and for torch_dist every ``.metadata`` item (tensor: global
size, dtype, number of chunks and the files they went to; byte item: file, length and
what ``torch.load`` gives). It also checks the dump against those files and records the
verdicts: ``files_and_models_match_dump`` (legacy: exactly the ``writes`` ranks' files,
each with the dumped state dict in order) and ``metadata_matches_main_replicas``
(torch_dist: the chunks are exactly the dump's main-replica chunks, the byte items
exactly its main-replica ShardedObjects; ``not_model_state`` lists save_checkpoint's own
objects).
Megatron's torch_dist writer needs two more stand-ins for that (documented in
``_mcore_cpu.patch_writer``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch  # noqa: E402

import _mcore_cpu as M  # noqa: E402

FIX = "/work/shared/fixtures"
OUT_DIR = os.path.join(REPO, "tests", "data", "megatron_truth")

QWEN2 = f"{FIX}/hf_pairs/qwen2/config.json"
QWEN3_MOE = f"{FIX}/mindformers_moe/qwen3_moe/hf/config.json"
DSV3 = f"{FIX}/mindformers_moe/deepseek_v3/hf/config.json"

# name -> (HF config path, config overrides, layout, extra options)
CASES = {
    # dense GQA SwiGLU untied (Qwen2: qkv bias), 4 layers so that each stage stacks 2
    "dense_qwen2_tp2_pp2": (QWEN2, {}, dict(tp=2, pp=2), dict(num_layers=4)),
    # dense with qk-layernorm (Qwen3-shaped: the Qwen2 sizes, head_dim 8, no bias)
    "dense_qwen3_qkln_tp2": (QWEN2, {"model_type": "qwen3", "head_dim": 8}, dict(tp=2, pp=1), {}),
    # Qwen3-MoE fixture shape: every layer MoE (--moe-layer-freq 1), qk-layernorm, 4 experts
    "qwen3_moe_tp2_ep2": (QWEN3_MOE, {}, dict(tp=2, pp=1, ep=2), {}),
    "qwen3_moe_tp2_ep2_etp1": (QWEN3_MOE, {}, dict(tp=2, pp=1, ep=2, etp=1), {}),
    "qwen3_moe_tp1_ep4": (QWEN3_MOE, {}, dict(tp=1, pp=1, ep=4), {}),
    # the same model, one dense layer via mlp_only_layers: --moe-layer-freq becomes a list
    "qwen3_moe_list_freq_tp1_ep2": (QWEN3_MOE, {"mlp_only_layers": [0]}, dict(tp=1, pp=1, ep=2), {}),
    # DeepSeek-V3 fixture shape: MLA with q_lora, layer 0 dense (list freq), shared expert,
    # sigmoid router with expert bias; 4 layers so that PP2 splits evenly
    "deepseek_v3_tp2_pp2_ep2": (DSV3, {}, dict(tp=2, pp=2, ep=2), dict(num_layers=4)),
    "deepseek_v3_noqlora_tp2_pp2_ep2": (DSV3, {"q_lora_rank": None}, dict(tp=2, pp=2, ep=2), dict(num_layers=4)),
    "deepseek_v3_mtp1_tp2_pp2_ep2": (DSV3, {}, dict(tp=2, pp=2, ep=2), dict(num_layers=4, mtp_layers=1)),
    # the fixture's own 3 layers at PP2: uneven stages (first stage 1 layer)
    "deepseek_v3_3layers_tp1_pp2_ep2": (DSV3, {}, dict(tp=1, pp=2, ep=2, first_stage_layers=1), {}),
    # legacy GroupedMLP (local spec + --moe-grouped-gemm): built for its keys only (no CPU kernels)
    "qwen3_moe_grouped_gemm_tp2_ep2": (QWEN3_MOE, {}, dict(tp=2, pp=1, ep=2), dict(grouped_gemm=True)),
}


def case_argv(cfg_path, overrides, layout, opts):
    cfg = dict(M.load_json(cfg_path), **overrides)
    moe = cfg["model_type"] in ("qwen3_moe", "deepseek_v3")
    argv = M.hf_to_megatron_argv(cfg, num_layers=opts.get("num_layers"), mtp_layers=opts.get("mtp_layers"))
    argv += M.layout_argv(layout["tp"], layout["pp"], layout.get("ep", 1), layout.get("etp"), moe=moe,
                          first_stage_layers=layout.get("first_stage_layers"))
    if opts.get("grouped_gemm"):
        argv.append("--moe-grouped-gemm")
    world = M.world_size_for(layout["tp"], layout["pp"], layout.get("ep", 1), layout.get("etp"))
    return argv + M.RUN_ARGV, world


# ----------------------------------------------------------------------------- describing entries

def _dtype(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _value(v):
    """JSON-able description of a non-tensor state-dict value."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, io.BytesIO):
        return {"bytes_hex": v.getvalue().hex()}
    return repr(v)[:200]


def legacy_entries(sd: dict) -> list:
    out = []
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out.append([k, list(v.shape), _dtype(v)])
        else:
            out.append([k, None, type(v).__name__, _value(v)])
    return out


def _flat(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flat(v, prefix + (str(k),))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _flat(v, prefix + (str(i),))
    else:
        yield "/".join(prefix), d


def dist_entries(model) -> dict:
    """model.sharded_state_dict() after Megatron's own save_preprocess (which validates it globally)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    raw = model.sharded_state_dict()
    factory_keys = {p for p, v in _flat(raw) if isinstance(v, ShardedTensorFactory)}
    sharded, common = save_preprocess(raw, validate_access_integrity=True)
    tensors, objects = [], []
    for path, v in _flat(sharded):
        sd_key = path.split("/")[0]
        if isinstance(v, ShardedTensor):
            tensors.append({
                "key": v.key, "sd": path, "global_shape": list(v.global_shape),
                "global_offset": list(v.global_offset), "local_shape": list(v.local_shape),
                "axis_fragmentations": list(v.axis_fragmentations) if v.axis_fragmentations else None,
                "replica_id": list(v.replica_id) if isinstance(v.replica_id, tuple) else v.replica_id,
                "prepend_axis_num": v.prepend_axis_num,
                "flattened_range": None if v.flattened_range is None else [v.flattened_range.start,
                                                                           v.flattened_range.stop],
                "dtype": _dtype(v.data) if v.data is not None else str(v.dtype),
                "allow_shape_mismatch": v.allow_shape_mismatch,
                "main": _is_main(v.replica_id), "factory": sd_key in factory_keys,
            })
        elif isinstance(v, ShardedObject):
            blob = io.BytesIO()
            torch.save([v.data], blob)  # what TorchDistSaveShardedStrategy stores for one object
            objects.append({
                "key": v.key, "unique_key": v.unique_key, "sd": path, "global_shape": list(v.global_shape),
                "global_offset": list(v.global_offset),
                "replica_id": list(v.replica_id) if isinstance(v.replica_id, tuple) else v.replica_id,
                "main": _is_main(v.replica_id), "data_type": type(v.data).__name__, "data": _value(v.data),
                "stored_bytes_len": len(blob.getvalue()),
            })
        else:
            raise RuntimeError(f"unexpected sharded entry {path}: {type(v)}")
    return {"tensors": tensors, "objects": objects,
            "common": [[p, type(v).__name__] for p, v in _flat(common)]}


def _is_main(replica_id) -> bool:
    rid = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(r == 0 for r in rid)


# ----------------------------------------------------------------------------- real save (optional)

def describe_written(save_dir: str) -> dict:
    """Summary of what save_checkpoint wrote (rank 0, after the barrier)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    out = {"files": sorted(os.path.relpath(os.path.join(r, f), save_dir)
                           for r, _, fs in os.walk(save_dir) for f in fs)}
    it = os.path.join(save_dir, "iter_0000001")
    if os.path.exists(os.path.join(it, "metadata.json")):
        out["metadata.json"] = M.load_json(os.path.join(it, "metadata.json"))
        common = torch.load(os.path.join(it, "common.pt"), weights_only=False)
        out["common.pt"] = {k: type(v).__name__ for k, v in common.items()}
        md = FileSystemReader(it).read_metadata()  # our own file, just written
        where = {}
        for idx, info in md.storage_data.items():
            where.setdefault(idx.fqn, []).append([list(idx.offset) if idx.offset is not None else None,
                                                  info.relative_path, info.offset, info.length])
        items = {}
        for fqn, m in md.state_dict_metadata.items():
            if isinstance(m, BytesStorageMetadata):
                (off, rel, pos, n), = where[fqn]
                with open(os.path.join(it, rel), "rb") as f:
                    f.seek(pos)
                    blob = f.read(n)
                items[fqn] = {"bytes": {"file": rel, "length": n,
                                        "torch_load": repr(torch.load(io.BytesIO(blob), weights_only=False))[:120]}}
            else:
                files = {tuple(o): rel for o, rel, _, _ in where[fqn]}
                items[fqn] = {"size": list(m.size), "dtype": _dtype(m.properties),
                              "chunks": [[list(c.offsets), list(c.sizes), files.get(tuple(c.offsets))]
                                         for c in m.chunks]}
        out["metadata"] = {"type": type(md).__name__, "extra_attrs": sorted(a for a in vars(md)
                                                                             if a not in ("state_dict_metadata",
                                                                                          "planner_data",
                                                                                          "storage_data",
                                                                                          "storage_meta",
                                                                                          "version")),
                           "items": items}
    else:
        out["legacy"] = {}
        for f in out["files"]:
            if f.endswith("model_optim_rng.pt"):
                d = torch.load(os.path.join(save_dir, f), weights_only=False, map_location="cpu")
                out["legacy"][f] = {k: type(v).__name__ for k, v in d.items()}
                out.setdefault("_models", {})[f] = legacy_entries(d["model"])
    return out


def check_written(written: dict, ranks: list) -> None:
    """Cross-check the dump against the files Megatron really wrote; record the verdicts.

    legacy: the files are exactly those of the ranks marked ``writes`` and each holds the
    dumped state dict (same keys in the same order, shapes, dtypes). torch_dist: the chunks
    in ``.metadata`` are exactly the main-replica chunks of the dump (offsets and sizes, the
    prepended layer/expert axes counted as size 1), and the byte items exactly the
    main-replica ShardedObjects.
    """
    leg = written["torch"]
    models = leg.pop("_models")
    expect = {}
    for r in ranks:  # the files were written after the routers' first-forward dtype fix (see worker)
        if r["legacy"]["writes"]:
            after = r["legacy"]["dtype_after_forward"]
            expect[r["legacy"]["file"]] = [[e[0], e[1], after[e[0]]] if e[0] in after else e
                                           for e in r["legacy"]["state_dict"]]
    ok = set(models) == set(expect) and all(json.loads(json.dumps(models[f])) == expect[f] for f in expect)
    leg["files_and_models_match_dump"] = ok
    dist = written["torch_dist"]
    want_t, want_o = {}, set()
    for r in ranks:
        for t in r["dist"]["tensors"]:
            if t["main"]:
                size = [1] * t["prepend_axis_num"] + t["local_shape"]
                want_t.setdefault(t["key"], set()).add((tuple(t["global_offset"]), tuple(size)))
        for o in r["dist"]["objects"]:
            if o["main"]:
                want_o.add(o["unique_key"])
    got_t, got_o, other = {}, set(), []
    for k, item in dist["metadata"]["items"].items():
        if k.split("/")[0] in ("rng_state", "rerun_state_machine_state"):  # save_checkpoint's own objects
            other.append(k)
        elif "bytes" in item:
            got_o.add(k)
        else:
            got_t[k] = {(tuple(o), tuple(sz)) for o, sz, _ in item["chunks"]}
    dist["metadata_matches_main_replicas"] = {
        "tensors": got_t == {k: v for k, v in want_t.items()},
        "objects": got_o == want_o,
        "missing_in_metadata": sorted(set(want_t) - set(got_t)) + sorted(want_o - got_o),
        "extra_in_metadata": sorted(set(got_t) - set(want_t)) + sorted(got_o - want_o),
        "not_model_state": other,
    }
    # the chunk lists equal the dump's main replicas (checked above): keep only counts and files
    for item in dist["metadata"]["items"].values():
        if "chunks" in item:
            item["files"] = sorted({c[2] for c in item["chunks"]})
            item["chunks"] = len(item["chunks"])


# ----------------------------------------------------------------------------- worker

def worker(rank, world, port, argv, out_dir, write_ckpts, grouped_gemm):
    M.add_megatron_lm(None)
    M.apply_cpu_shims(grouped_gemm_stub=grouped_gemm)
    args = M.init_megatron(argv, rank, world, port)
    from megatron.core import parallel_state as mpu
    from megatron.training.checkpointing import get_checkpoint_name

    wrapped, (model,) = M.build_model()
    rep = {"coords": M.rank_coords()}
    name = get_checkpoint_name("SAVE", 1)
    sd = model.state_dict_for_save_checkpoint()
    rep["legacy"] = {"file": os.path.relpath(name, "SAVE"), "writes": mpu.get_expert_data_parallel_rank() == 0,
                     "state_dict": legacy_entries(sd)}
    before = {k: _dtype(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    from megatron.core.transformer.moe.router import TopKRouter

    for m in model.modules():
        if isinstance(m, TopKRouter):
            m._maintain_float32_expert_bias()
    after = {k: _dtype(v) for k, v in model.state_dict_for_save_checkpoint().items() if isinstance(v, torch.Tensor)}
    rep["legacy"]["dtype_after_forward"] = {k: after[k] for k in after if after[k] != before.get(k)}
    rep["dist"] = dist_entries(model)
    with open(os.path.join(out_dir, f"rank_{rank}.json"), "w") as f:
        json.dump(rep, f)
    if write_ckpts:
        for fmt in ("torch", "torch_dist"):
            M.real_save(args, wrapped, fmt, os.path.join(out_dir, f"save_{fmt}"))
            torch.distributed.barrier()
    M.teardown()


# ----------------------------------------------------------------------------- transformer_engine spec

TE_PLACEHOLDERS = ("TEColumnParallelLinear", "TERowParallelLinear", "TELayerNormColumnParallelLinear", "TENorm",
                   "TEDotProductAttention", "TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear")


def _spec_tree(x):
    """A ModuleSpec / submodules dataclass / class as JSON (class names only)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(x, ModuleSpec):
        out = {"module": _spec_tree(x.module)}
        if x.params:
            out["params"] = {k: repr(v) for k, v in x.params.items()}
        if x.submodules is not None:
            out["submodules"] = _spec_tree(x.submodules)
        return out
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _spec_tree(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (list, tuple)):
        return [_spec_tree(v) for v in x]
    if isinstance(x, dict):
        return {k: _spec_tree(v) for k, v in x.items()}
    if isinstance(x, type) or callable(x):
        return getattr(x, "__name__", repr(x))
    return x


def te_spec_worker(rank, world, port, argv, out_dir, grouped_gemm=False):
    """Megatron's own spec functions for the TE spec, with name-only placeholders for the TE classes.

    Without Transformer Engine the TE classes do not exist, so no TE module can be built and
    no TE parameter name (weight / layer_norm_weight / _extra_state ...) can be observed. What
    Megatron's spec code decides WITHOUT building anything can: which module path gets which
    TE class, where norms are fused into linears, and the local spec's
    ``sharded_state_dict_keys_map``. Each placeholder is an empty class named after the TE
    class it stands for; ``is_te_min_version`` answers True (TE >= 1.9 assumed, as any TE that
    r0.12 supports); the MTP spec's ``HAVE_TE`` check is satisfied.
    """
    M.add_megatron_lm(None)
    M.apply_cpu_shims(grouped_gemm_stub=grouped_gemm)
    args = M.init_megatron(argv, rank, world, port)
    from megatron.core.models.gpt import gpt_layer_specs as S
    from megatron.core.models.gpt import moe_module_specs as MS
    from megatron.core.transformer import multi_token_prediction as MTP
    from megatron.training.arguments import core_transformer_config_from_args

    for mod in (S, MS, MTP):
        for n in TE_PLACEHOLDERS:
            setattr(mod, n, type(n, (), {"__doc__": "placeholder: Transformer Engine not installed"}))
        if hasattr(mod, "is_te_min_version"):
            mod.is_te_min_version = lambda *a, **k: True
    MTP.HAVE_TE = True
    config = core_transformer_config_from_args(args)
    out = {}
    for impl, use_te in (("transformer_engine", True), ("local", False)):
        # the same choice as pretrain_gpt.model_provider
        if args.num_experts:
            spec = S.get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=args.normalization)
        elif use_te:
            spec = S.get_gpt_layer_with_transformer_engine_spec(
                args.num_experts, args.moe_grouped_gemm, args.qk_layernorm, args.multi_latent_attention,
                args.moe_use_legacy_grouped_gemm)
        else:
            spec = S.get_gpt_layer_local_spec(
                args.num_experts, args.moe_grouped_gemm, args.qk_layernorm, args.multi_latent_attention,
                args.moe_use_legacy_grouped_gemm, normalization=args.normalization)
        mtp = S.get_gpt_mtp_block_spec(config, spec, use_transformer_engine=use_te) if args.mtp_num_layers else None
        out[impl] = {"decoder": _spec_tree(spec), "mtp": _spec_tree(mtp)}
    with open(os.path.join(out_dir, "te_spec.json"), "w") as f:
        json.dump(out, f)
    M.teardown()


def run_te_spec(name, argv, out_path, meta, grouped_gemm=False) -> None:
    import torch.multiprocessing as mp

    # one rank, no parallelism: the spec does not depend on the layout (except the PP slice)
    with tempfile.TemporaryDirectory(prefix="mtruth_te_") as tmp:
        mp.spawn(te_spec_worker, args=(1, M.free_port(), argv, tmp, grouped_gemm), nprocs=1, join=True)
        spec = M.load_json(os.path.join(tmp, "te_spec.json"))
    import megatron.core

    doc = {"case": name, "megatron_core": megatron.core.__version__, "megatron_argv": " ".join(argv), **meta,
           "note": "module classes chosen by Megatron's spec functions; TE classes are name-only placeholders "
                   "(Transformer Engine is not installed), so TE parameter names are NOT observed here",
           "spec": spec}
    with open(out_path, "w") as f:
        f.write(_compact(doc) + "\n")


# ----------------------------------------------------------------------------- output

def _compact(obj, indent=0, width=600) -> str:
    """JSON with short containers on one line and long ones expanded (one record per line)."""
    pad = " " * indent
    flat = json.dumps(obj)
    if not isinstance(obj, (dict, list)) or not obj or len(flat) + indent <= width:
        return pad + flat
    if isinstance(obj, dict):
        items = [f"{pad} {json.dumps(k)}: {_compact(v, indent + 1, width).lstrip()}" for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    return pad + "[\n" + ",\n".join(_compact(v, indent + 1, width) for v in obj) + "\n" + pad + "]"


def run(name, argv, world, out_path, write_ckpts=False, grouped_gemm=False, meta=None) -> dict:
    import megatron.core
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="mtruth_") as tmp:
        mp.spawn(worker, args=(world, M.free_port(), argv, tmp, write_ckpts, grouped_gemm), nprocs=world, join=True)
        ranks = [M.load_json(os.path.join(tmp, f"rank_{r}.json")) for r in range(world)]
        written = None
        if write_ckpts:
            written = {fmt: describe_written(os.path.join(tmp, f"save_{fmt}")) for fmt in ("torch", "torch_dist")}
            check_written(written, ranks)
    doc = {"case": name, "megatron_core": megatron.core.__version__, "torch": torch.__version__,
           "megatron_argv": " ".join(argv), "world_size": world, **(meta or {}), "ranks": ranks}
    if written is not None:
        doc["written"] = written
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        f.write(_compact(doc) + "\n")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--megatron-lm", help=f"Megatron-LM source tree at core_r0.12.0 (default ${M.MLM_ENV})")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--all", action="store_true", help=f"every built-in case into {OUT_DIR}")
    g.add_argument("--case", help="one built-in case (comma-separated list allowed)")
    g.add_argument("--list", action="store_true", help="list the built-in cases")
    g.add_argument("--hf-config", help="a Hugging Face config.json (llama, qwen2, qwen3, qwen3_moe, deepseek_v3)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--etp", type=int)
    ap.add_argument("--first-stage-layers", type=int, help="--decoder-first-pipeline-num-layers")
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--mtp-layers", type=int)
    ap.add_argument("--moe-grouped-gemm", action="store_true",
                    help="local spec + grouped GEMM = legacy GroupedMLP (built with a stand-in; no forward)")
    ap.add_argument("--te-spec", action="store_true",
                    help="instead: dump the transformer_engine (and local) layer specs Megatron chooses, with "
                         "name-only TE placeholders, to te_spec_<case>.json (one rank, TP=PP=EP=1)")
    ap.add_argument("--write-checkpoints", action="store_true",
                    help="also run Megatron's save_checkpoint (torch and torch_dist) and describe the files")
    ap.add_argument("--out", help="output JSON (default tests/data/megatron_truth/<case>.json)")
    a = ap.parse_args(argv)
    if a.list:
        for n, (cfg, ov, lay, opts) in CASES.items():
            print(n, os.path.relpath(cfg, FIX), ov or "", lay, opts or "")
        return 0
    M.add_megatron_lm(a.megatron_lm)
    if a.hf_config:
        layout = dict(tp=a.tp, pp=a.pp, ep=a.ep, etp=a.etp, first_stage_layers=a.first_stage_layers)
        opts = dict(num_layers=a.num_layers, mtp_layers=a.mtp_layers, grouped_gemm=a.moe_grouped_gemm)
        todo = {os.path.splitext(os.path.basename(a.out or "custom.json"))[0]: (a.hf_config, {}, layout, opts)}
    else:
        names = list(CASES) if a.all else a.case.split(",")
        todo = {n: CASES[n] for n in names}
    for name, (cfg, ov, layout, opts) in todo.items():
        if a.te_spec:
            layout = dict(tp=1, pp=1)
        argv_m, world = case_argv(cfg, ov, layout, opts)
        out = a.out if (a.out and len(todo) == 1) else os.path.join(OUT_DIR, ("te_spec_" if a.te_spec else "") + f"{name}.json")
        meta = {"hf_config": os.path.relpath(cfg, FIX) if cfg.startswith(FIX) else cfg, "config_overrides": ov,
                "layout": layout}
        print(f"[{name}] world {world}: {' '.join(argv_m)}", flush=True)
        if a.te_spec:
            run_te_spec(name, argv_m, out, meta, bool(opts.get("grouped_gemm")))
            print(f"[{name}] -> {os.path.relpath(out)}", flush=True)
            continue
        run(name, argv_m, world, out, a.write_checkpoints, bool(opts.get("grouped_gemm")), meta)
        print(f"[{name}] -> {os.path.relpath(out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
