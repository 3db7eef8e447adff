#!/usr/bin/env python3
"""Measure streamconv against a plain copy of the same bytes, in one run.

For each synthetic MindSpore checkpoint (generated once with scripts/synth.py,
never held in memory, cached between runs) this measures:

* ``cp -r INPUT`` (and the ``sync`` after it): the disk-speed baseline;
* ``streamconv convert`` under several budgets and TP/PP settings;
* the same 70B-shaped model as per-rank training output (TP 8 rank files and a
  JSON strategy, written by scripts/synth_dist.py), converted with no merge
  step, against ``cp -r`` of its rank files;
* the DeepSeek-V3-shaped model under Hugging Face names in FP8 with block
  scales, as deepseek-ai releases it (scripts/synth_hf_fp8.py), dequantized
  while it is read;

reporting wall time, peak resident memory of the whole process tree as the
kernel counts it (``wait4`` ru_maxrss, i.e. VmHWM, file-backed mapped pages
included), bytes read and written, the ratio to ``cp -r``, and the predicted
peak from ``streamconv plan``. Every conversion is then checked with
``streamconv verify`` (``--no-verify`` to skip). Before every measurement the page
cache is dropped (when allowed) and the disk is left to settle after ``sync``. Results go to stdout as a
Markdown table and to ``WORK/results.json``.

    python scripts/benchmark.py --work /data/bench            # the full set (about 60 GB of disk)
    python scripts/benchmark.py --work /tmp/b --quick         # small shapes, a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import synth  # noqa: E402
import synth_dist  # noqa: E402
import synth_hf_fp8  # noqa: E402

GIB = 2**30


@dataclass
class DistInput:
    """``spec`` cut into ``tp`` per-rank slices (training output layout) by scripts/synth_dist.py."""

    spec: synth.ModelSpec
    tp: int = 8


@dataclass
class HfFp8Input:
    """``spec`` (MLA + MoE) under Hugging Face names, FP8 with block scales as DeepSeek releases it
    (scripts/synth_hf_fp8.py)."""

    spec: synth.ModelSpec


def inputs(quick: bool) -> dict:
    if quick:
        small = synth.ModelSpec(layers=2, hidden=2048, ffn=7168, heads=16, groups=2, vocab=32064, files=2)
        out = {
            "l70-shapes-small": small,
            "l70-shapes-small-tp8ranks": DistInput(small, 8),
            "mid-4L": synth.ModelSpec(layers=4, hidden=1024, ffn=2816, heads=8, groups=4, vocab=8000),
            "mid-16L": synth.ModelSpec(layers=16, hidden=1024, ffn=2816, heads=8, groups=4, vocab=8000),
            "deepseek-small": replace(synth.PRESETS["deepseek_v3"], hidden=1024, heads=16, groups=16, vocab=8000,
                                      ffn=2816, q_lora=256, kv_lora=128, qk_nope=32, qk_rope=16, v_head=32,
                                      moe_ffn=256, shared_ffn=256, experts=16),
        }
        out["deepseek-small-hf-fp8"] = HfFp8Input(out["deepseek-small"])
        return out
    # Llama-3-70B layer shapes; 2 layers + embeddings + output = 15.3 GB of fp32
    l70 = synth.ModelSpec(layers=2, hidden=8192, ffn=28672, heads=64, groups=8, vocab=128256, files=4)
    return {
        "llama70b-2L": l70,
        # the same model as a TP-8 training run leaves it: 8 rank files + strategy/, no merged copy
        "llama70b-2L-tp8ranks": DistInput(l70, 8),
        "mid-4L": synth.ModelSpec(layers=4, hidden=4096, ffn=11008, heads=32, groups=8, vocab=32000, files=2),
        "mid-16L": synth.ModelSpec(layers=16, hidden=4096, ffn=11008, heads=32, groups=8, vocab=32000, files=4),
        # DeepSeek-V3 shapes (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, moe_ffn 2048, shared experts,
        # fp32 expert bias; BF16): 1 dense + 2 MoE layers with 16 experts instead of 61 layers x 256 = 8.6 GB
        "deepseek-3L": replace(synth.PRESETS["deepseek_v3"], layers=3, experts=16, files=4),
        # the same shapes under HF names, FP8 as released (the 671B release is 1/2 the BF16 size, like this)
        "deepseek-3L-hf-fp8": HfFp8Input(replace(synth.PRESETS["deepseek_v3"], layers=3, experts=16, files=4)),
    }


#: a run label starting with this is launched under torchrun with two workers on this host
WORKERS = "2 workers"
#: values the DeepSeek-shaped weights cannot tell (its config.json would say them)
MOE_ROUTING = ["--moe-router-topk", "8", "--moe-router-score-function", "sigmoid",
               "--moe-router-topk-scaling-factor", "2.5"]


def runs(quick: bool) -> list:
    big = "l70-shapes-small" if quick else "llama70b-2L"
    heads = 16 if quick else 64
    mid_heads = 8 if quick else 32
    ds, ds_heads = ("deepseek-small", 16) if quick else ("deepseek-3L", 128)
    tp8pp2 = ["--target-tensor-parallel-size", "8" if not quick else "2", "--target-pipeline-parallel-size", "2"]
    moe = ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "8", "--max-memory", "2GiB",
           *MOE_ROUTING]
    return [
        (big, "TP8 PP2, --max-memory 2GiB", [*tp8pp2, "--max-memory", "2GiB"], heads),
        (big, f"{WORKERS} (torchrun --standalone), TP8 PP2, --max-memory 2GiB each",
         [*tp8pp2, "--max-memory", "2GiB"], heads),
        (big, "TP1 PP1, --max-memory 2GiB", ["--max-memory", "2GiB"], heads),
        (big, "TP1 PP1, --max-memory 1GiB", ["--max-memory", "1GiB"], heads),
        (big, "TP8 PP2, default budget", tp8pp2, heads),
        (big, "torch_dist TP8 PP2, --max-memory 2GiB", ["--ckpt-format", "torch_dist", *tp8pp2, "--max-memory", "2GiB"],
         heads),
        (big + "-tp8ranks", "per-rank TP8 input, TP8 PP2, --max-memory 2GiB", [*tp8pp2, "--max-memory", "2GiB"], heads),
        (ds, "MoE/MLA TP2 EP8, --max-memory 2GiB", moe, ds_heads),
        (ds, "MoE/MLA torch_dist TP2 EP8, --max-memory 2GiB", ["--ckpt-format", "torch_dist", *moe], ds_heads),
        (ds + "-hf-fp8", "HF FP8 (block scales) torch_dist TP2 EP8, --max-memory 2GiB",
         ["--ckpt-format", "torch_dist", "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "8",
          "--max-memory", "2GiB"], ds_heads),
        ("mid-4L", "TP2 PP1, default budget", ["--target-tensor-parallel-size", "2"], mid_heads),
        ("mid-16L", "TP2 PP1, default budget", ["--target-tensor-parallel-size", "2"], mid_heads),
    ]


def ensure_input(work: str, name: str, spec) -> str:
    """The input directory of ``spec`` (a ModelSpec, or a DistInput for per-rank output), generated once."""
    d = os.path.join(work, "inputs", name)
    if isinstance(spec, DistInput):
        stamp, want = os.path.join(d, synth_dist.SPEC_FILE), {"spec": asdict(spec.spec), "tp": spec.tp}
    elif isinstance(spec, HfFp8Input):
        stamp, want = os.path.join(d, "synth_spec.json"), {"hf_fp8": asdict(spec.spec)}
    else:
        stamp, want = os.path.join(d, "synth_spec.json"), asdict(spec)
    if os.path.exists(stamp) and json.load(open(stamp)) == json.loads(json.dumps(want)):
        return d
    if os.path.exists(d):
        shutil.rmtree(d)
    t = time.time()
    if isinstance(spec, DistInput):
        synth_dist.write_distributed(d, spec.spec, spec.tp, quiet=False)
    elif isinstance(spec, HfFp8Input):
        synth_hf_fp8.write(d, spec.spec, files=spec.spec.files, quiet=False)
    else:
        synth.write_checkpoint(d, spec, quiet=False)
    print(f"# generated {name} in {time.time() - t:.0f} s", file=sys.stderr)
    return d


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def timed(cmd: list, env=None) -> dict:
    """Run ``cmd``; wall time and the kernel's peak RSS of the process tree (wait4)."""
    t = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t
    out, err = p.stdout.read().decode(), p.stderr.read().decode()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{out}\n{err}")
    return {"wall": wall, "peak_rss": ru.ru_maxrss * 1024, "stdout": out, "stderr": err}


