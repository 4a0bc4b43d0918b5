"""Chat templates: prompts rendered the way `transformers`' `apply_chat_template` renders them.

    template = ChatTemplate.from_checkpoint("Qwen3-30B-A3B")     # None when it has no template
    text = template.render("What is 1/2 + 1/4?", system_prompt="", enable_thinking=False)
    task = ChatTask(task, template, system_prompt="...", kwargs={"enable_thinking": False})

Where the template comes from (as transformers loads it): `chat_template.jinja` in the checkpoint
directory, else the `chat_template` entry of its `tokenizer_config.json` (a string, or a list of
`{"name", "template"}` of which `default` is used). The template sees `messages` (an optional system
message, then the user's prompt), `add_generation_prompt=True`, `tools=None`, `documents=None`, the
special tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, ...) and the template options
(`data.chat_template_kwargs`, e.g. Qwen3's `enable_thinking`). It is rendered in jinja2's
`ImmutableSandboxedEnvironment` with transformers' settings (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML), so a template cannot reach
Python internals. A template that does not compile or raises is a ValueError naming its file.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Mapping

from fo_rl.data import common

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _environment():
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  def strftime_now(fmt):
    return datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  return None


class ChatTemplate:
  """A compiled chat template; `source` names where it came from (errors name it)."""

  def __init__(self, text: str, source: str, special_tokens: Mapping[str, str] | None = None):
    import jinja2

    self.text, self.source = text, source
    self.special_tokens = dict(special_tokens or {})
    try:
      self._template = _environment().from_string(text)
    except jinja2.TemplateError as e:
      line = f", line {e.lineno}" if getattr(e, "lineno", None) else ""
      raise ValueError(f"{source}{line}: the chat template does not compile: {e}") from None

  @classmethod
  def from_file(cls, path: str | os.PathLike, directory: str | os.PathLike | None = None):
    """The template in `path` (a .jinja file), with the special tokens of `directory`'s config."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
      text = f.read()
    tokens = _special_tokens(os.fspath(directory)) if directory else {}
    return cls(text, path, tokens)

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike) -> "ChatTemplate | None":
    """The checkpoint's template (see the module doc), or None when it has none."""
    directory = os.fspath(directory)
    jinja_path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(jinja_path):
      return cls.from_file(jinja_path, directory)
    config = _tokenizer_config(directory)
    template = config.get("chat_template")
    if isinstance(template, list):
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
      template = named.get("default")
    if not template:
      return None
    if not isinstance(template, str):
      raise ValueError(
          f"{os.path.join(directory, CONFIG_FILE)}: chat_template must be a string or a list of "
          f"{{name, template}}, got {type(template).__name__}"
      )
    return cls(template, os.path.join(directory, CONFIG_FILE), _special_tokens(directory))

  def render_messages(self, messages: list[dict], **kwargs: Any) -> str:
    """The conversation `messages` with a generation prompt, as `apply_chat_template(messages,
    tokenize=False, add_generation_prompt=True, **kwargs)` renders it."""
    import jinja2

    variables = {**self.special_tokens, **kwargs}
    try:
      return self._template.render(
          messages=[dict(m) for m in messages],
          tools=None,
          documents=None,
          add_generation_prompt=True,
          **variables,
      )
    except jinja2.TemplateError as e:
      raise ValueError(f"{self.source}: the chat template failed to render: {e}") from None

  def render(self, prompt: str, system_prompt: str = "", **kwargs: Any) -> str:
    """A user `prompt` (after a system message when `system_prompt` is not '') with a generation
    prompt."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    return self.render_messages(messages, **kwargs)


def _tokenizer_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not a JSON file ({e})") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return config


def _special_tokens(directory: str) -> dict[str, str]:
  """The special tokens a template sees (tokenizer_config.json; special_tokens_map.json fills gaps)."""
  tokens: dict[str, str] = {}
  extra = os.path.join(directory, "special_tokens_map.json")
  sources = [_tokenizer_config(directory)]
  if os.path.isfile(extra):
    with open(extra, encoding="utf-8") as f:
      sources.insert(0, json.load(f))
  for source in sources:  # the later (tokenizer_config.json) wins
    for name in SPECIAL_TOKENS:
      text = _token_text(source.get(name))
      if text is not None:
        tokens[name] = text
  return tokens


def resolve(
    setting: str, checkpoint_dir: str | None, field: str = "data.chat_template"
) -> ChatTemplate | None:
  """The template `data.chat_template` asks for: 'none' -> None; 'auto' -> the checkpoint's (None
  without a checkpoint or a template); a path -> that file."""
  if setting == "none":
    return None
  if setting == "auto":
    return ChatTemplate.from_checkpoint(checkpoint_dir) if checkpoint_dir else None
  if not os.path.isfile(setting):
    raise ValueError(f"{field}={setting!r}: no such file")
  return ChatTemplate.from_file(setting, checkpoint_dir)


class ChatTask:
  """A task whose prompts go through a chat template; everything else is the wrapped task's.

  The user message is the task's own prompt text (`task.format_prompt`), e.g. the JSON Lines
  `Question: ...\\nAnswer:`; `question_only=True` sends the record's raw `prompt` field instead."""

  def __init__(
      self,
      task,
      template: ChatTemplate,
      system_prompt: str = "",
      kwargs: Mapping[str, Any] | None = None,
      question_only: bool = True,
  ):
    self._task, self.template = task, template
    self.system_prompt, self.kwargs = system_prompt, dict(kwargs or {})
    self.question_only = question_only
    self.name = task.name

  def __getattr__(self, name):
    return getattr(self._task, name)

  def format_prompt(self, record) -> str:
    if self.question_only and "prompt" in record:
      prompt = common.text(record["prompt"])
    else:
      prompt = self._task.format_prompt(record)
    return self.template.render(prompt, self.system_prompt, **self.kwargs)
