"""Qwen3-235B-A22B (94 layers, 128 experts, top-8) RL on Cloud TPU: MiniRL, N = 4, R3, FP8 sampler.

  python -m fo_rl.main --config=configs/qwen3_235b_a22b.py --config.dry_run=True           # v6e-256, any CPU
  python -m fo_rl.main --config=configs/qwen3_235b_a22b.py:v5p-64 --config.dry_run=True    # v5p-64
  launchers/run.sh --name=q235 -- python -m fo_rl.main --config=configs/qwen3_235b_a22b.py --workdir=DIR
  python -m fo_rl.main --config=configs/qwen3_235b_a22b.py:tiny --workdir=/tmp/tiny          # CPU, for tests

Architecture: third_party/qwen3_moe/qwen3_235b_a22b.config.json, bf16 params and compute, AdamW moments
in bf16: the train state is 6 bytes x 235B = 1.4 TB. Weights: the Hugging Face checkpoint in
`init.hf_checkpoint` (a local directory on every worker, see configs/qwen3_30b_a3b.py). No cold start.

Topologies (the config argument picks one):
  v6e-256 (default): 256 v6e chips ("v6e:16x16", 31.25 GiB each). Trainer mesh fsdp 16 x expert 16;
          sampler mesh expert 64 x tensor 4 (two FP8 experts per shard, attention heads and expert hidden
          dims split 4 ways). 128 prompts x 8 samples = 1024 responses per step, 4 mini-batches of 256.
  v5p-64: 32 v5p chips ("v5p:2x4x4", 95 GiB each). Trainer fsdp 4 x expert 8 (the state alone is
          ~44 GiB per chip); sampler expert 8 x tensor 4. 32 prompts x 8 samples = 256 responses,
          4 mini-batches of 64.
Sequence: prompts up to 256 tokens, responses up to 512: 768 positions per row (the float32 logits
[B, 768, 151936] are 0.47 GB per row). `--config.dry_run=True` prints the per-chip memory of each compiled
function; compiling 94 layers for 256 chips takes several minutes on a CPU.
"""

from fo_rl.config import base_config, hf_model, tiny_moe, variant

TOPOLOGIES = {
    "v6e-256": dict(
        topology="v6e:16x16",
        mesh={"data": 1, "fsdp": -1, "expert": 16, "tensor": 1},
        sampler_mesh={"data": 1, "fsdp": 1, "expert": -1, "tensor": 4},
        prompts_per_step=128,
        eval_prompts=256,
    ),
    "v5p-64": dict(
        topology="v5p:2x4x4",
        mesh={"data": 1, "fsdp": -1, "expert": 8, "tensor": 1},
        sampler_mesh={"data": 1, "fsdp": 1, "expert": -1, "tensor": 4},
        prompts_per_step=32,
        eval_prompts=64,
    ),
}


def get_config(arg: str = ""):
  arg = variant(arg, ("", "tiny", *TOPOLOGIES), __file__)
  c = base_config()
  c.name = "qwen3_235b_a22b"
  c.model = hf_model(
      "qwen3_moe/qwen3_235b_a22b.config.json",
      dtype="bfloat16",
      param_dtype="bfloat16",
      remat=True,
      scan_layers=True,
  )
  c.init.hf_checkpoint = "checkpoints/Qwen3-235B-A22B"
  c.sft.enabled = False
  c.data.task = "countdown"
  c.data.options = {}
  c.sampler.weight_dtype = "float8_e4m3fn"
  c.sampler.prompt_bucket = 256
  c.sampler.gen_bucket = 512
  c.sampler.max_new_tokens = 512
  c.rl.steps = 100
  c.rl.group_size = 8
  c.rl.mini_batches = 4
  c.rl.replay = "r3"
  c.optim.learning_rate = 5e-7
  c.optim.warmup_steps = 10
  c.eval.every = 20
  c.eval.samples = 4
  c.checkpoint.every = 10
  if arg == "tiny":
    return tiny_moe(c)
  topo = TOPOLOGIES[arg or "v6e-256"]
  c.parallel.topology = topo["topology"]
  c.parallel.mesh = topo["mesh"]
  c.parallel.sampler_mesh = topo["sampler_mesh"]
  c.rl.prompts_per_step = topo["prompts_per_step"]
  c.eval.num_prompts = topo["eval_prompts"]
  return c
