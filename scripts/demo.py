#!/usr/bin/env python3
"""The README's main job: convert a MindSpore checkpoint to Megatron-LM TP2 x PP2.

Without arguments it first generates the demo checkpoint (a small GPT with GQA,
SwiGLU and an untied output layer, in MindSpore format with mindformers' default
layouts) into demo/ckpt, then converts it into demo/megatron. Give a checkpoint
path (and optionally an output path and extra streamconv flags) to convert your own.

The demo deletes nothing. An output path you give goes through exactly the
save-directory rules of ``streamconv convert``: a non-empty directory that is
not a streamconv output is refused untouched, and so is a path inside the
input's folder. Only the demo's own output directory (demo/megatron, used when
no output path is given) is written with ``--overwrite``, so that rerunning the
demo works; ``--overwrite`` replaces only streamconv's own checkpoint files and
keeps anything else in that directory.

    python scripts/demo.py
    python scripts/demo.py /data/qwen_ms_ckpt /data/qwen_megatron --num-attention-heads 32 --num-query-groups 8
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))


def main(argv: list) -> int:
    from streamconv.cli import main as streamconv

    default_save = os.path.join(ROOT, "demo", "megatron")
    if argv and not argv[0].startswith("--"):
        load, rest = argv[0], argv[1:]
        save = rest.pop(0) if rest and not rest[0].startswith("--") else default_save
        extra = rest
    else:
        import synth

        load = os.path.join(ROOT, "demo", "ckpt")
        save = default_save
        spec = synth.PRESETS["demo"]
        if not os.path.exists(os.path.join(load, "model.safetensors")):
            synth.write_checkpoint(load, spec)
            print(f"generated the demo checkpoint in {load} ({spec.layers} layers, hidden {spec.hidden}, "
                  f"{spec.heads} heads / {spec.groups} query groups, SwiGLU, untied output)")
        extra = ["--num-attention-heads", str(spec.heads), "--num-query-groups", str(spec.groups)] + argv
    if _same_path(save, default_save) and not {"--overwrite", "--resume"} & set(extra):
        # the demo's own output: rerunning must work; --overwrite keeps files streamconv did not write
        extra = ["--overwrite", *extra]
    cmd = ["convert", "--model-type", "GPT", "--loader", "core_mf", "--saver", "core",
           "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
           "--load-dir", load, "--save-dir", save,
           "--loader-transformer-impl", "local", "--saver-transformer-impl", "local",
           "--position-embedding-type", "rope", "--seq-length", "2048", *extra]
    print("streamconv " + " ".join(cmd), flush=True)
    rc = streamconv(cmd)
    if rc == 0:
        print(f"Megatron-LM checkpoint written to {save}:")
        for d, _, files in sorted(os.walk(save)):
            for f in sorted(files):
                p = os.path.join(d, f)
                print(f"  {os.path.relpath(p, ROOT)}  ({os.path.getsize(p)} bytes)")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
