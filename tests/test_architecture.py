"""The package's structure: imports point one way, the model and kernels work without DeepSpeed, and
function-local imports of megalite modules exist only where a command keeps its start-up fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "megalite"

# Each unit (a subpackage or a top-level module of megalite) and the units it may import. Commands ->
# engine -> eval_harness -> generate -> {interop, checkpoint, data, model} -> {parallel, kernels} ->
# {distributed, launch, local_ranks, files, config, errors}.
BASE = {"errors", "files", "distributed", "launch", "local_ranks", "config", "memory", "dtypes"}
LOWER = BASE | {"parallel", "kernels"}
MIDDLE = LOWER | {"model", "data"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "memory": set(),
    "dtypes": {"errors"},
    "files": {"errors"},
    "distributed": {"errors"},
    "launch": {"local_ranks"},  # process start-up from a launcher's environment: training, inference and benchmarks use it
    "local_ranks": {"errors"},  # torch-free (errors is too): a rank process is tied to its parent before torch loads
    "config": {"errors", "files", "dtypes"},
    "kernels": {"errors", "dtypes"},
    "plan": {"errors", "config", "dtypes", "files"},
    "parallel": BASE,
    "model": LOWER,
    "data": BASE,
    "checkpoint": MIDDLE,
    "interop": MIDDLE | {"checkpoint"},
    "generate": MIDDLE | {"checkpoint", "interop"},
    # The lm-evaluation-harness: its request handling runs in training (engine's TaskEvaluator), its model over
    # checkpoints loads through generate, so it sits between them.
    "eval_harness": MIDDLE | {"checkpoint", "interop", "generate"},
    "engine": MIDDLE | {"checkpoint", "interop", "eval_harness", "plan"},
    "evaluate": MIDDLE | {"checkpoint", "interop", "engine"},
    "bench": MIDDLE | {"checkpoint", "interop", "engine", "evaluate", "generate", "eval_harness", "plan"},
    "commands": MIDDLE | {"checkpoint", "interop", "engine", "evaluate", "generate", "eval_harness", "bench",
                          "commands", "cli", "plan"},
    "cli": {"errors", "commands"},
}
# Where a function-local import of a megalite module is allowed: the commands and benchmarks keep
# `megalite --help` and `megalite config check` fast by importing torch/DeepSpeed-heavy modules on use.
LAZY_OK = {"commands", "bench"}


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"


def _megalite_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(imported megalite unit, line, whether inside a function) for every import of megalite in a module."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module + ("." + a.name if child.module == "megalite" else "") for a in child.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "megalite" and len(parts) > 1:
                    found.append((parts[1], child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "configs" not in p.parts and "slurm" not in p.parts)


def test_every_unit_is_listed():
    units = {_unit(p) for p in _modules()} - {"__init__"}
    assert units <= set(ALLOWED), f"units without an import rule: {sorted(units - set(ALLOWED))}"


def test_the_layering_has_no_cycle():
    """The units form layers: following ALLOWED never leads back to where it started (cli and commands are one
    front end: `python -m megalite.commands.rank` runs cli.main, and cli dispatches to the commands)."""
    front = {"cli", "commands"}

    def below(unit: str) -> set[str]:
        return {u for u in ALLOWED[unit] if u != unit and not (unit in front and u in front)}

    for start in ALLOWED:
        seen, todo = set(), list(below(start))
        while todo:
            unit = todo.pop()
            assert unit != start, f"{start} can reach itself through ALLOWED"
            if unit not in seen:
                seen.add(unit)
                todo += below(unit)


def test_imports_point_one_way():
    problems = []
    for path in _modules():
        unit = _unit(path)
        if unit == "__init__":
            continue
        for target, line, _ in _megalite_imports(ast.parse(path.read_text(), str(path))):
            if target != unit and target not in ALLOWED[unit]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} imports {target}")
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_no_function_local_imports_of_megalite_outside_commands():
    problems = []
    for path in _modules():
        unit = _unit(path)
        if unit in LAZY_OK or path.name == "__init__.py":  # a package's lazy exports (PEP 562 __getattr__)
            continue
        for target, line, in_function in _megalite_imports(ast.parse(path.read_text(), str(path))):
            if in_function:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: function-local import of megalite.{target}")
    assert not problems, "\n".join(problems)


def test_the_layering_rule_can_fail(tmp_path):
    """The checker finds an upward import, also inside a function (a positive control)."""
    tree = ast.parse("def f():\n    from megalite.engine import trainer\n")
    assert _megalite_imports(tree) == [("engine", 2, True)]
    assert "engine" not in ALLOWED["model"]


# The packages that must import without DeepSpeed (a login node, an inference box): DeepSpeed is blocked by a
# meta-path finder in a fresh interpreter.
DEEPSPEED_FREE = ["megalite.config", "megalite.kernels", "megalite.parallel", "megalite.model",
                  "megalite.model.pipeline", "megalite.data", "megalite.data.dataset", "megalite.interop.hf",
                  "megalite.checkpoint", "megalite.cli", "megalite.plan"]
_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ImportError("deepspeed is blocked in this test")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("module", DEEPSPEED_FREE)
def test_imports_without_deepspeed(module):
    code = _BLOCK + f"import {module}\nassert 'deepspeed' not in sys.modules\n"
    if module == "megalite.model":
        code += ("from megalite.config import ModelConfig\nfrom megalite.model import build_model\nimport torch\n"
                 "m = build_model(ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2))\n"
                 "assert m(torch.randint(0, 64, (1, 5)), gather_logits=True).shape == (1, 5, 128)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-3000:]


def test_blocking_deepspeed_is_effective():
    """Positive control: the engine needs DeepSpeed, and the block makes its import fail."""
    out = subprocess.run([sys.executable, "-c", _BLOCK + "import megalite.engine.trainer\n"], capture_output=True,
                         text=True, timeout=120, cwd=PACKAGE.parent)
    assert out.returncode != 0 and "deepspeed is blocked" in out.stderr


def _heavy_imports(tree: ast.AST) -> list[tuple[str, int]]:
    """(module, line) of every import of torch, DeepSpeed or Triton in a module, and of numpy outside a function."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = [a.name for a in child.names] if isinstance(child, ast.Import) else (
                [child.module] if isinstance(child, ast.ImportFrom) and child.module else [])
            for name in names:
                top = name.split(".")[0]
                if top in ("torch", "deepspeed", "triton") or (top == "numpy" and not in_function):
                    found.append((name, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


def test_the_planner_imports_no_torch():
    """megalite.plan is pure arithmetic (a login node plans without torch): no module of it imports torch, DeepSpeed
    or Triton anywhere (the engine asks torch which GPU a machine has) nor numpy at import time, and importing it in
    a fresh interpreter loads none of them. The checker finds a function-local torch import (a positive control)."""
    assert _heavy_imports(ast.parse("import numpy\ndef f():\n    import numpy\n    from torch import cuda\n")) == [
        ("numpy", 1), ("torch", 4)]
    problems = [f"{path.relative_to(PACKAGE.parent)}:{line}: imports {name}"
                for path in sorted((PACKAGE / "plan").rglob("*.py"))
                for name, line in _heavy_imports(ast.parse(path.read_text(), str(path)))]
    assert not problems, "\n".join(problems)
    code = ("import sys\nimport megalite.plan\n"
            "loaded = [m for m in ('torch', 'deepspeed', 'triton', 'numpy') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-3000:]


# ----------------------------------------------------------------------------- what keeps issue 23's rules true

MAX_MODULE_LINES = 700


def _classes_named(name: str) -> list[str]:
    return [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}" for path in _modules()
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.ClassDef) and node.name == name]


def test_one_layout_class():
    """The run's layout is one value (megalite.config.Layout): every axis is added once."""
    assert _classes_named("Layout") == ["megalite/config/layout.py:" + str(next(
        node.lineno for node in ast.walk(ast.parse((PACKAGE / "config" / "layout.py").read_text()))
        if isinstance(node, ast.ClassDef) and node.name == "Layout"))]


def _manifest_reads(tree: ast.AST) -> list[int]:
    """Lines that open or read a file whose path mentions the checkpoint manifest's name (`MANIFEST`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("open", "read_text", "read_bytes", "load", "loads"):
                inside = node.args + ([fn.value] if isinstance(fn, ast.Attribute) else [])
                if any(isinstance(n, ast.Name) and n.id == "MANIFEST" for a in inside for n in ast.walk(a)):
                    found.append(node.lineno)
    return sorted(set(found))


def test_manifests_are_parsed_in_one_place():
    """Only megalite.checkpoint.manifest (read_manifest) opens a checkpoint's manifest.json; the checker finds a read
    (a positive control)."""
    assert _manifest_reads(ast.parse("with open(os.path.join(p, MANIFEST)) as f: json.load(f)\n"
                                     "(Path(p) / MANIFEST).read_text()\n")) == [1, 2]
    owner = PACKAGE / "checkpoint" / "manifest.py"
    problems = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in _modules() if path != owner
                for line in _manifest_reads(ast.parse(path.read_text(), str(path)))]
    assert not problems, "manifest.json read outside megalite/checkpoint/manifest.py:\n" + "\n".join(problems)


def test_no_module_over_700_lines():
    """A module that outgrows 700 lines holds more than one concern: split it."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long
