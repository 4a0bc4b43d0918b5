"""The paper suites' configs: the helpers `configs/paper/*.py` build their variants with, and the
suite loader. Kept small and import-light (the recipes import only this module).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any, Mapping, Sequence

from fo_rl.common import UserError

REPO = Path(__file__).resolve().parents[2]
PAPER_CONFIGS = REPO / "configs" / "paper"
SUITES = ("onpolicy", "offpolicy", "coldstart")


def _walk(c, field: str):
  *parents, leaf = field.split(".")
  for p in parents:
    c = c[p]
  return c, leaf


def get_field(c, field: str, default=None):
  try:
    node, leaf = _walk(c, field)
    return node[leaf]
  except (KeyError, AttributeError, TypeError):
    return default


def set_field(c, field: str, value) -> None:
  node, leaf = _walk(c, field)
  if leaf not in node:
    raise KeyError(f"{field}: no such config field")
  node[leaf] = value


def parse_value(text: str, like):
  """`text` as the type of the existing value `like` (bool / int / float / str / sequence)."""
  if isinstance(like, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"not a boolean: {text!r}")
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  if isinstance(like, str):
    return text
  return ast.literal_eval(text)


def parse_variant_arg(arg: str, variants: Sequence[str]) -> tuple[str, bool]:
  """'<variant>' | '<variant>:tiny' | 'tiny' | '' -> (variant, tiny); '' and 'tiny' name the first."""
  parts = [p for p in (arg or "").split(":") if p]
  tiny = "tiny" in parts
  names = [p for p in parts if p != "tiny"]
  if len(names) > 1 or parts.count("tiny") > 1:
    raise UserError(f"config arg {arg!r}: expected '<variant>[:tiny]'")
  variant = names[0] if names else variants[0]
  if variant not in variants:
    raise UserError(f"unknown variant {variant!r}; known: {', '.join(variants)}")
  return variant, tiny


def suite_config(
    suite: str, common: Mapping[str, Any], variants: Mapping[str, Mapping[str, Any]], arg: str = ""
):
  """base_config() + the suite's shared knobs + the variant's knobs (+ tiny())."""
  from fo_rl.config import base_config, tiny as make_tiny

  variant, tiny = parse_variant_arg(arg, list(variants))
  c = base_config()
  c.name = f"paper_{suite}_{variant}"
  for field, value in {**common, **variants[variant]}.items():
    set_field(c, field, value)
  return make_tiny(c) if tiny else c


def load_suite(suite: str):
  """The module configs/paper/<suite>.py (VARIANTS, COMMON, GROUP_BY, get_config)."""
  path = PAPER_CONFIGS / f"{suite}.py"
  if not path.exists():
    raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
  spec = importlib.util.spec_from_file_location(f"fo_rl_paper_{suite}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod
