"""`--config.dry_run=True`: compile the RL step ahead of time for a TPU topology and check that it fits in HBM.

    python -m fo_rl.main --config=configs/qwen3_30b_a3b.py:v5p-64 --config.dry_run=True

Runs on any machine with libtpu installed (`pip install -r requirements-tpu.txt`; no TPU needed): the
topology `parallel.topology` (e.g. "v5p:2x4x4", the chip grid of a v5p-64) comes from
`jax.experimental.topologies.get_topology_desc`, the meshes `parallel.mesh` / `parallel.sampler_mesh` are
built over its devices, and the parameters, optimizer state, rollouts and KV cache are
`jax.ShapeDtypeStruct`s carrying their NamedShardings: nothing is materialized. The functions compiled are
the ones the job runs (the same jitted callables, lowered by `Trainer.lower` and `Sampler.lower`):

  trainer.old_pass        the old-logprob pass over the global batch (Trainer._old_pass)
  trainer.update          one mini-batch update (Trainer._compile_update: donated state, explicit shardings)
  sampler.update_weights  trainer -> sampler weight sync (reshard + quantize)
  sampler.prefill         the prompt pass that fills the KV cache
  sampler.decode          the decode loop (one while_loop; the decode state is donated)

With the paged engine (`sampler.engine="paged"`, fo_rl/sampler/engine.py), sampler.prefill is the
engine's step with its `prefill_rows` prefill chunks beside every decode slot, and sampler.decode its
burst of decode steps, both at their largest shapes (every slot of every shard busy with a sequence of
the longest length) over each shard's pool of `sampler.num_pages` pages (`PagedEngine.lower`); the rows
name the shards, slots and pool.

Shapes: the trainer's global batch is rl.prompts_per_step * rl.group_size rows of P + T tokens, with
P = sampler.prompt_bucket (prompts longer than that get a bigger bucket and more memory) and
T = bucket(sampler.max_new_tokens); the sampler's batch is the largest of the training batch and the
evaluation batch (eval.num_prompts * eval.samples).

Memory, per device, from `compiled.memory_analysis()`: arguments, outputs, aliased (donated) bytes,
temporaries and code. `total = arguments + outputs - aliased + temporaries + code + resident`, where
`resident` is what stays in HBM while the function runs but is not one of its arguments: the sampler's
weights during the trainer's functions (plus the rollouts of the whole step during an update), the train
state during the sampler's. The plan fits when every total is <= the HBM of one chip
(`parallel.hbm_gib`, default: the chip's, see HBM_GIB).

Compute, per device (`flops_columns`): `model_flops`, the model's analytic FLOPs for the function's work
(fo_rl/model/flops.py: 6 x active parameters x tokens for an update, 2 x for a forward pass (two under
R3's old pass), plus causal attention) and `model_seconds` (those at the chip's peak, CHIPS); the
compiled program's own count, `hlo_flops` and `hlo_bytes`, read from its optimized HLO with every loop's
trip count and the kernels (fo_rl/hlo_cost.py); `flops_ratio` = hlo / model (wasted compute shows up
here); `roofline_seconds`, the larger of hlo_flops / peak FLOP/s and hlo_bytes / HBM bandwidth; and XLA's
own `cost_analysis()` (`xla_flops`, `xla_bytes`), which counts a loop's body once and a kernel as zero.

Output: one JSON object per line, one per compiled function, then the verdict
`{"verdict": "fits" | "does not fit", ...}`. When the plan does not fit, a message naming the function
and its numbers goes to stderr and the process exits with status 1 (also when the TPU compiler itself
reports that a function runs out of HBM).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from fo_rl import config as config_lib
from fo_rl import hlo_cost
from fo_rl.model import abstract_model, route_dtype
from fo_rl.model import flops as analytic
from fo_rl.parallel.sharding import batch_spec, make_mesh, state_shardings
from fo_rl.rl.rollouts import Rollouts, replays_sampler
from fo_rl.rl.trainer import Trainer
from fo_rl.sampler import Sampler, SamplingParams, bucket
from fo_rl.sampler.engine import BURST

GIB = 1024**3

# One table of chip figures, by jax device_kind: (HBM per chip in GiB as the TPU runtime reports it
# (bytes_limit), peak dense bf16 FLOP/s, HBM bandwidth in bytes/s). FLOP/s and bandwidth are Google's
# published per-chip figures (cloud.google.com/tpu/docs/<version>): v5p 459 TFLOP/s, 2,765 GB/s; v6e
# 918 TFLOP/s, 1,640 GB/s; v5e 197 TFLOP/s, 819 GB/s; v4 275 TFLOP/s, 1,200 GB/s; Ironwood (TPU7x)
# 2,307 TFLOP/s bf16 (4,614 fp8), 7,370 GB/s.
CHIPS = {
    "TPU v5": (95.0, 459e12, 2765e9),  # v5p
    "TPU v5p": (95.0, 459e12, 2765e9),
    "TPU v6 lite": (31.25, 918e12, 1640e9),  # v6e (Trillium): 32 GB
    "TPU v6e": (31.25, 918e12, 1640e9),
    "TPU v5 lite": (15.75, 197e12, 819e9),  # v5e: 16 GB
    "TPU v5e": (15.75, 197e12, 819e9),
    "TPU v4": (32.0, 275e12, 1200e9),
    "TPU7x": (192.0, 2307e12, 7370e9),
}
HBM_GIB = {kind: c[0] for kind, c in CHIPS.items()}


class DryRunError(RuntimeError):
  """The plan cannot be compiled or does not fit; the message names the function and the numbers."""


def topology_devices(topology: str):
  """The devices of a TPU topology ("v5p:2x4x4", "v6e:16x16", ...) without a TPU (needs libtpu)."""
  if not topology:
    raise DryRunError(
        "parallel.topology is empty: set it to a TPU topology such as 'v5p:2x4x4' "
        "(v5p-64) or 'v6e:16x16' (v6e-256)"
    )
  try:
    import libtpu  # noqa: F401  (only to give a clear error: get_topology_desc loads libtpu.so)
  except ImportError:
    raise DryRunError(
        "the dry run needs libtpu to compile for TPU: pip install -r requirements-tpu.txt"
    ) from None
  # On a machine without TPUs: no GCE metadata queries, and other processes that loaded libtpu (any
  # `import jax` with libtpu installed does) must not lock us out.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # noqa: BLE001  (libtpu raises XlaRuntimeError / ValueError)
    raise DryRunError(
        f"parallel.topology={topology!r}: {str(e).splitlines()[0]} (the format is "
        f"'<version>:<chips per axis>', e.g. 'v5p:2x4x4' for a v5p-64)"
    ) from None
  return list(desc.devices)


def hbm_bytes(devices, override_gib: float = 0.0) -> int:
  if override_gib and override_gib > 0:
    return int(override_gib * GIB)
  kind = devices[0].device_kind
  if kind not in HBM_GIB:
    raise DryRunError(f"unknown HBM size for device kind {kind!r}: set parallel.hbm_gib")
  return int(HBM_GIB[kind] * GIB)


def _sds(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def with_shardings(abstract, shardings):
  """A pytree of ShapeDtypeStructs (e.g. nnx.eval_shape's) given a matching pytree of shardings."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs / arrays with shardings (the largest
  shard: uneven shardings are padded)."""
  total = 0
  for x in jax.tree.leaves(tree):
    if x is None:
      continue
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {
      k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
      for k in ("argument", "output", "alias", "temp", "generated_code")
  }
  peak = getattr(m, "peak_memory_in_bytes", None)
  if peak:
    out["peak"] = int(peak)
  return out


def _cost(compiled) -> dict[str, float]:
  """XLA's own count for the compiled program (HLO cost analysis, per device): FLOPs, bytes accessed."""
  try:
    c = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  (a backend without cost analysis)
    return {}
  if isinstance(c, (list, tuple)):  # older jax: one dict per program
    c = c[0] if c else {}
  return {k: float(c[k]) for k in ("flops", "bytes accessed") if c and k in c}


