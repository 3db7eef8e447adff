"""The package tree shows the data flow, and no module imports a stage above its own.

Stages, lowest first: core (shared vocabulary) -> sources (input bytes and
names) -> model (what the model is) -> megatron (what Megatron expects) ->
formats (output containers) -> engine (plan and stream) -> run (save directory,
convert, verify) -> cli. A module may import from its own stage or a lower
one. The check reads the source with ``ast``; it does not import anything.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.join(os.path.dirname(HERE), "streamconv")
STAGES = ["core", "sources", "model", "megatron", "formats", "engine", "run", "cli"]


def _stage(module: str) -> int:
    """Stage index of a dotted module name inside streamconv (the package root counts as cli)."""
    parts = module.split(".")
    assert parts[0] == "streamconv", module
    if len(parts) == 1 or parts[1] not in STAGES:  # the package itself, cli, __main__, __version__
        return STAGES.index("cli")
    return STAGES.index(parts[1])


def _modules():
    for d, _, names in os.walk(PKG):
        for n in names:
            if n.endswith(".py"):
                path = os.path.join(d, n)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield (rel[: -len(".__init__")] if rel.endswith(".__init__") else rel), path


def _imports(module: str, path: str, is_pkg: bool):
    tree = ast.parse(open(path, encoding="utf-8").read())
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                name = ".".join(target)
                if node.module is None:  # from . import x, y
                    for a in node.names:
                        yield node.lineno, f"{name}.{a.name}"
                    continue
                yield node.lineno, name
            elif node.module and node.module.startswith("streamconv"):
                yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("streamconv"):
                    yield node.lineno, a.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("streamconv."):
            # registries name modules as strings (formats.FORMATS, the package's lazy names)
            yield node.lineno, node.value


def test_no_module_imports_a_stage_above_its_own():
    bad = []
    for module, path in _modules():
        own = _stage(module)
        for line, target in _imports(module, path, path.endswith("__init__.py")):
            if _stage(target) > own:
                bad.append(f"{module}:{line} imports {target}")
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


def test_every_stage_is_a_folder_with_a_docstring():
    for stage in STAGES[:-1]:
        init = os.path.join(PKG, stage, "__init__.py")
        assert os.path.isfile(init), stage
        assert ast.get_docstring(ast.parse(open(init).read())), f"{stage}/__init__.py says nothing"


def test_every_module_has_a_docstring():
    missing = [m for m, p in _modules() if not ast.get_docstring(ast.parse(open(p).read()))]
    assert not missing, missing


@pytest.mark.parametrize("module,most", [("streamconv.cli", 8)])
def test_importing_the_cli_stays_light(module, most):
    """A refusal or --help must not pay for the converter: the CLI module loads only the core."""
    code = (f"import sys; import {module}; "
            "print(sorted(m for m in sys.modules if m.startswith('streamconv')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)  # noqa: S307 - our own printed list
    assert "torch" not in subprocess.run([sys.executable, "-c", f"import sys, {module}; print(list(sys.modules))"],
                                         capture_output=True, text=True).stdout.split("'")
    assert len(loaded) <= most, loaded
