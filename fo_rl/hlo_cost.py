"""FLOPs and HBM bytes of a compiled XLA program, counted from its optimized HLO with loops and kernels.

XLA's own `compiled.cost_analysis()` counts a while loop's body once, whatever its trip count, and a
custom call (a Pallas kernel such as splash attention, or the TPU's ragged-dot kernel that the MoE's
grouped matmul compiles to) as zero. fo_rl's programs are mostly loops (the scan over layers, the
micro-batches, the chunked log-probs, the blocked attention, the decode loop), so that count is far
below the work done. `program_cost(compiled.as_text())` walks the HLO module instead:

- **FLOPs**: 2 per multiply-add of every `dot`, `convolution` (what TPU compiles dots to) and
  `ragged-dot`, wherever it sits (fusions included); element-wise work is not counted (the model's
  analytic count, fo_rl/model/flops.py, does not count it either, so the two compare).
- **Loops**: a `while` costs its trip count x (body + condition). The trip count is XLA's
  `known_trip_count` when the compiler annotated one (CPU does for scans), else it is read from the loop
  condition, `induction variable < constant`, with the initial value from the loop's input tuple and the
  step from the body's increment. A condition with another exit besides the bound (the decode loop
  stops early when every row has ended) gives an upper bound: such loops are counted in
  `bounded_loops`, as are loops whose initial value is a runtime input (counted from 0). A loop whose
  count cannot be read runs once and is counted in `unknown_loops`.
  A `conditional` costs its most expensive branch.
- **Kernels** (`custom-call`): a kernel that carries a Pallas `cost_estimate` counts that; the TPU's
  `ragged-dot` kernels count 2 x rows x contraction x columns; fo_rl's splash-attention kernels (always
  causal) count the causal blocks of their query and key shapes: 4 x queries x head dim x keys for the
  forward (QK^T and PV), 6x for the dq kernel (scores, dP, dQ) and 8x for the dk/dv kernel (scores, dP,
  dV, dK), times the fraction of blocks on or below the diagonal. JAX's ragged paged attention kernel
  (the paged rollout engine's) counts its bound, 4 x queries x head dim x every position of the page
  table (each query over its sequence's whole page-table width: the real keys depend on the run-time
  lengths, so a step over short sequences does less). Any other kernel counts 0 and is named in
  `uncounted_kernels`.
- **Bytes** (HBM traffic): operands + results of every instruction outside fusions (a fusion's internals
  stay on chip), with what XLA's own analysis also discounts: a fusion operand that is only sliced
  counts the slices (a layer's weights out of the stacked `[L, ...]` array), and a dynamic-update-slice
  (the KV cache write, an in-place update) counts the update. Collectives count their operands and
  results. It is an estimate of HBM traffic for a roofline, not a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "s32": 4,
    "u32": 4,
    "s64": 8,
    "u64": 8,
    "bf16": 2,
    "f16": 2,
    "f32": 4,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")
# Instructions that move no data of their own.
_FREE = {
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "bitcast",
    "while",
    "call",
    "conditional",
    "after-all",
    "add-dependency",
    "opt-barrier",
    "partition-id",
    "replica-id",
    "copy-done",
    "all-gather-done",
    "all-reduce-done",
    "collective-permute-done",
    "async-done",
    "async-update",
    "send-done",
    "recv-done",
}
# custom-call targets that are compute kernels (Pallas/Mosaic on TPU, Triton/Mosaic on GPU).
_KERNEL_TARGETS = ("tpu_custom_call", "__gpu$", "mosaic", "__cudnn$fmha", "__cublas")
_SLICERS = {"dynamic-slice", "slice", "gather"}
# fo_rl's splash kernels (fo_rl/model/attention.py, causal): multiplies x 2 per query x key x head dim.
_SPLASH_FACTORS = (("_dkv", 8), ("_dq", 6), ("_fwd", 4))


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [
      (dt, tuple(int(d) for d in dims.split(",") if d))
      for dt, dims in _ARRAY.findall(type_text)
      if dt in _DTYPE_BYTES or dt.startswith("f8")
  ]


def _nbytes(type_text: str) -> float:
  return sum(_DTYPE_BYTES.get(dt, 1) * math.prod(shape) for dt, shape in _arrays(type_text))


def _balanced(s: str, i: int) -> int:
  """Index just past the parenthesis group that opens at s[i]."""
  depth = 0
  for j in range(i, len(s)):
    if s[j] == "(":
      depth += 1
    elif s[j] == ")":
      depth -= 1
      if depth == 0:
        return j + 1
  return len(s)


@dataclasses.dataclass
class Instr:
  name: str
  type: str
  op: str
  operands: list[str]
  attrs: str
  root: bool = False
  args: str = ""  # the text inside the parentheses: parameter(3), constant(7)


def _parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  rest = m.group(3)
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")
    end = len(rest) if end < 0 else end
  type_text, rest = rest[:end], rest[end:].lstrip()
  om = re.match(r"([\w\-]+)\(", rest)
  if not om:
    return None
  close = _balanced(rest, om.end() - 1)
  args = rest[om.end() : close - 1]
  return Instr(
      m.group(2), type_text, om.group(1), _NAME.findall(args), rest[close:], bool(m.group(1)), args
  )


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str | None]:
  """The module's computations (name -> instructions, in order) and the entry computation's name.

  An instruction may span lines (a kernel's backend_config can hold a multi-line JSON string whose
  continuation starts with "}"): lines are joined while the instruction's braces are open."""
  comps: dict[str, list[Instr]] = {}
  entry, current, pending = None, None, None

  def flush():
    if pending is not None:
      ins = _parse_instr(pending)
      if ins is not None:
        comps[current].append(ins)

  for line in text.splitlines():
    if current is None:
      h = _HEADER.match(line)
      if h:
        current = h.group(2)
        comps[current] = []
        if h.group(1):
          entry = current
      continue
    if pending is not None and pending.count("{") > pending.count("}"):
      pending += " " + line.strip()
      continue
    if line.startswith("}"):  # "}" or "}, execution_thread=..." (TPU SparseCore computations)
      flush()
      current, pending = None, None
      continue
    if _INSTR.match(line):
      flush()
      pending = line
    elif pending is not None:
      pending += " " + line.strip()
  return comps, entry