def flops_columns(compiled, model_flops: int, devices: int, chip) -> dict[str, Any]:
  """The compute columns of a function's row, per device.

  `model_flops`: the model's analytic FLOPs for the function's work (fo_rl/model/flops.py) over
  `devices`; `model_seconds`: those FLOPs at the chip's peak bf16 FLOP/s (CHIPS), the time at 100% MFU.
  `hlo_flops` / `hlo_bytes`: the compiled program's own matmul FLOPs and HBM traffic, counted from its
  optimized HLO with every loop's trip count and the kernels (fo_rl/hlo_cost.py; `hlo_loops`,
  `hlo_bounded_loops`: loops that can exit early, counted to their bound, `hlo_unknown_loops`,
  `hlo_kernels`, `hlo_kernel_flops`, `hlo_uncounted_kernels`). `flops_ratio` = hlo / model: compute
  beyond the model's (recomputation under remat, padding, blocks above the causal diagonal, replicated
  work). `roofline_seconds` = the larger of hlo_flops / peak FLOP/s and hlo_bytes / HBM bandwidth, with
  `roofline_bound` saying which. `xla_flops` / `xla_bytes`: XLA's own `cost_analysis()`, kept beside:
  it counts a while loop's body once and a kernel as zero, so for these programs it is far lower.
  """
  per_device = model_flops / devices
  out: dict[str, Any] = {"model_flops": per_device}
  if chip is not None and model_flops:
    out["model_seconds"] = round(per_device / chip[1], 4)
  cost = _cost(compiled)
  if cost:
    out.update(xla_flops=cost.get("flops", 0.0), xla_bytes=cost.get("bytes accessed", 0.0))
  counted = hlo_cost.program_cost(compiled.as_text() or "")
  out.update(
      hlo_flops=counted.flops,
      hlo_bytes=counted.bytes,
      hlo_kernel_flops=counted.kernel_flops,
      hlo_loops=counted.loops,
      hlo_bounded_loops=counted.bounded_loops,
      hlo_unknown_loops=counted.unknown_loops,
      hlo_kernels=counted.kernels,
      hlo_uncounted_kernels=list(counted.uncounted_kernels),
  )
  if model_flops:
    out["flops_ratio"] = round(counted.flops / per_device, 3)
    if counted.unknown_loops or counted.uncounted_kernels:
      out["flops_ratio_note"] = (
          "a lower bound: loops of unknown trip count ran once, kernels counted 0"
      )
    elif counted.bounded_loops:
      out["flops_ratio_note"] = "loops that can exit early counted to their bound"
  if chip is not None and (counted.flops or counted.bytes):
    t_compute, t_memory = counted.flops / chip[1], counted.bytes / chip[2]
    out["roofline_seconds"] = round(max(t_compute, t_memory), 4)
    out["roofline_bound"] = "compute" if t_compute >= t_memory else "memory"
  return out