def _disk_writes() -> int:
    total = 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 9 and not parts[2].startswith(("loop", "ram")):
                total += int(parts[9])
    return total


def settle(quiet_seconds: float = 2.0, limit: float = 90.0) -> None:
    """Sync, then wait until the disks have written nothing for a while.

    Deleting a 15 GB copy on a filesystem mounted with ``discard`` keeps the disk busy
    for many seconds; without this, whichever run comes next pays for it.
    """
    subprocess.run(["sync"], check=True)
    t0 = time.monotonic()
    last, still = _disk_writes(), time.monotonic()
    while time.monotonic() - t0 < limit:
        time.sleep(0.5)
        now = _disk_writes()
        if now != last:
            last, still = now, time.monotonic()
        elif time.monotonic() - still >= quiet_seconds:
            return


def warm(d: str) -> str:
    """Same cache state for every measurement: drop caches if allowed, else read the input once."""
    settle()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "cold (caches dropped)"
    except OSError:
        for r, _, fs in os.walk(d):
            for fn in fs:
                with open(os.path.join(r, fn), "rb") as f:
                    while f.read(64 * 2**20):
                        pass
        return "warm (input read once before)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join(os.path.dirname(HERE), "bench"))
    ap.add_argument("--quick", action="store_true", help="small shapes (CI-sized smoke run)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--only", help="run only rows whose label contains this text")
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    py = sys.executable
    specs = inputs(a.quick)
    results = {"machine": {"cpus": os.cpu_count(), "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
                           "kernel": platform.release(), "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    cp_cache: dict = {}
    rows = []
    for name, label, flags, heads in runs(a.quick):
        if a.only and a.only not in f"{name} {label}":
            continue
        src = ensure_input(a.work, name, specs[name])
        size = dir_bytes(src)
        if name not in cp_cache:
            dst = os.path.join(a.work, "cp-copy")
            shutil.rmtree(dst, ignore_errors=True)
            state = warm(src)
            r = timed(["cp", "-r", src, dst])
            t = time.monotonic()
            subprocess.run(["sync"], check=True)
            cp_cache[name] = {"wall": r["wall"], "sync": time.monotonic() - t, "cache": state}
            shutil.rmtree(dst)  # warm() waits for the disk to settle before the next measurement
            print(f"# cp -r {name} ({size / GIB:.2f} GiB, {state}): {r['wall']:.1f} s + sync "
                  f"{cp_cache[name]['sync']:.1f} s", file=sys.stderr)
        out = os.path.join(a.work, "out")
        shutil.rmtree(out, ignore_errors=True)
        base = ["--load-dir", src, "--save-dir", out, "--num-attention-heads", str(heads),
                "--saver-transformer-impl", "local"] + flags
        plan = timed([py, "-m", "streamconv", "plan", *base])["stdout"]
        predicted = next((ln.split("predicted peak")[1].strip() for ln in plan.splitlines() if "predicted peak" in ln), "?")
        state = warm(src)
        summary_path = os.path.join(a.work, "summary.json")
        launch = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] \
            if label.startswith(WORKERS) else [py]
        r = timed([*launch, "-m", "streamconv", "convert", *base, "--quiet", "--json-summary", summary_path])
        s = json.load(open(summary_path))
        workers = s.get("per_worker") or []
        check = "skipped"
        if not a.no_verify:
            budget = flags[flags.index("--max-memory"):][:2] if "--max-memory" in flags else []
            v = timed([py, "-m", "streamconv", "verify", "--load-dir", src, "--save-dir", out, *budget])
            check = "verify OK" if "OK" in v["stdout"] else "VERIFY FAILED"
        cp = cp_cache[name]
        row = {
            "input": name, "input_gib": round(size / GIB, 2), "run": label,
            "wall_s": round(r["wall"], 1), "cp_s": round(cp["wall"], 1), "cp_sync_s": round(cp["wall"] + cp["sync"], 1),
            "ratio_to_cp": round(r["wall"] / cp["wall"], 2),
            "peak_rss_mib": round(r["peak_rss"] / 2**20), "budget_mib": round(s["budget_bytes"] / 2**20),
            "predicted_mib": round(s["predicted_peak_bytes"] / 2**20),
            "read_gib": round(s["read_bytes"] / GIB, 2), "written_gib": round(s["output_bytes"] / GIB, 2),
            "cache": state, "check": check,
            "worker_peaks_mib": [round(w["peak_rss_bytes"] / 2**20) for w in workers],
        }
        rows.append(row)
        results["rows"].append(row)
        if workers:
            row["peak_rss_mib"] = max(row["worker_peaks_mib"])  # per worker: --max-memory is per worker
        print(f"# {name} {label}: {row['wall_s']} s (cp {row['cp_s']} s), peak {row['peak_rss_mib']} MiB "
              f"/ budget {row['budget_mib']} MiB (predicted {predicted}), {check}", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
    with open(os.path.join(a.work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    m = results["machine"]
    print(f"Machine: {m['cpus']} CPUs, {m['ram_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}; {results['date']}\n")
    print("| input | GiB | run | wall s | cp -r s (+sync) | wall / cp | peak RSS MiB | budget MiB | predicted MiB | read GiB | written GiB | check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['input']} | {x['input_gib']} | {x['run']} | {x['wall_s']} | {x['cp_s']} ({x['cp_sync_s']}) | "
              f"{x['ratio_to_cp']} | {x['peak_rss_mib']} | {x['budget_mib']} | {x['predicted_mib']} | {x['read_gib']} | "
              f"{x['written_gib']} | {x['check']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
