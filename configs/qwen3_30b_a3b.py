"""Qwen3-30B-A3B (48 layers, 128 experts, top-8) RL on Cloud TPU: MiniRL, N = 4, R3, FP8 sampler.

  python -m fo_rl.main --config=configs/qwen3_30b_a3b.py --config.dry_run=True           # v5p-64, any CPU
  python -m fo_rl.main --config=configs/qwen3_30b_a3b.py:v6e-256 --config.dry_run=True   # v6e-256
  launchers/run.sh --name=q30 -- python -m fo_rl.main --config=configs/qwen3_30b_a3b.py --workdir=gs://B/q30
  python -m fo_rl.main --config=configs/qwen3_30b_a3b.py:tiny --workdir=/tmp/tiny          # CPU, for tests
  python -m fo_rl.main --config=configs/qwen3_30b_a3b.py:paper --config.dry_run=True     # the paper's setting
  python -m fo_rl.main --config=configs/qwen3_30b_a3b.py:paper_n8 --config.dry_run=True  # ... global batch 8x

Architecture: third_party/qwen3_moe/qwen3_30b_a3b.config.json (the published config.json), bf16 params,
bf16 compute (logits, router and softmaxes in float32), AdamW moments in bf16. Weights: the Hugging Face
checkpoint in `init.hf_checkpoint`, a local directory on every worker holding config.json, the
*.safetensors and tokenizer.json, e.g. fetched on all workers with
`launchers/run.sh --name=fetch -- huggingface-cli download Qwen/Qwen3-30B-A3B --local-dir
checkpoints/Qwen3-30B-A3B` (or a gcsfuse mount of a bucket holding it). No cold start: RL starts from
the checkpoint.

Topologies (the config argument picks one; the dry run compiles for `parallel.topology`):
  v5p-64  (default): 32 v5p chips ("v5p:2x4x4", 95 GiB HBM each, 8 hosts). Trainer mesh fsdp 4 x expert 8
          (16 of the 128 experts per expert shard, their embed dim split 4 ways); sampler mesh
          data 4 x expert 8. 32 prompts x 8 samples = 256 responses per step, 4 mini-batches of 64.
  v6e-256: 256 v6e chips ("v6e:16x16", 31.25 GiB each, 64 hosts). Trainer fsdp 16 x expert 16;
          sampler data 16 x expert 16. 128 prompts x 8 samples = 1024 responses, 4 mini-batches of 256.
Sequence: prompts up to 256 tokens (sampler.prompt_bucket), responses up to 1024 (max_new_tokens):
1280 positions per row. The trainer's log-probs come from the hidden states 256 positions at a time
(`model.logits_chunk`), so no pass holds the float32 logits [B, 1280, 151936] (0.78 GB per row): on
v5p-64 this took the old-logprob pass from 26.3 to 20.8 GiB per chip (measured by the dry run);
`--config.dry_run=True` prints the per-chip numbers (README, "Running on Cloud TPU").

The paper's own setting (arXiv 2512.01374, section 5; algorithms.md "The paper's setup"):
  paper:    64 prompts x 16 samples = 1,024 responses per mini-batch, N = 1 (on-policy), prompts up to
            1,024 tokens, responses up to 32,768 (33,792 positions per row), FP8 sampler, MiniRL without
            routing replay (the paper's on-policy finding: replay adds nothing there).
  paper_n8: the same mini-batch, global batch 8x (512 prompts, 8,192 responses, N = 8), MiniRL + R3 (the
            paper's finding at N = 4 and 8).
  Both on v5p-64 (32 chips): the train state (bf16 params and Adam moments, 183 GB) and the FP8 sampler's
  weights take ~10 GiB per chip there, and a micro-batch of 32 rows (`trainer.micro_batches` = 32: one
  33,792-token row per chip at a time, with remat, splash attention and chunked log-probs; packed rows,
  so only the micro-batches that hold tokens run) already needs 68 GiB of temporaries per chip in the
  update, most of them the expert-parallel dispatch's worst-case buffers; a smaller slice (v5p-32, 16
  chips) would have to fit two rows per chip per micro-batch or a 16-way batch split. Measured by the
  dry run at full depth (2026-12-01, README "Running on Cloud TPU"; packed rows, int8 routes), per chip
  of 95 GiB: paper old pass 44.0 GiB, update 80.2 GiB; paper_n8 old pass 49.9 GiB, update 84.1 GiB
  (10.9 GiB of headroom; the step's R3 routes, int8 [8192, 33792, 48, 8], take 3.1 GiB per chip). The
  sampler is the paged rollout engine (`sampler.engine="paged"`; the static sampler's full-length
  cache per row does not fit), one shard per chip: 64 decode slots and 8,192 pages of 64 positions
  (48 GiB of bf16 KV, 524,288 positions) per chip, prefill chunks of 256 tokens x 4. Dry run at full
  depth (2026-12-01): paper prefill step 62.8 GiB, decode burst 76.7 GiB; paper_n8 67.0 / 79.2 GiB.
"""

