"""A thin wrapper around the project's SentencePiece model.

`Tokenizer.default()` loads the committed `assets/tokenizer.model` (made
by `fo_rl.data.train_tokenizer`). Encoding never adds BOS/EOS by itself and
`decode(encode(text)) == text` for any text (byte fallback, no
normalisation); special ids are pad=0, unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import os
from typing import Sequence

import sentencepiece as spm

DEFAULT_MODEL_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.model"
)


class Tokenizer:
  """Encode/decode text with a SentencePiece model."""

  def __init__(self, model: str | os.PathLike | bytes):
    """`model` is a path to a `.model` file or its serialized bytes."""
    if isinstance(model, bytes):
      self._sp = spm.SentencePieceProcessor(model_proto=model)
    else:
      self._sp = spm.SentencePieceProcessor(model_file=os.fspath(model))
    for name in ("pad_id", "bos_id", "eos_id"):
      if getattr(self, name) < 0:
        raise ValueError(f"tokenizer model has no {name[:-3]} piece")

  @classmethod
  def default(cls) -> "Tokenizer":
    """The committed project tokenizer."""
    return cls(DEFAULT_MODEL_PATH)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`, optionally with BOS prepended / EOS appended."""
    ids = self._sp.encode(text)
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; pad/bos/eos (control pieces) decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.id_to_piece(int(token_id))

  def is_byte(self, token_id: int) -> bool:
    """Whether `token_id` is a byte-fallback piece (text outside the trained vocabulary)."""
    return self._sp.is_byte(int(token_id))


class HFTokenizer:
  """A Hugging Face checkpoint's `tokenizer.json` (the `tokenizers` library), behind the same
  surface as `Tokenizer`. EOS is the checkpoint's `eos_token_id` (generation_config.json, else
  config.json; the first one when it lists several; None when neither names one); a tokenizer without
  a BOS token (Qwen3) never prepends one."""

  def __init__(self, directory: str | os.PathLike):
    import json

    from tokenizers import Tokenizer as _Tok

    directory = os.fspath(directory)
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
      raise ValueError(f"HF checkpoint {directory!r}: no tokenizer.json")
    self._tok = _Tok.from_file(path)
    ids: dict = {}
    for name in ("config.json", "generation_config.json"):  # the later file wins
      p = os.path.join(directory, name)
      if os.path.exists(p):
        with open(p) as f:
          d = json.load(f)
        ids.update(
            {
                k: d[k]
                for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if d.get(k) is not None
            }
        )
    first = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731
    # None when the checkpoint names no EOS (run.py, which stops sampling at EOS, rejects that).
    self.eos_id = int(first(ids["eos_token_id"])) if "eos_token_id" in ids else None
    pad = ids.get("pad_token_id", self.eos_id)
    self.pad_id = None if pad is None else int(first(pad))
    self.bos_id = None  # Qwen3 tokenizers add no BOS

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    del add_bos  # no BOS token
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return list(ids) + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id))