@dataclasses.dataclass
class Cost:
  """A program's counted work per device (one execution of the entry computation)."""

  flops: float = 0.0
  bytes: float = 0.0
  kernel_flops: float = 0.0  # the part of `flops` done in custom calls (kernels)
  loops: int = 0  # while loops in the program (statically)
  bounded_loops: int = 0  # ... whose trip count is an upper bound (the loop can exit early)
  unknown_loops: int = 0  # ... whose trip count could not be read (counted once)
  kernels: int = 0  # custom calls (statically)
  uncounted_kernels: tuple[str, ...] = ()  # kernels counted as 0 FLOPs

  def scaled(self, n: float) -> "Cost":
    return dataclasses.replace(
        self, flops=self.flops * n, bytes=self.bytes * n, kernel_flops=self.kernel_flops * n
    )

  def __add__(self, o: "Cost") -> "Cost":
    return Cost(
        self.flops + o.flops,
        self.bytes + o.bytes,
        self.kernel_flops + o.kernel_flops,
        self.loops + o.loops,
        self.bounded_loops + o.bounded_loops,
        self.unknown_loops + o.unknown_loops,
        self.kernels + o.kernels,
        tuple(sorted(set(self.uncounted_kernels) | set(o.uncounted_kernels))),
    )


def _window(attrs: str) -> list[dict]:
  """A convolution's window attribute, one dict per spatial dimension (size, stride, pad, dilations)."""
  m = re.search(r"window=\{([^}]*)\}", attrs)
  if not m:
    return []
  fields = dict(f.split("=", 1) for f in m.group(1).split() if "=" in f)
  n = len(fields.get("size", "").split("x"))
  out = [{} for _ in range(n)]
  for key in ("size", "stride", "lhs_dilate", "rhs_dilate"):
    for d, v in enumerate(fields.get(key, "").split("x") if key in fields else []):
      out[d][key] = int(v)
  for d, v in enumerate(fields["pad"].split("x") if "pad" in fields else []):
    lo, hi = v.split("_")
    out[d]["pad"] = (int(lo), int(hi))
  return out


def _valid_pairs(out: int, win: int, size: int, stride: int, pad_lo: int, ld: int, rd: int) -> int:
  """How many (output position o, window position k) pairs of one spatial dimension read a real input
  element: p = o * stride + k * rd - pad_lo lies on the (lhs-dilated) input, 0 <= p <= (size - 1) * ld
  with p % ld == 0."""
  top = (size - 1) * ld
  total = 0
  for k in range(win):
    c = k * rd - pad_lo
    lo = max(0, -(-(-c) // stride))  # ceil(-c / stride)
    hi = min(out - 1, (top - c) // stride)
    if hi < lo:
      continue
    if ld == 1:
      total += hi - lo + 1
    elif stride == 1:  # o + c = 0 (mod ld)
      r = (-c) % ld
      total += max(0, (hi - r) // ld - (-(-(lo - r) // ld)) + 1)
    else:
      total += sum(1 for o in range(lo, hi + 1) if (o * stride + c) % ld == 0)
  return total


def _attr_names(attrs: str, key: str) -> list[str]:
  m = re.search(key + r"=\{([^}]*)\}", attrs)
  if m:
    return _NAME.findall(m.group(1))
  m = re.search(key + r"=%([\w.\-]+)", attrs)
  return [m.group(1)] if m else []


def _dims(attrs: str, key: str) -> list[int]:
  m = re.search(key + r"=\{([\d,]*)\}", attrs)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


class _Module:

  def __init__(self, text: str):
    self.comps, self.entry = parse_module(text)
    self.by_name = {c: {i.name: i for i in ins} for c, ins in self.comps.items()}
    self._costs: dict[tuple[str, bool], Cost] = {}  # per computation: each is walked once

  # ---- shapes ------------------------------------------------------------------------------------
  def _shape(self, comp: str, name: str) -> tuple[int, ...]:
    ins = self.by_name[comp].get(name)
    arrs = _arrays(ins.type) if ins else []
    return arrs[0][1] if arrs else ()

  def _operand_types(self, comp: str, ins: Instr) -> list[str]:
    """The operand types of a custom call: its layout constraints if printed, else the operands'."""
    m = re.search(r"operand_layout_constraints=\{(.*?)\}(?:, [a-z_]+=|$)", ins.attrs)
    if m:
      return [f"{dt}[{dims}]" for dt, dims in _ARRAY.findall(m.group(1))]
    return [self.by_name[comp][o].type for o in ins.operands if o in self.by_name[comp]]

  # ---- FLOPs of one instruction ------------------------------------------------------------------
  def _dot_flops(self, comp: str, ins: Instr) -> float:
    out = _arrays(ins.type)
    if not out or not ins.operands:
      return 0.0
    lhs = self._shape(comp, ins.operands[0])
    contract = math.prod(lhs[d] for d in _dims(ins.attrs, "lhs_contracting_dims") if d < len(lhs))
    return 2.0 * math.prod(out[0][1]) * contract

  def _conv_flops(self, comp: str, ins: Instr) -> float:
    """2 x output batch x output features x input features x the (output, window) position pairs
    that land on real input, per spatial dimension: XLA writes dots as convolutions whose padding
    makes most window positions zeros (an outer product over heads), and weight gradients as
    base-dilated ones; those positions are not computed and not counted (as XLA's own analysis)."""
    out = _arrays(ins.type)
    m = re.search(r"dim_labels=([^_]*)_([^-]*)->([^,\s]*)", ins.attrs)
    if not out or len(ins.operands) < 2 or not m:
      return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    lhs, kernel, shape = (
        self._shape(comp, ins.operands[0]),
        self._shape(comp, ins.operands[1]),
        out[0][1],
    )
    if not (len(lhs) == len(lhs_l) and len(kernel) == len(rhs_l) and len(shape) == len(out_l)):
      return 0.0
    window = _window(ins.attrs)
    pairs = 1
    for d in sorted(c for c in out_l if c.isdigit()):
      w = window[int(d)] if int(d) < len(window) else {}
      pairs *= _valid_pairs(
          shape[out_l.index(d)],
          kernel[rhs_l.index(d)],
          lhs[lhs_l.index(d)],
          w.get("stride", 1),
          w.get("pad", (0, 0))[0],
          w.get("lhs_dilate", 1),
          w.get("rhs_dilate", 1),
      )
    return (
        2.0 * shape[out_l.index("b")] * shape[out_l.index("f")] * kernel[rhs_l.index("i")] * pairs
    )

  def _kernel_flops(self, comp: str, ins: Instr) -> float | None:
    """FLOPs of a custom call, None when it cannot be counted."""
    m = re.search(r'"cost_estimate":\s*\{[^}]*"flops":\s*"?(\d+)', ins.attrs)
    if m:
      return float(m.group(1))
    name = ins.name
    if name.startswith("ragged-dot-metadata"):  # the kernel's group offsets: no matmul
      return 0.0
    types = self._operand_types(comp, ins)
    floats = [
        s
        for t in types
        for dt, s in _arrays(t)
        if dt in ("f32", "bf16", "f16") or dt.startswith("f8")
    ]
    if name.startswith("ragged-dot"):
      out = _arrays(ins.type)
      if not out or len(out[0][1]) != 2:
        return None
      M, N = out[0][1]
      lhs = [s for s in floats if len(s) == 2 and s[0] == M]
      return 2.0 * M * N * lhs[0][1] if lhs else None
    if "ragged_paged_attention" in name:  # q [T, N, H], pages [P, ps, 2K, H], page table [Q, W]
      q = next((x for x in floats if len(x) == 3), None)
      pages = next((x for x in floats if len(x) == 4), None)
      ints = [x for t in types for dt, x in _arrays(t) if dt == "s32" and len(x) == 2]
      if q is None or pages is None or not ints:
        return None
      return 4.0 * math.prod(q) * ints[0][1] * pages[1]
    if "splash" in name:
      factor = next((f for key, f in _SPLASH_FACTORS if key in name), None)
      q = next((s for s in floats if len(s) >= 3), None)
      if factor is None or q is None:
        return None
      k = next((s for s in floats if len(s) == len(q) - 1 and s[-1] == q[-1]), None)
      if k is None:
        return None
      masks = [s for t in types for dt, s in _arrays(t) if dt == "s8" and len(s) == 3]
      nq, nk = masks[0][1:] if masks else (1, 1)
      frac = (nq + 1) / (2 * nq) if nq == nk and nq > 0 else 1.0
      return factor * math.prod(q) * k[-2] * frac
    return None

  # ---- bytes of one instruction outside a fusion ------------------------------------------------
  def _operand_bytes(self, comp: str, ins: Instr) -> float:
    return sum(_nbytes(self.by_name[comp][o].type) for o in ins.operands if o in self.by_name[comp])

  def _fusion_bytes(self, comp: str, ins: Instr, fused: str) -> float:
    body = self.comps.get(fused, [])
    params = {}
    for f in body:
      if f.op == "parameter" and f.args.strip().isdigit():
        params[int(f.args)] = f.name
    users: dict[str, list[Instr]] = {}
    for f in body:
      for o in f.operands:
        users.setdefault(o, []).append(f)
    root = next((f for f in body if f.root), None)
    in_place = set()
    out_bytes = _nbytes(ins.type)
    roots = [] if root is None else [root]
    if root is not None and root.op == "tuple":
      roots = [self.by_name[fused].get(o) for o in root.operands]
    if roots and all(r is not None and r.op == "dynamic-update-slice" for r in roots):
      out_bytes = sum(_nbytes(self.by_name[fused][r.operands[1]].type) for r in roots)
      in_place = {r.operands[0] for r in roots}
    total = out_bytes
    for j, o in enumerate(ins.operands):
      full = _nbytes(self.by_name[comp][o].type) if o in self.by_name[comp] else 0.0
      p = params.get(j)
      us = users.get(p, []) if p else []
      if p in in_place and all(u.op == "dynamic-update-slice" for u in us):
        continue
      if us and all(u.op in _SLICERS and u.operands[0] == p for u in us):
        total += min(full, sum(_nbytes(u.type) for u in us))
      else:
        total += full
    return total

  def _plain_bytes(self, comp: str, ins: Instr) -> float:
    if ins.op in _FREE or ins.op.endswith("-done"):
      return 0.0
    if ins.op in ("dynamic-slice", "slice", "gather"):
      return 2.0 * _nbytes(ins.type)
    if ins.op == "dynamic-update-slice" and len(ins.operands) > 1:
      return 2.0 * _nbytes(self.by_name[comp][ins.operands[1]].type)
    if ins.op == "copy-start":
      return 2.0 * self._operand_bytes(comp, ins)
    return _nbytes(ins.type) + self._operand_bytes(comp, ins)

  # ---- loops -------------------------------------------------------------------------------------
  def _origin(self, comp: str, name: str, fusion_args: list[tuple[str, str]] | None = None):
    """What a scalar is: ('iv', tuple index), ('const', value) or None, following copies, converts,
    bitcasts and fusion parameters (fusion_args: the caller's (comp, operand) per parameter)."""
    for _ in range(32):
      ins = self.by_name[comp].get(name)
      if ins is None:
        return None
      if ins.op in ("copy", "bitcast", "convert", "reshape") and ins.operands:
        name = ins.operands[0]
        continue
      if ins.op == "fusion" and fusion_args is None:  # a wrapped scalar op: follow its root
        fused = (_attr_names(ins.attrs, "calls") or [None])[0]
        root = next((i for i in self.comps.get(fused, []) if i.root), None)
        if root is None:
          return None
        fusion_args = [(comp, o) for o in ins.operands]
        comp, name = fused, root.name
        continue
      if ins.op == "minimum" and len(ins.operands) == 2:  # i < min(n, cap): cap bounds the count
        kinds = [self._origin(comp, o, fusion_args) for o in ins.operands]
        consts = [k for k in kinds if k and k[0] == "const"]
        return ("const", min(k[1] for k in consts), True) if consts else None
      if ins.op == "constant":
        m = re.fullmatch(r"\s*(-?\d+)\s*", ins.args)
        return ("const", int(m.group(1))) if m else None
      if ins.op == "get-tuple-element":
        m = re.search(r"index=(\d+)", ins.attrs)
        src = self.by_name[comp].get(ins.operands[0]) if ins.operands else None
        if m and src is not None and src.op == "parameter":
          return ("iv", int(m.group(1)))
        return None
      if ins.op == "parameter" and fusion_args is not None:
        if not ins.args.strip().isdigit() or int(ins.args) >= len(fusion_args):
          return None
        comp, name = fusion_args[int(ins.args)]
        fusion_args = None
        continue
      return None
    return None

  def _compares(self, cond: str):
    """(compare instruction, its computation, fusion args) for every compare the condition runs."""
    for ins in self.comps.get(cond, []):
      if ins.op == "compare":
        yield ins, cond, None, ins.root
      elif ins.op == "fusion":
        for fused in _attr_names(ins.attrs, "calls"):
          args = [(cond, o) for o in ins.operands]
          for f in self.comps.get(fused, []):
            if f.op == "compare":
              yield f, fused, args, ins.root and f.root

  def _trip_count(self, comp: str, ins: Instr) -> tuple[int, str]:
    """(trip count, "known" | "bound" | "unknown") of a while instruction."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
    if m:
      return int(m.group(1)), "known"
    cond = (_attr_names(ins.attrs, "condition") or [None])[0]
    body = (_attr_names(ins.attrs, "body") or [None])[0]
    for cmp, where, args, is_root in self._compares(cond):
      d = re.search(r"direction=(\w+)", cmp.attrs)
      if not d or len(cmp.operands) != 2:
        continue
      a, b = (self._origin(where, o, args) for o in cmp.operands)
      a, b = (self._invariant(comp, ins, body, x) for x in (a, b))
      direction = d.group(1)
      if a and b and a[0] == "const" and b[0] == "iv":
        a, b = b, a
        direction = {"GT": "LT", "GE": "LE"}.get(direction, "")
      if not (a and b and a[0] == "iv" and b[0] == "const" and direction in ("LT", "LE")):
        continue
      index, limit = a[1], b[1] + (1 if direction == "LE" else 0)
      is_root = is_root and len(b) == 2  # a bound through min(n, cap) is an upper bound
      init = self._init(comp, ins, index)
      if init is None:  # a runtime input (the decode loop's start): counting from 0 bounds it
        init, is_root = 0, False
      step = self._step(body, index)
      if step is None or step <= 0:
        return 1, "unknown"
      n = max(0, -(-(limit - init) // step))
      return n, "known" if is_root else "bound"
    return 1, "unknown"

  def _invariant(self, comp: str, ins: Instr, body: str, origin):
    """A loop-carried scalar that the body passes through unchanged (a fori_loop's run-time upper bound)
    is what the loop starts it at: the origin of its initial value (a constant, or a cap through
    min(n, cap)); any other origin as it is."""
    if not origin or origin[0] != "iv":
      return origin
    root = next((i for i in self.comps.get(body, []) if i.root), None)
    if root is None or root.op != "tuple" or origin[1] >= len(root.operands):
      return origin
    if self._origin(body, root.operands[origin[1]]) != origin:
      return origin  # changed by the body: the induction variable itself
    return self._init_origin(comp, ins, origin[1]) or origin

  def _init(self, comp: str, ins: Instr, index: int) -> int | None:
    o = self._init_origin(comp, ins, index)
    return o[1] if o and o[0] == "const" else None

  def _init_origin(self, comp: str, ins: Instr, index: int):
    name = ins.operands[0] if ins.operands else None
    for _ in range(16):
      t = self.by_name[comp].get(name)
      if t is None:
        return None
      if t.op in ("copy", "bitcast"):
        name = t.operands[0]
        continue
      if t.op == "tuple" and index < len(t.operands):
        return self._origin(comp, t.operands[index])
      return None
    return None

  def _step(self, body: str, index: int) -> int | None:
    root = next((i for i in self.comps.get(body, []) if i.root), None)
    if root is None or root.op != "tuple" or index >= len(root.operands):
      return None
    inc = self.by_name[body].get(root.operands[index])
    while inc is not None and inc.op in ("copy", "bitcast"):
      inc = self.by_name[body].get(inc.operands[0])
    if inc is None:
      return None
    if inc.op == "add":
      where, args, ops = body, None, inc.operands
    elif inc.op == "fusion":
      fused = _attr_names(inc.attrs, "calls")[0]
      froot = next((i for i in self.comps.get(fused, []) if i.root), None)
      if froot is None or froot.op != "add":
        return None
      where, args, ops = fused, [(body, o) for o in inc.operands], froot.operands
    else:
      return None
    kinds = [self._origin(where, o, args) for o in ops]
    if ("iv", index) in kinds:
      consts = [k[1] for k in kinds if k and k[0] == "const"]
      return consts[0] if consts else None
    return None

  # ---- the walk ----------------------------------------------------------------------------------
  def cost(self, comp: str, fused: bool = False) -> Cost:
    """One execution of computation `comp` (`fused`: inside a fusion, whose bytes the fusion counts)."""
    if (comp, fused) not in self._costs:
      self._costs[comp, fused] = self._walk(comp, fused)
    return self._costs[comp, fused]

  def _walk(self, comp: str, fused: bool) -> Cost:
    total = Cost()
    for ins in self.comps.get(comp, []):
      c = Cost()
      if ins.op == "dot" or ins.op == "ragged-dot":
        c.flops = self._dot_flops(comp, ins)
      elif ins.op == "convolution":
        c.flops = self._conv_flops(comp, ins)
      elif ins.op == "custom-call":
        c.kernels = 1
        f = self._kernel_flops(comp, ins)
        if f is None:
          target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
          label = re.sub(r"\.\d+$", "", ins.name)
          if target and target.group(1).startswith(_KERNEL_TARGETS):
            c.uncounted_kernels = (label,)
          else:  # XLA's own runtime calls (buffer allocation, async bookkeeping): no compute
            c.kernels = 0
        else:
          c.flops = c.kernel_flops = f
      if ins.op == "fusion":
        for sub in _attr_names(ins.attrs, "calls"):
          c = c + self.cost(sub, True)  # a fused computation's bytes are 0: counted below
          if not fused:
            c.bytes = self._fusion_bytes(comp, ins, sub)
      elif not fused:
        c.bytes = self._plain_bytes(comp, ins)
      if ins.op == "while":
        n, kind = self._trip_count(comp, ins)
        inner = Cost()
        for sub in _attr_names(ins.attrs, "body") + _attr_names(ins.attrs, "condition"):
          inner = inner + self.cost(sub)
        c = c + inner.scaled(n)
        c.loops += 1
        c.bounded_loops += kind == "bound"
        c.unknown_loops += kind == "unknown"
      elif ins.op == "conditional":
        branches = _attr_names(ins.attrs, "branch_computations") or (
            _attr_names(ins.attrs, "true_computation") + _attr_names(ins.attrs, "false_computation")
        )
        if branches:
          c = c + max((self.cost(b) for b in branches), key=lambda x: x.flops)
      elif ins.op == "call" or (ins.op.endswith("-start") and "calls=" in ins.attrs):
        for sub in _attr_names(ins.attrs, "to_apply") + _attr_names(ins.attrs, "calls"):
          c = c + self.cost(sub, fused)
      total = total + c
    return total


def program_cost(text: str) -> Cost:
  """The counted work of the compiled program whose optimized HLO text is `text` (per device)."""
  mod = _Module(text)
  if mod.entry is None:
    return Cost()
  return mod.cost(mod.entry)
