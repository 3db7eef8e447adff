"""What the README tells a user to run or read must exist and work.

* Every FORMAT.md section the README cites is in the repository (docs/FORMAT.md),
  linked by that path, and the section number exists there.
* The README's snippet for loading a rank file with ``torch.load`` runs as shown
  on a real output of streamconv with the installed torch (2.6+ refuses the
  ``argparse.Namespace`` in ``args`` by default, which is why the snippet exists:
  that refusal is checked too, so the test notices if it ever stops being needed).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import synth
from helpers import REPO, run_cli

README = open(os.path.join(REPO, "README.md")).read()
FORMAT = os.path.join(REPO, "docs", "FORMAT.md")


def test_format_md_references_point_into_the_repository():
    mentions = [m.start() for m in re.finditer(r"FORMAT\.md", README)]
    assert mentions, "the README cites FORMAT.md"
    for at in mentions:
        assert README[at - 5:at] == "docs/", f"a FORMAT.md reference not to docs/FORMAT.md: {README[at - 40:at + 20]!r}"
    assert os.path.isfile(FORMAT)
    headings = set(re.findall(r"^## (\d+)\. ", open(FORMAT).read(), re.M))
    sections = re.findall(r"FORMAT\.md\)?\s+§(\d+)", README)
    assert sections
    for section in sections:
        assert section in headings, f"§{section} is not a section of docs/FORMAT.md"
    # every Markdown link to it resolves from the README's directory
    for target in re.findall(r"\]\(([^)]*FORMAT\.md)\)", README):
        assert os.path.isfile(os.path.join(REPO, target)), target


@pytest.fixture(scope="module")
def rank_file_dir(tmp_path_factory):
    """A real streamconv output at ``out/`` (the path the README's snippet uses), TP1 x PP2."""
    root = tmp_path_factory.mktemp("readme")
    synth.write_checkpoint(str(root / "ckpt"), synth.ModelSpec(layers=2, hidden=64, ffn=96, heads=4, groups=2, vocab=256))
    run_cli(["convert", "--load-dir", str(root / "ckpt"), "--save-dir", str(root / "out"), "--num-attention-heads", "4",
             "--target-pipeline-parallel-size", "2", "--quiet"])
    assert os.path.isfile(root / "out" / "iter_0000001" / "mp_rank_00_000" / "model_optim_rng.pt")
    return root


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_torch_load_snippet_runs_as_shown(rank_file_dir):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "torch.load(" in b]
    assert len(blocks) == 1, "one torch.load snippet in the README"
    snippet = blocks[0]
    assert "add_safe_globals([argparse.Namespace])" in snippet and "weights_only=True" in snippet
    assert snippet.index("add_safe_globals") < snippet.index("torch.load(")
    check = snippet + (
        "\nassert type(sd['args']) is argparse.Namespace and sd['checkpoint_version'] == 3.0"
        "\nassert sd['model']['embedding.word_embeddings.weight'].dtype == torch.bfloat16"
        "\nprint('loaded', len(sd['model']))\n")
    p = _python(check, rank_file_dir)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("loaded ")


def test_plain_torch_load_needs_the_snippet(rank_file_dir):
    """Without the safe-globals line torch refuses the file: the README must not promise plain torch.load."""
    p = _python("import torch; torch.load('out/iter_0000001/mp_rank_00_000/model_optim_rng.pt')", rank_file_dir)
    assert p.returncode != 0 and "argparse.Namespace" in p.stderr, (p.returncode, p.stderr[-500:])
    assert "plain `torch.load`" not in README
