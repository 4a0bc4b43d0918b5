"""`--config.dry_run=True`: ahead-of-time compilation of the RL step for a TPU topology, on this CPU machine.

Needs libtpu (`pip install -r requirements-tpu.txt`, ~690 MB installed, so not part of
tests/requirements.txt): without it these tests skip, except under CI=true where they fail.

The full Qwen3-30B-A3B plan (48 layers) is not compiled here: the TPU compiler spends ~10 s of CPU per
expert-sort of the dropless MoE dispatch, and the step has a few hundred of them (48 layers x old pass,
update with remat, prefill, decode), i.e. tens of minutes on 2 cores. The test compiles the same recipe
with 1 layer (every per-layer activation and buffer is there, the weights are 1/48th), and checks that the
full-depth train state and sampler weights plus that per-layer peak fit; the full numbers are in the
README ("Running on Cloud TPU").
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUNCTIONS = [
    "trainer.old_pass",
    "trainer.update",
    "sampler.update_weights",
    "sampler.prefill",
    "sampler.decode",
]

try:
  import libtpu  # noqa: F401

  HAVE_LIBTPU = True
except ImportError:
  HAVE_LIBTPU = False


@pytest.fixture(autouse=True)
def _need_libtpu():
  if HAVE_LIBTPU:
    return
  msg = "libtpu is not installed (pip install -r requirements-tpu.txt)"
  if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    pytest.fail(msg + ": CI must run the dry-run tests")
  pytest.skip(msg)


def _load(rel):
  spec = importlib.util.spec_from_file_location(
      "dry_run_cfg_" + os.path.basename(rel)[:-3], os.path.join(ROOT, rel)
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _main(config, *args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  return subprocess.run(
      [sys.executable, "-m", "fo_rl.main", f"--config={config}", "--config.dry_run=True", *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def _json_lines(stdout):
  return [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]


@pytest.mark.tpu_compile
def test_tiny_dry_run_prints_memory_per_function():
  t0 = time.time()
  p = _main("configs/qwen3_30b_a3b.py:tiny")
  assert p.returncode == 0, p.stderr[-4000:]
  rows = _json_lines(p.stdout)
  assert [r["function"] for r in rows[:-1]] == FUNCTIONS
  for r in rows[:-1]:
    for k in (
        "argument_bytes",
        "output_bytes",
        "alias_bytes",
        "temp_bytes",
        "generated_code_bytes",
        "resident_bytes",
        "total_bytes",
        "total_gib",
        "hbm_gib",
        "fits",
        "compile_seconds",
    ):
      assert k in r, (r["function"], k)
    assert r["total_bytes"] == (
        r["argument_bytes"]
        + r["output_bytes"]
        - r["alias_bytes"]
        + r["temp_bytes"]
        + r["generated_code_bytes"]
        + r["resident_bytes"]
    )
    assert r["fits"] and r["hbm_gib"] == 95.0 and 0 < r["total_bytes"] < 95 * 2**30
  # Compute: the model's analytic FLOPs per chip and the time at the v5p's peak (dry_run.CHIPS); the
  # compiled program's own count with its loops (the scan over layers) and kernels (splash, ragged-dot)
  # counted (fo_rl/hlo_cost.py), the ratio, and the roofline; XLA's own count beside them.
  from fo_rl import dry_run

  _, peak, bandwidth = dry_run.CHIPS["TPU v5"]
  for r in rows[:-1]:
    assert r["xla_flops"] >= 0 and r["xla_bytes"] > 0 and r["hlo_bytes"] > 0, r
    assert r["hlo_unknown_loops"] == 0 and r["hlo_uncounted_kernels"] == [], r
    assert r["roofline_seconds"] == round(max(r["hlo_flops"] / peak, r["hlo_bytes"] / bandwidth), 4)
    if r["function"] == "sampler.update_weights":
      assert r["model_flops"] == 0 and "model_seconds" not in r and "flops_ratio" not in r
      continue
    assert r["model_flops"] > 0 and r["model_seconds"] == round(r["model_flops"] / peak, 4)
    assert r["hlo_loops"] >= 1 and r["hlo_kernels"] >= 1 and r["hlo_kernel_flops"] > 0, r
    # At least the model's work (more: the sequence padded to the kernel's 128 and remat), and far
    # more than XLA's own count, which takes each loop body once.
    assert r["flops_ratio"] >= 1 and r["hlo_flops"] > r["xla_flops"], r
  decode = rows[FUNCTIONS.index("sampler.decode")]
  assert decode["hlo_bounded_loops"] >= 1 and "bound" in decode["flops_ratio_note"]
  # The update donates the train state: its outputs alias its arguments.
  upd = rows[FUNCTIONS.index("trainer.update")]
  assert upd["alias_bytes"] > 0
  v = rows[-1]
  assert v["verdict"] == "fits"
  assert (v["topology"], v["devices"], v["device_kind"], v["processes"]) == (
      "v5p:2x2x1",
      4,
      "TPU v5",
      1,
  )
  assert v["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}
  assert v["max_total_gib"] == max(r["total_gib"] for r in rows[:-1])
  assert v["train_state_bytes"] > 0 and v["sampler_params_bytes"] > 0
  print(f"tiny dry run: {time.time() - t0:.0f}s")


@pytest.mark.tpu_compile
def test_plan_that_cannot_fit_fails_with_the_numbers():
  # Qwen3-235B-A22B's 1.4 TB train state on 4 v5p chips: refused before compiling anything.
  p = _main(
      "configs/qwen3_235b_a22b.py",
      "--config.parallel.topology=v5p:2x2x1",
      "--config.parallel.mesh.expert=4",
      timeout=300,
  )
  assert p.returncode == 1, (p.stdout[-2000:], p.stderr[-2000:])
  v = _json_lines(p.stdout)[-1]
  assert v["verdict"] == "does not fit" and v["failing"] == ["resident state"]
  assert "dry run: the plan does not fit on v5p:2x2x1 (4 x TPU v5)" in p.stderr
  assert "the train state (" in p.stderr and "> 95 GiB HBM" in p.stderr


# Not marked tpu_compile: it fails before compiling, in seconds, so the fast tier reaches
# fo_rl/dry_run.py (it still needs libtpu, like every test here).
def test_bad_topology_or_mesh_is_a_clear_error():
  p = _main("configs/qwen3_30b_a3b.py:tiny", "--config.parallel.topology=v5p-64", timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "parallel.topology='v5p-64'" in p.stderr and "v5p:2x4x4" in p.stderr
  p = _main("configs/qwen3_30b_a3b.py", "--config.parallel.topology=v5p:2x2x1", timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  assert "dry run: parallel.mesh:" in p.stderr and "cannot fill 4 devices" in p.stderr


@pytest.mark.tpu_compile
@pytest.mark.slow  # minutes of TPU compilation on 2 cores
def test_qwen3_30b_a3b_fits_a_v5p_64():
  from fo_rl import dry_run

  c = _load("configs/qwen3_30b_a3b.py").get_config("v5p-64")
  assert c.parallel.topology == "v5p:2x4x4"
  full = dry_run.resident_bytes(c)  # the 48-layer train state and sampler weights, per chip
  # The 48-layer KV cache is too big for windowed decode (SamplerConfig.decode_segments), a 1-layer one
  # is not: keep the 1-layer stand-in's decode as the full model's.
  c.sampler.decode_segments = 1
  c.model.num_layers = 1
  t0 = time.time()
  # As `python -m fo_rl.main` compiles it (conftest sets "highest", which TPU's bf16 grouped matmul
  # kernel rejects).
  with jax.default_matmul_precision("default"):
    rows = dry_run.plan(c)
  v = rows[-1]
  print(f"30B x 1 layer on v5p-64: {time.time() - t0:.0f}s", json.dumps(rows))
  assert v["verdict"] == "fits", v.get("message")
  assert (v["devices"], v["processes"], v["mesh"]) == (
      32,
      8,
      {"data": 1, "fsdp": 4, "expert": 8, "tensor": 1},
  )
  # Each function's total counts the train state and the sampler's weights once (the weight sync: the
  # sampler's twice, old and new): swap the 1-layer ones for the full-depth ones.
  hbm = 95 * 2**30
  for r in rows[:-1]:
    deeper = full - v["train_state_bytes"] - v["sampler_params_bytes"]
    times = 2 if r["function"] == "sampler.update_weights" else 1
    assert r["total_bytes"] + times * deeper < hbm, (r["function"], r["total_bytes"], deeper)
  # The same compiled plan judged against a smaller chip: a clear message naming the function.
  small = dry_run.judge(rows[:-1], v, 1 * 2**30)
  assert small["verdict"] == "does not fit" and "trainer.update" in small["failing"]
  assert set(small["fitting"]) == {r["function"] for r in rows[:-1] if r["total_bytes"] <= 2**30}
  assert set(small["fitting"]).isdisjoint(small["failing"])
  assert (
      "trainer.update needs " in small["message"]
      and "GiB per device > 1 GiB HBM" in small["message"]
  )
  assert "temporaries" in small["message"]


@pytest.mark.tpu_compile
def test_paper_rollout_engine_fits_a_v5p_64_at_32k_tokens():
  """The 30B paper recipe samples with the paged engine (responses up to 32,768 tokens): its
  sampler.prefill (a step with prefill chunks beside every decode slot) and sampler.decode (a burst
  of decode steps) compile for the recipe's v5p-64, one engine shard per chip, each with the page pool
  the config sizes, updated in place, and fit: here at 1 layer, with the other 47 layers' pool and
  route columns and the full-depth weights added; README "Running on Cloud TPU" has the full-depth
  compile."""
  from fo_rl import dry_run

  c = _load("configs/qwen3_30b_a3b.py").get_config("paper")
  assert c.sampler.engine == "paged" and c.sampler.max_new_tokens == 32768
  full, layers = dry_run.resident_bytes(c), c.model.num_layers
  c.model.num_layers = 1
  t0 = time.time()
  with jax.default_matmul_precision("default"):
    rows = dry_run.plan(c, functions=("sampler.prefill", "sampler.decode"))
  v = rows[-1]
  print(f"paper engine x 1 layer on v5p-64: {time.time() - t0:.0f}s", json.dumps(rows))
  assert v["verdict"] == "fits", v.get("message")
  assert [r["function"] for r in rows[:-1]] == ["sampler.prefill", "sampler.decode"]
  for r in rows[:-1]:
    assert (r["engine"], r["shards"], r["seq_len"]) == ("paged", 32, 1024 + 32768), r
    assert r["pages_per_shard"] == c.sampler.num_pages and r["page_size"] == c.sampler.page_size
    assert r["alias_bytes"] >= r["pool_bytes_per_shard"]  # the pool is updated in place
    assert r["hlo_uncounted_kernels"] == [] and r["hlo_kernel_flops"] > 0  # paged attention counted
    route_cols = (1024 // 32) * r["seq_len"] * c.model.num_experts_per_tok  # a layer's, int8
    deeper = full - v["train_state_bytes"] - v["sampler_params_bytes"]
    deeper += (layers - 1) * (r["pool_bytes_per_shard"] + route_cols)
    assert r["total_bytes"] + deeper < 95 * 2**30, (r["function"], r["total_bytes"], deeper)


@pytest.mark.tpu_compile
def test_hlo_cost_counts_tpu_matmuls_and_kernels():
  """fo_rl/hlo_cost.py on programs compiled for one TPU v5p chip: a projection (XLA:TPU writes it as a
  padded convolution) counts 2 x B x T x D x N x H exactly; the grouped matmul's kernels count
  2 x rows x D x F per matmul (ragged_dot's forward kernel by its shapes, megablox's forward and its
  backward's two kernels by their cost estimates); causal splash attention counts 4 x heads x T x T x
  head dim times the share of key blocks on or below the diagonal (3 of 4 blocks at T = 2 x 512)."""
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from fo_rl import dry_run
  from fo_rl.hlo_cost import program_cost
  from fo_rl.model import attention, moe

  mesh = Mesh(np.array(dry_run.topology_devices("v5p:2x2x1")[:1]), ("x",))
  sds = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(
      shape, dt, sharding=NamedSharding(mesh, P())
  )

  def cost(f, *args):
    # the TPU's own matmul precision for bf16 (conftest.py asks for "highest": Mosaic rejects it)
    with jax.default_matmul_precision("default"):
      return program_cost(jax.jit(f).lower(*args).compile().as_text())

  B, T, D, N, H = 2, 256, 512, 8, 128
  c = cost(lambda x, w: jnp.einsum("btd,dnh->btnh", x, w), sds(B, T, D), sds(D, N, H))
  assert c.flops == 2 * B * T * D * N * H and c.kernels == 0

  M, F, G = 1024, 256, 4
  gs = sds(G, dt=jnp.int32)
  c = cost(lambda x, w, g: jax.lax.ragged_dot(x, w, g), sds(M, D), sds(G, D, F), gs)
  assert c.flops == c.kernel_flops == 2 * M * D * F and c.kernels >= 1 and not c.uncounted_kernels

  def mb_loss(x, w, g):
    return jnp.sum(moe._megablox_gmm(x, w, g, jnp.bfloat16, interpret=False).astype(jnp.float32))

  c = cost(jax.grad(mb_loss, argnums=(0, 1)), sds(M, D), sds(G, D, F), gs)
  assert c.kernel_flops == 2 * (2 * M * D * F) and not c.uncounted_kernels  # dx (gmm) + dw (tgmm)
  c = cost(
      lambda x, w, g: moe._megablox_gmm(x, w, g, jnp.bfloat16, False), sds(M, D), sds(G, D, F), gs
  )
  assert c.kernel_flops == 2 * M * D * F

  T, Nq, K = 1024, 4, 2
  q, kv = sds(1, T, Nq, H), sds(1, T, K, H)
  mask = sds(1, T, dt=jnp.bool_)
  c = cost(lambda q, k, v, m: attention.splash(q, k, v, m, interpret=False), q, kv, kv, mask)
  assert c.kernel_flops == 4 * Nq * T * T * H * 3 / 4 and not c.uncounted_kernels

  # The paged engine's ragged paged attention kernel: its bound, every query over every position of
  # its sequence's page-table row.
  from fo_rl.model import paged_attention as PA

  D_, R_, C_, W_, ps, Nh = 8, 2, 16, 8, 16, 8
  i32 = lambda *shape: sds(*shape, dt=jnp.int32)
  batch = PA.PagedBatch(
      i32(D_ + R_ * C_),
      sds(D_ + R_ * C_, dt=jnp.bool_),
      i32(D_ + R_, W_),
      i32(D_ + R_),
      i32(4),
      i32(4),
      num_decode=D_,
      chunk=C_,
      impl="pallas",
  )
  blocks = dict(num_kv_pages_per_block=4, num_queries_per_block=16)
  with jax.set_mesh(mesh):  # (Mosaic reads the chip from the mesh; the engine's runs in shard_map)
    c = cost(
        lambda q, pages, b: PA.attend_pallas(q, pages, b, **blocks),
        sds(D_ + R_ * C_, Nh, H),
        sds(32, ps, 2 * K, H),
        batch,
    )
  assert c.kernel_flops == 4 * (D_ + R_ * C_) * Nh * H * W_ * ps and not c.uncounted_kernels
