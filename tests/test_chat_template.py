"""Chat templates (fo_rl/data/chat_template.py) render exactly as `transformers.apply_chat_template`.

The reference is transformers itself (tests/requirements.txt) loading the same checkpoint directory; the
template is the project's Qwen3-style fixture (examples/qwen3_style_chat_template.jinja), with thinking
on and off, with and without a system prompt, from `chat_template.jinja` and from
`tokenizer_config.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fo_rl.data import get_task
from fo_rl.data.chat_template import ChatTask, ChatTemplate, resolve

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "examples" / "qwen3_style_chat_template.jinja"
# Plain `{% %}` blocks on indented lines (trim_blocks / lstrip_blocks decide the whitespace), loop
# controls, and `tojson` (transformers' own: no HTML escaping of `<`, `&`).
WHITESPACE_TEMPLATE = """{% for message in messages %}
  {% if message.role == 'system' %}
<<SYS>>{{ message.content }}<</SYS>>
    {% continue %}
  {% endif %}
[{{ message.role }}] {{ message.content | trim }}
{% endfor %}
{{ messages[-1] | tojson }}
{% if add_generation_prompt %}
[assistant]{% if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}

{% endif %}"""
TEMPLATES = {"qwen3_style": FIXTURE.read_text(), "whitespace": WHITESPACE_TEMPLATE}
CONVERSATIONS = [
    [{"role": "user", "content": "What is $\\frac{1}{2} + \\frac{1}{4}$?"}],
    [
        {"role": "system", "content": "Put the final answer in \\boxed{}."},
        {"role": "user", "content": "Solve x^2 = 4 for x > 0 & x < 3."},
    ],
    [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n#### 2"},
        {"role": "user", "content": "and 2+2?"},
    ],
]


def _write_tokenizer(directory: Path) -> None:
  """A small byte-level BPE tokenizer.json with Qwen3-like special tokens."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(["What is 1 + 1? #### 2"] * 10, trainer)
  tok.save(str(directory / "tokenizer.json"))


def _checkpoint(tmp_path: Path, where: str, template: str = "qwen3_style") -> Path:
  d = tmp_path / where
  d.mkdir()
  _write_tokenizer(d)
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "eos_token": "<|im_end|>",
      "pad_token": "<|endoftext|>",
      "unk_token": "<unk>",
  }
  if where == "config":
    config["chat_template"] = TEMPLATES[template]
  else:
    (d / "chat_template.jinja").write_text(TEMPLATES[template])
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  return d


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("where", ["config", "jinja"])
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_renders_as_transformers(tmp_path, template, where, thinking, conversation):
  transformers = pytest.importorskip("transformers")
  d = _checkpoint(tmp_path, where, template)
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(d))
  kwargs = {} if thinking is None else {"enable_thinking": thinking}
  messages = CONVERSATIONS[conversation]
  expected = ref_tok.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True, **kwargs
  )
  ours = ChatTemplate.from_checkpoint(d)
  assert ours is not None and ours.source.endswith(
      "tokenizer_config.json" if where == "config" else "chat_template.jinja"
  )
  assert ours.render_messages(messages, **kwargs) == expected
  # The thinking switch is visible, so the comparison could fail.
  marker = "<think>\n\n</think>\n\n" if template == "qwen3_style" else " /no_think\n"
  assert expected.endswith(marker) == (thinking is False)


def test_render_builds_system_and_user_messages():
  t = ChatTemplate.from_file(FIXTURE)
  assert t.render("Q?", "S.", enable_thinking=False) == (
      "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
      "<|im_start|>assistant\n<think>\n\n</think>\n\n"
  )
  assert t.render("Q?") == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"


def test_special_tokens_reach_the_template(tmp_path):
  d = tmp_path / "ckpt"
  d.mkdir()
  (d / "tokenizer_config.json").write_text(
      json.dumps(
          {
              "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
              "bos_token": {"content": "<s>", "lstrip": False},
              "eos_token": "</s>",
          }
      )
  )
  assert ChatTemplate.from_checkpoint(d).render("hi") == "<s>hi</s>"


def test_no_template_and_resolution(tmp_path):
  d = tmp_path / "ckpt"
  d.mkdir()
  assert ChatTemplate.from_checkpoint(d) is None  # no tokenizer_config.json at all
  (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  assert ChatTemplate.from_checkpoint(d) is None
  assert resolve("auto", str(d)) is None and resolve("auto", None) is None
  assert resolve("none", str(d)) is None
  assert resolve(str(FIXTURE), str(d)).source == str(FIXTURE)
  with pytest.raises(ValueError, match=r"data\.chat_template='/nope\.jinja': no such file"):
    resolve("/nope.jinja", str(d))


@pytest.mark.parametrize(
    "text, match",
    [
        ("{% if %}", r"bad\.jinja, line 1: the chat template does not compile"),
        (
            "{{ raise_exception('no system role') }}",
            r"bad\.jinja: .*failed to render: no system role",
        ),
        ("{{ messages.__class__.__mro__ }}", r"bad\.jinja: .*failed to render"),  # the sandbox
    ],
)
def test_template_errors_name_the_file(tmp_path, text, match):
  path = tmp_path / "bad.jinja"
  path.write_text(text)
  with pytest.raises(ValueError, match=match):
    ChatTemplate.from_file(path).render("x")


def test_chat_task_renders_the_question(tmp_path):
  data = tmp_path / "d.jsonl"
  data.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n")
  base = get_task("jsonl", train_file=str(data))
  task = ChatTask(base, ChatTemplate.from_file(FIXTURE), "S.", {"enable_thinking": False})
  rec = task.load("train")[0]
  assert task.format_prompt(rec) == ChatTemplate.from_file(FIXTURE).render(
      "What is 2+2?", "S.", enable_thinking=False
  )
  assert (
      base.format_prompt(rec) == "Question: What is 2+2?\nAnswer:"
  )  # the task itself is unchanged
  assert task.verify("#### 4", rec) == 1.0 and task.name == "jsonl"
  assert os.fspath(FIXTURE) in ChatTemplate.from_file(FIXTURE).source


def test_rendered_markers_are_single_tokens(tmp_path):
  """The template's markers (<|im_start|>, <|im_end|>) are the tokenizer's special tokens, not their
  characters: fo_rl encodes the rendered text as transformers' tokenizer does."""
  transformers = pytest.importorskip("transformers")
  from fo_rl.data.tokenizer import HFTokenizer

  d = _checkpoint(tmp_path, "jinja")
  (d / "config.json").write_text(json.dumps({"eos_token_id": 2}))
  text = ChatTemplate.from_checkpoint(d).render("1+1?", "S.", enable_thinking=False)
  ours = HFTokenizer(d).encode(text)
  ref = transformers.AutoTokenizer.from_pretrained(str(d))
  assert ours == ref.encode(text, add_special_tokens=False)
  assert ours.count(1) == 3 and ours.count(2) == 2  # <|im_start|> x3, <|im_end|> x2
