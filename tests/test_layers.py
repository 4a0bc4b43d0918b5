"""The layering of fo_rl/: no module imports from a layer above its own (README, "Codebase organization").

Every `import fo_rl...` / `from fo_rl... import ...` counts, at module level or inside a function.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fo_rl"

# Lowest first. A module may import from its own layer or a lower one.
LAYERS = (
    ("common", "hlo_cost"),
    ("parallel",),
    ("model",),
    ("sampler", "data"),
    ("rl",),
    ("config", "checkpoint", "metrics_writer", "plots"),
    ("run", "sft", "dry_run", "paper", "tools", "benchmarks", "bench", "main"),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _layer(module: str) -> int | None:
  """The layer of `fo_rl.<part>...`; the package `fo_rl` itself (its __init__) is not a layer."""
  parts = module.split(".")
  if parts[0] != "fo_rl" or len(parts) < 2:
    return None
  return LAYER[parts[1]]


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT.parent).with_suffix("")
  parts = [p for p in rel.parts if p != "__init__"]
  return ".".join(parts)


def _imports(path: pathlib.Path):
  """(line, imported module) for every fo_rl import in `path`; `from fo_rl import x` yields fo_rl.x."""
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("fo_rl"):
          yield node.lineno, a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "fo_rl":
        for a in node.names:
          yield node.lineno, f"fo_rl.{a.name}"
      elif node.module.startswith("fo_rl."):
        yield node.lineno, node.module


def _files():
  return sorted(p for p in ROOT.rglob("*.py") if "assets" not in p.parts)


def test_every_module_has_a_layer():
  missing = sorted(
      {_module_name(p).split(".")[1] for p in _files() if _module_name(p) != "fo_rl"} - set(LAYER)
  )
  assert not missing, f"add these fo_rl/ entries to a layer in LAYERS (and the README): {missing}"


def test_no_module_imports_from_a_layer_above_it():
  upward = []
  for path in _files():
    me = _module_name(path)
    mine = _layer(me)
    if mine is None:
      continue
    for line, imported in _imports(path):
      theirs = _layer(imported)
      if theirs is not None and theirs > mine:
        upward.append(f"{path.relative_to(ROOT.parent)}:{line} imports {imported}")
  assert not upward, "imports against the layering:\n" + "\n".join(upward)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from fo_rl.run import run\n", ["fo_rl.run"]),
        ("def f():\n  from fo_rl import config\n", ["fo_rl.config"]),
        ("import fo_rl.rl.trainer as t\n", ["fo_rl.rl.trainer"]),
        ("from . import x\nimport numpy\n", []),
    ],
)
def test_imports_are_found_wherever_they_are_written(tmp_path, source, expected):
  path = tmp_path / "m.py"
  path.write_text(source)
  assert [m for _, m in _imports(path)] == expected