def _is_oom(e: Exception) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "Ran out of memory" in s or "exceeds the memory" in s.lower()


def _compile(
    name: str,
    lowered_fn,
    resident: int,
    hbm: int,
    extra: dict | None = None,
    flops: tuple[int, int, Any] | None = None,
) -> tuple:
  """(report row, compiled or None); `flops`: (model FLOPs of the function, devices, chip) for
  `flops_columns`."""
  t0 = time.time()
  row: dict[str, Any] = {"function": name}
  row.update(extra or {})
  try:
    compiled = lowered_fn().compile()
  except Exception as e:  # noqa: BLE001
    if not _is_oom(e):
      raise
    msg = " ".join(l.strip() for l in str(e).splitlines() if l.strip())[:600]
    row.update(
        fits=False,
        compiler_error=msg,
        hbm_gib=round(hbm / GIB, 3),
        compile_seconds=round(time.time() - t0, 1),
    )
    return row, None
  mem = _memory(compiled)
  total = (
      mem.get("argument", 0)
      + mem.get("output", 0)
      - mem.get("alias", 0)
      + mem.get("temp", 0)
      + mem.get("generated_code", 0)
      + resident
  )
  row.update({f"{k}_bytes": v for k, v in mem.items()})
  row.update(
      resident_bytes=resident,
      total_bytes=total,
      total_gib=round(total / GIB, 3),
      hbm_gib=round(hbm / GIB, 3),
      fits=bool(total <= hbm),
      compile_seconds=round(time.time() - t0, 1),
  )
  if flops is not None:
    row.update(flops_columns(compiled, *flops))
  return row, compiled


