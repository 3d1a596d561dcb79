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
# engine -> {interop, checkpoint, data, model} -> {parallel, kernels} -> {distributed, files, config, errors}.
BASE = {"errors", "files", "distributed", "local_ranks", "config", "memory", "dtypes"}
LOWER = BASE | {"parallel", "kernels"}
MIDDLE = LOWER | {"model", "data"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "memory": set(),
    "dtypes": {"errors"},
    "files": {"errors"},
    "distributed": {"errors"},
    "local_ranks": set(),  # torch-free: a rank process is tied to its parent before it imports torch
    "config": {"errors", "files", "dtypes"},
    "kernels": {"errors", "dtypes"},
    "parallel": BASE,
    "model": LOWER,
    "data": BASE,
    "checkpoint": MIDDLE,
    "interop": MIDDLE | {"checkpoint"},
    "engine": MIDDLE | {"checkpoint", "interop"},
    "evaluate": MIDDLE | {"checkpoint", "interop", "engine"},
    "generate": MIDDLE | {"checkpoint", "interop", "engine"},
    # The harness's model over checkpoints (its request handling is engine.downstream, which training runs too;
    # loading a checkpoint at TP N is generate's).
    "eval_harness": MIDDLE | {"checkpoint", "interop", "engine", "generate"},
    "bench": MIDDLE | {"checkpoint", "interop", "engine", "evaluate", "generate", "eval_harness"},
    "commands": MIDDLE | {"checkpoint", "interop", "engine", "evaluate", "generate", "eval_harness", "bench",
                          "commands", "cli"},
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
                  "megalite.checkpoint", "megalite.cli"]
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
