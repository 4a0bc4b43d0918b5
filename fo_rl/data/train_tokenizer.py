"""Trains the project's SentencePiece tokenizer on procedurally generated task text.

    python -m fo_rl.data.train_tokenizer --output=fo_rl/data/assets/tokenizer.model

The corpus holds prompts and teacher responses (all styles, with and without
mistakes) of every task family over a range of difficulties, plus the JSONL
prompt template. Training is deterministic (single thread, in-memory corpus),
so the committed model is byte-for-byte what this script writes.

Model choices: BPE, `VOCAB_SIZE` pieces including 256 byte-fallback
pieces (any text encodes, nothing maps to unk), digits always single pieces
(`split_digits`), identity normalisation with no dummy prefix and no
whitespace folding (so `decode(encode(s)) == s` exactly), `####` as one
piece, and fixed special ids pad=0, unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Iterator

import sentencepiece as spm

from fo_rl.data import arithmetic, common, countdown, jsonl, sorting

VOCAB_SIZE = 320
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PROBLEMS_PER_SETTING = 300

_SETTINGS = (
    [
        (arithmetic, arithmetic.ArithmeticDifficulty(num_digits=d, ops=ops))
        for d in range(1, 7)
        for ops in ("+", "-", "+-")
    ]
    + [
        (countdown, countdown.CountdownDifficulty(num_numbers=n, max_number=m, max_target=t))
        for n in (2, 3, 4)
        for m, t in ((9, 99), (20, 99), (50, 999))
    ]
    + [
        (sorting, sorting.SortingDifficulty(length=n, max_value=v))
        for n in (3, 5, 8)
        for v in (9, 99, 999)
    ]
)


def corpus() -> Iterator[str]:
  """The training sentences, deterministically (one line of task text each)."""
  for index, (family, difficulty) in enumerate(_SETTINGS):
    rng = common.make_rng("tokenizer-corpus", index)
    for _ in range(PROBLEMS_PER_SETTING):
      problem = family.generate(rng, difficulty)
      yield problem.prompt
      for style in family.STYLES:
        yield family.solve(problem, style)
        yield family.teach(problem, rng, style=style, error_rate=0.5)
  template = jsonl.PROMPT_TEMPLATE.format(prompt="")
  yield from template.split("\n")


def train(vocab_size: int = VOCAB_SIZE) -> bytes:
  """Trains the model and returns its serialized bytes."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=corpus(),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      character_coverage=1.0,
      byte_fallback=True,
      split_digits=True,
      normalization_rule_name="identity",
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      user_defined_symbols=[common.ANSWER_MARKER],
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      num_threads=1,
      shuffle_input_sentence=False,
      input_sentence_size=0,
      minloglevel=2,
  )
  return model.getvalue()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--output", default=os.path.join(os.path.dirname(__file__), "assets", "tokenizer.model")
  )
  parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
  args = parser.parse_args(argv)
  data = train(args.vocab_size)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "wb") as f:
    f.write(data)
  print(f"wrote {args.output} ({len(data)} bytes, vocab_size={args.vocab_size})")


if __name__ == "__main__":
  main()