class _Setup:
  """The abstract (never materialized) trainer and sampler of a config on a topology's devices."""

  def __init__(self, config, devices=None):
    self.rc = rc = config_lib.parse(config)
    self.topology = rc.parallel.topology
    self.devices = topology_devices(self.topology) if devices is None else list(devices)
    rc.parallel.check_devices(len(self.devices))
    self.hbm = hbm_bytes(self.devices, rc.parallel.hbm_gib)
    self.model_cfg = model_cfg = rc.model
    self.mesh = make_mesh(rc.parallel.mesh, devices=self.devices, where="parallel.mesh")
    self.sampler_mesh = make_mesh(
        rc.parallel.sampler_mesh, devices=self.devices, where="parallel.sampler_mesh"
    )
    rules = rc.parallel.rules
    graphdef, abstract = abstract_model(model_cfg, self.mesh, rules)
    self.params = with_shardings(abstract, state_shardings(abstract, self.mesh, rules))
    self.trainer = Trainer(graphdef, model_cfg, rc.trainer, self.mesh, rules)
    self.state = self.trainer.abstract_state(self.params)
    self.sampler = Sampler(model_cfg, rc.sampler, self.sampler_mesh)
    self.sparams = self.sampler.abstract_params(self.params)
    self.state_bytes = device_bytes(self.state)
    self.param_bytes = device_bytes(self.state.params)
    self.sampler_bytes = device_bytes(self.sparams)

  def head(self) -> dict:
    d = self.devices
    return {
        "topology": self.topology,
        "devices": len(d),
        "device_kind": d[0].device_kind,
        "processes": len({x.process_index for x in d}),
        "mesh": dict(zip(self.mesh.axis_names, self.mesh.devices.shape)),
        "sampler_mesh": dict(zip(self.sampler_mesh.axis_names, self.sampler_mesh.devices.shape)),
    }


def resident_bytes(config, devices=None) -> int:
  """Per-device bytes of the train state plus the sampler's weights (what stays in HBM), no compile."""
  s = _Setup(config, devices)
  return s.state_bytes + s.sampler_bytes


