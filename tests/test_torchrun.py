"""Several workers under torchrun convert one checkpoint: output identical to one process, faults survived.

torchrun ships with torch (no new dependency). Each scenario converts the same
synthetic checkpoint as a single process does (the reference) and compares
every output byte. Workers are real torchrun workers (gloo on CPU): one host
with two processes, two "nodes" on localhost sharing one rendezvous endpoint, a
worker SIGKILLed mid-run followed by torchrun's restart or by ``--resume``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

import synth
from helpers import file_bytes, run_cli, tree

SPEC = synth.ModelSpec(layers=8, hidden=512, ffn=1024, heads=8, groups=4, vocab=4000, files=3)
FLAGS = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "4", "--num-attention-heads", "8",
         "--saver-transformer-impl", "local", "--max-memory", "400MB"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    synth.write_checkpoint(str(d), SPEC)
    return str(d)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_cli(["convert", "--load-dir", source, "--save-dir", out, *FLAGS, "--quiet"])
    return out


def _torchrun(launch: list, source: str, save: str, extra=(), **kw) -> subprocess.Popen:
    cmd = [*TORCHRUN, *launch, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir", save, *FLAGS,
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(save),
                            **kw)


def _finish(p: subprocess.Popen, timeout=300) -> tuple:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def test_two_processes_on_one_host_write_what_one_process_writes(source, reference, tmp_path):
    save = str(tmp_path / "out")
    rc, out, err = _finish(_torchrun(["--standalone", "--nproc-per-node", "2"], source, save,
                                     ["--json-summary", str(tmp_path / "s.json")]))
    assert rc == 0, err[-2000:]
    assert file_bytes(save) == file_bytes(reference)
    s = json.load(open(tmp_path / "s.json"))
    assert s["workers"] == 2 and len(s["per_worker"]) == 2
    assert sorted(w["files"] for w in s["per_worker"]) == [4, 4]  # 8 equal files dealt by bytes
    assert all(w["peak_rss_bytes"] > 0 for w in s["per_worker"])
    assert "worker 1 on" in out


def test_two_nodes_on_localhost_share_one_rendezvous(source, reference, tmp_path):
    save = str(tmp_path / "out")
    port = _free_port()
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{port}"]
    a = _torchrun(launch, source, save, ["--quiet"])
    b = _torchrun(launch, source, save, ["--quiet"])
    ra, rb = _finish(a), _finish(b)
    assert ra[0] == 0 and rb[0] == 0, (ra[2][-2000:], rb[2][-2000:])
    assert file_bytes(save) == file_bytes(reference)


def _done_count(save: str) -> int:
    d = os.path.join(save, ".streamconv", "done")
    return len(os.listdir(d)) if os.path.isdir(d) else 0


def _kill_worker(launcher: subprocess.Popen, save: str, rank: str, timeout=120) -> bool:
    """SIGKILL the worker process whose RANK is ``rank`` once the run has committed a file."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if launcher.poll() is not None:
            return False
        if _done_count(save) >= 1:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == rank and "streamconv" in " ".join(child.cmdline()):
                        child.send_signal(signal.SIGKILL)
                        return True
                except psutil.Error:
                    continue
        time.sleep(0.005)
    raise AssertionError("no file was committed in time")


def test_a_killed_worker_is_restarted_by_torchrun_and_the_output_is_identical(source, reference, tmp_path):
    save = str(tmp_path / "out")
    p = _torchrun(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"], source, save,
                  ["--json-summary", str(tmp_path / "s.json")])
    assert _kill_worker(p, save, "1"), "the conversion finished before a worker could be killed"
    rc, out, err = _finish(p)
    assert rc == 0, err[-3000:]
    assert file_bytes(save) == file_bytes(reference)
    s = json.load(open(tmp_path / "s.json"))
    assert s["files_kept"], "the restart should keep the files finished before the kill"
    assert len(s["files_kept"]) + len(s["files_written"]) == 8


def test_a_killed_run_is_finished_by_resume(source, reference, tmp_path):
    save = str(tmp_path / "out")
    p = _torchrun(["--standalone", "--nproc-per-node", "2"], source, save, ["--quiet"])
    assert _kill_worker(p, save, "0"), "the conversion finished before a worker could be killed"
    rc, _, _ = _finish(p)
    assert rc != 0
    assert not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))
    # the same command in one process (or again under torchrun) with --resume finishes it
    run_cli(["convert", "--load-dir", source, "--save-dir", save, *FLAGS, "--resume", "--quiet"])
    assert file_bytes(save) == file_bytes(reference)


def test_a_worker_that_cannot_reach_the_rendezvous_ends_with_one_line(source, tmp_path):
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               STREAMCONV_RDZV_TIMEOUT="3")
    p = subprocess.run([sys.executable, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir",
                        str(tmp_path / "out"), *FLAGS], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("streamconv: error: worker 1 of 2 could not reach the rendezvous")
    assert not os.path.exists(tmp_path / "out")


def test_workers_that_disagree_on_the_input_refuse(source, tmp_path):
    """Node-local inputs that differ (here: another TP on one worker) must not mix into one checkpoint."""
    save = str(tmp_path / "out")
    port = _free_port()
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{port}"]
    a = _torchrun(launch, source, save, ["--quiet"])
    other = [*TORCHRUN, *launch, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir", save,
             *[f if f != "4" else "2" for f in FLAGS], "--quiet"]
    b = subprocess.Popen(other, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    ra, rb = _finish(a), _finish(b)
    assert ra[0] != 0 and rb[0] != 0
    assert "do not agree on the plan" in ra[2] + rb[2]
    assert not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))


def _stat_tree(root) -> dict:
    out = {}
    for rel in tree(root):
        st = os.stat(os.path.join(root, rel))
        out[rel] = (open(os.path.join(root, rel), "rb").read(), st.st_mtime_ns, st.st_ino)
    return out


def test_rerun_into_a_finished_output_is_nothing_to_do_for_every_worker(source, reference, tmp_path):
    """The coordinator assesses the save directory for the job: a complete identical conversion is left alone."""
    import shutil

    save = str(tmp_path / "out")
    shutil.copytree(reference, save)
    before = _stat_tree(save)
    rc, out, err = _finish(_torchrun(["--standalone", "--nproc-per-node", "2"], source, save,
                                     ["--json-summary", str(tmp_path / "s.json")]))
    assert rc == 0, err[-2000:]
    assert "nothing to do" in out, out
    assert _stat_tree(save) == before  # same bytes, mtimes and inodes: nothing rewritten
    s = json.load(open(tmp_path / "s.json"))
    assert s["nothing_to_do"] and s["files_written"] == [] and s["workers"] == 2


def test_another_conversion_in_the_save_dir_is_refused_by_every_worker(source, reference, tmp_path):
    """The coordinator's refusal (here: another layout, without --overwrite) ends every worker, nothing written."""
    import shutil

    save = str(tmp_path / "out")
    shutil.copytree(reference, save)
    before = _stat_tree(save)
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "streamconv", "convert", "--load-dir", source,
           "--save-dir", save, *[f if f != "4" else "2" for f in FLAGS], "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert p.returncode != 0
    assert "--overwrite" in p.stderr, p.stderr[-2000:]
    assert _stat_tree(save) == before