from fo_rl.config import base_config, hf_model, tiny_moe, variant

TOPOLOGIES = {
    "v5p-64": dict(
        topology="v5p:2x4x4",
        mesh={"data": 1, "fsdp": -1, "expert": 8, "tensor": 1},
        sampler_mesh={"data": -1, "fsdp": 1, "expert": 8, "tensor": 1},
        prompts_per_step=32,
        eval_prompts=64,
    ),
    "v6e-256": dict(
        topology="v6e:16x16",
        mesh={"data": 1, "fsdp": -1, "expert": 16, "tensor": 1},
        sampler_mesh={"data": -1, "fsdp": 1, "expert": 16, "tensor": 1},
        prompts_per_step=128,
        eval_prompts=256,
    ),
}


def get_config(arg: str = ""):
  arg = variant(arg, ("", "tiny", "paper", "paper_n8", *TOPOLOGIES), __file__)
  c = base_config()
  c.name = "qwen3_30b_a3b"
  c.model = hf_model(
      "qwen3_moe/qwen3_30b_a3b.config.json",
      dtype="bfloat16",
      param_dtype="bfloat16",
      remat=True,
      scan_layers=True,
  )
  c.model.logits_chunk = 256  # log-probs without the [B, T, V] logits (fo_rl/model/logprobs.py)
  c.init.hf_checkpoint = "checkpoints/Qwen3-30B-A3B"
  c.sft.enabled = False
  c.data.task = "countdown"
  c.data.options = {}
  c.sampler.weight_dtype = "float8_e4m3fn"
  c.sampler.prompt_bucket = 256
  c.sampler.gen_bucket = 1024
  c.sampler.max_new_tokens = 1024
  c.rl.steps = 200
  c.rl.group_size = 8
  c.rl.mini_batches = 4
  c.rl.replay = "r3"
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 10
  c.eval.every = 20
  c.eval.samples = 4
  c.checkpoint.every = 10
  if arg == "tiny":
    return tiny_moe(c)
  if arg in ("paper", "paper_n8"):
    n = 8 if arg == "paper_n8" else 1
    c.name = f"qwen3_30b_a3b_{arg}"
    c.sampler.prompt_bucket = 1024
    c.sampler.gen_bucket = 32768
    c.sampler.max_new_tokens = 32768
    c.sampler.max_prompt_len = 1024
    c.rl.group_size = 16
    c.rl.mini_batches = n
    c.rl.replay = "r3" if n > 1 else "none"
    c.trainer.micro_batches = 32
    # The paged rollout engine (fo_rl/sampler/engine.py), one shard per chip: 64 decode slots and a
    # pool of 8,192 pages of 64 positions (524,288 positions, 48 GiB of bf16 KV) per chip.
    c.sampler.engine = "paged"
    c.sampler.num_slots = 64
    c.sampler.page_size = 64
    c.sampler.num_pages = 8192
    c.sampler.prefill_chunk = 256
    c.sampler.prefill_rows = 4
    topo = dict(TOPOLOGIES["v5p-64"], prompts_per_step=64 * n, eval_prompts=64)
  else:
    topo = TOPOLOGIES[arg or "v5p-64"]
  c.parallel.topology = topo["topology"]
  c.parallel.mesh = topo["mesh"]
  c.parallel.sampler_mesh = topo["sampler_mesh"]
  c.rl.prompts_per_step = topo["prompts_per_step"]
  c.eval.num_prompts = topo["eval_prompts"]
  return c