def plan(config, devices=None, log=None, functions=None) -> list[dict]:
  """Compile the RL step for `config` on `devices` (default: parallel.topology's); returns the report rows
  (one per function, then the verdict). `functions`: compile only these (names as in the module
  docstring; None: all). Raises DryRunError for a bad topology / missing libtpu."""
  log = log or (lambda s: None)
  setup = _Setup(config, devices)
  rc, hbm, mesh = setup.rc, setup.hbm, setup.mesh
  model_cfg, trainer, sampler = setup.model_cfg, setup.trainer, setup.sampler
  params, state = setup.params, setup.state
  state_bytes, param_bytes, sampler_bytes = (
      setup.state_bytes,
      setup.param_bytes,
      setup.sampler_bytes,
  )
  head = setup.head()
  log(f"dry run: {head}")

  # ---- shapes --------------------------------------------------------------------------------------
  B = rc.rl.global_batch
  Pl = bucket(1, rc.sampler.prompt_bucket)
  T = bucket(rc.sampling.max_new_tokens, rc.sampler.gen_bucket)
  Lt = Pl + T
  Ly, k = model_cfg.num_layers, model_cfg.route_slots
  bsh = lambda shape, dt: _sds(
      shape, dt, NamedSharding(mesh, batch_spec(rc.parallel.rules, len(shape), mesh, shape[0]))
  )
  ro = Rollouts(
      tokens=bsh((B, Lt), jnp.int32),
      token_mask=bsh((B, Lt), jnp.bool_),
      positions=bsh((B, Lt), jnp.int32),
      response_mask=bsh((B, Lt), jnp.float32),
      logp_mu=bsh((B, Lt), jnp.float32),
      routes=bsh((B, Lt, Ly, k), route_dtype(model_cfg.num_experts)),
      advantages=bsh((B,), jnp.float32),
  )
  # What the updates keep in HBM besides their arguments: the step's rollouts and what the old pass
  # returns for them (logp_old; the live routes under R2, None otherwise), batch-sharded.
  step_bytes = device_bytes(ro) + device_bytes(trainer.abstract_old_pass(params, ro))

  # ---- sampler inputs ------------------------------------------------------------------------------
  Bs = max(B, rc.eval.num_prompts * rc.eval.samples)
  sampling = SamplingParams(
      temperature=rc.sampling.temperature,
      top_k=rc.sampling.top_k,
      top_p=rc.sampling.top_p,
      max_new_tokens=rc.sampling.max_new_tokens,
      eos_ids=(0,),
  )

  shapes = {
      "global_batch": B,
      "mini_batch": B // rc.trainer.mini_batches,
      "prompt_len": Pl,
      "gen_len": T,
      "sampler_batch": Bs,
  }
  head.update(shapes, train_state_bytes=state_bytes, sampler_params_bytes=sampler_bytes)
  if state_bytes + sampler_bytes > hbm:  # no need to compile anything
    rows = [
        {
            "function": "resident state",
            "fits": False,
            "resident_bytes": state_bytes + sampler_bytes,
            "total_bytes": state_bytes + sampler_bytes,
            "total_gib": round((state_bytes + sampler_bytes) / GIB, 3),
            "hbm_gib": round(hbm / GIB, 3),
        }
    ]
    return rows + [judge(rows, head, hbm)]
  rows = []

  chip = CHIPS.get(setup.devices[0].device_kind)
  n_dev = len(setup.devices)
  fwd = analytic.forward_flops
  passes = (
      2 if replays_sampler(rc.trainer.replay) else 1
  )  # r3's old pass: live and replayed forwards
  # Prefill: the prompt's forward, with the output projection at the one position sampled from.
  unsampled_heads = 2 * model_cfg.hidden_size * model_cfg.vocab_size * (Pl - 1)
  work = {
      "trainer.old_pass": passes * fwd(model_cfg, B, Lt),
      "trainer.update": analytic.train_flops(model_cfg, B // rc.trainer.mini_batches, Lt),
      "sampler.update_weights": 0,
      "sampler.prefill": fwd(model_cfg, Bs, Pl) - Bs * unsampled_heads,
      "sampler.decode": analytic.decode_flops(model_cfg, Bs, Pl, T),
  }

  sampler_extra = {"batch": Bs, "seq_len": Lt}
  if rc.sampler.engine == "paged":  # the engine's largest steps (PagedEngine.step_shapes)
    eng = sampler.engine
    sh = eng.step_shapes(Bs, Pl, sampling)
    S, Dv, C, R = eng.shards, sh["slots"], rc.sampler.prefill_chunk, rc.sampler.prefill_rows
    decode = analytic.engine_step_flops(model_cfg, S * Dv, Lt)
    work["sampler.prefill"] = analytic.engine_step_flops(model_cfg, S * Dv, Lt, S * R, C, Pl)
    work["sampler.decode"] = BURST * decode
    pool_bytes = eng.pool_bytes(sh["num_pages"])
    sampler_extra = {
        "engine": "paged",
        "shards": S,
        "slots_per_shard": Dv,
        "pages_per_shard": sh["num_pages"],
        "page_size": rc.sampler.page_size,
        "pool_bytes_per_shard": pool_bytes,
        "pool_gib_per_shard": round(pool_bytes / GIB, 3),
        "seq_len": Lt,
    }

  def run(name, fn, resident, extra=None):
    log(f"dry run: compiling {name} ...")
    row, compiled = _compile(name, fn, resident, hbm, extra, (work[name], n_dev, chip))
    log(
        f"dry run: {name}: "
        + (f"{row['total_gib']} GiB of {row['hbm_gib']}" if "total_gib" in row else "out of memory")
        + f" ({row['compile_seconds']}s)"
    )
    rows.append(row)
    return compiled

  want = lambda name: functions is None or name in functions
  if want("trainer.old_pass") or want("trainer.update"):
    trainer_lowered = trainer.lower(state, ro)
  if want("trainer.old_pass"):
    run(
        "trainer.old_pass",
        lambda: trainer_lowered["old_pass"],
        sampler_bytes,
        {"batch": B, "seq_len": Lt},
    )
  if want("trainer.update"):
    run(
        "trainer.update",
        lambda: trainer_lowered["update"],
        sampler_bytes + step_bytes,
        {"batch": B // rc.trainer.mini_batches, "seq_len": Lt},
    )
  sampler_lowered = sampler.lower(params, Bs, Pl, sampling)
  if want("sampler.update_weights"):
    run(
        "sampler.update_weights",
        lambda: sampler_lowered["update_weights"],
        state_bytes - param_bytes + sampler_bytes,
        {},
    )
  if want("sampler.prefill"):
    run("sampler.prefill", lambda: sampler_lowered["prefill"], state_bytes, sampler_extra)
  if want("sampler.decode"):
    run("sampler.decode", lambda: sampler_lowered["decode"], state_bytes, sampler_extra)
  return rows + [judge(rows, head, hbm)]


def judge(rows: list[dict], head: dict, hbm: int) -> dict:
  """The verdict row for the function rows against `hbm` bytes per device (rows keep their byte counts,
  so a plan can be judged again for another HBM size without compiling)."""
  for r in rows:
    if "total_bytes" in r:
      r["fits"] = bool(r["total_bytes"] <= hbm)
      r["hbm_gib"] = round(hbm / GIB, 3)
  bad = [r for r in rows if not r["fits"]]
  worst = max(rows, key=lambda r: r.get("total_bytes", float("inf")))
  verdict = dict(
      head,
      verdict="fits" if not bad else "does not fit",
      hbm_gib=round(hbm / GIB, 3),
      max_total_gib=worst.get("total_gib"),
      worst_function=worst["function"],
  )
  verdict["fitting"] = [r["function"] for r in rows if r["fits"]]
  if bad:
    verdict["failing"] = [r["function"] for r in bad]
    verdict["message"] = failure_message(bad, head, hbm)
  return verdict


def failure_message(bad: list[dict], head: dict, hbm: int) -> str:
  parts = []
  for r in bad:
    g = lambda k: r.get(f"{k}_bytes", 0) / GIB  # noqa: E731
    if "compiler_error" in r:
      parts.append(f"{r['function']}: the TPU compiler ran out of HBM: {r['compiler_error']}")
    elif r["function"] == "resident state":
      parts.append(
          f"the train state ({head['train_state_bytes'] / GIB:.3g} GiB per device) and the "
          f"sampler's weights ({head['sampler_params_bytes'] / GIB:.3g} GiB) alone need "
          f"{g('total'):.3g} GiB per device > {hbm / GIB:.3g} GiB HBM"
      )
    else:
      parts.append(
          f"{r['function']} needs {g('total'):.3g} GiB per device > {hbm / GIB:.3g} GiB HBM "
          f"(arguments {g('argument'):.3g} + outputs {g('output'):.3g} - donated {g('alias'):.3g} + "
          f"temporaries {g('temp'):.3g} + code {g('generated_code'):.3g} + resident "
          f"{g('resident'):.3g} GiB)"
      )
  return (
      f"dry run: the plan does not fit on {head['topology']} ({head['devices']} x "
      f"{head['device_kind']}): "
      + "; ".join(parts)
      + ". Lower the batch (rl.prompts_per_step, rl.group_size, more rl.mini_batches), the lengths "
      "(sampler.max_new_tokens, sampler.prompt_bucket) or shard more (parallel.mesh, "
      "parallel.sampler_mesh)."
  )


def main(config) -> list[dict]:
  """Print the report (JSON lines) and exit with status 1 when the plan does not fit."""
  try:
    rows = plan(config, log=lambda s: print(s, file=sys.stderr, flush=True))
  except (DryRunError, ValueError) as e:  # a bad topology or config value: the message names it
    print(f"dry run: {e}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None
  for r in rows:
    print(json.dumps(r, sort_keys=False), flush=True)
  verdict = rows[-1]
  if verdict["verdict"] != "fits":
    print(verdict["message"], file=sys.stderr, flush=True)
    raise SystemExit(1)
  return rows
