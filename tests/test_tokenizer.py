"""Tests for the committed SentencePiece tokenizer and its training script."""

import random

import pytest

from fo_rl.data import Tokenizer, get_task, train_tokenizer
from fo_rl.data.tokenizer import DEFAULT_MODEL_PATH

PROMPT_BUDGET, RESPONSE_BUDGET = 24, 40


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.default()


def test_committed_model_is_what_the_script_trains(tmp_path):
  with open(DEFAULT_MODEL_PATH, "rb") as f:
    committed = f.read()
  assert len(committed) < 100_000
  assert train_tokenizer.train() == committed
  out = tmp_path / "tok.model"
  train_tokenizer.main([f"--output={out}"])
  assert out.read_bytes() == committed


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == train_tokenizer.VOCAB_SIZE
  assert tok.encode("1+2", add_bos=True, add_eos=True)[0] == tok.bos_id
  assert tok.encode("1+2", add_bos=True, add_eos=True)[-1] == tok.eos_id
  assert tok.decode([tok.bos_id] + tok.encode("1+2") + [tok.eos_id, tok.pad_id]) == "1+2"


@pytest.mark.slow
def test_corpus_round_trips_without_unk_or_bytes(tok):
  lines = list(train_tokenizer.corpus())
  assert len(lines) > 10_000
  for line in lines:
    ids = tok.encode(line)
    assert tok.decode(ids) == line
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.unk_id not in ids
    assert not any(tok.is_byte(i) for i in ids), line


def test_arbitrary_text_round_trips(tok):
  rng = random.Random(0)
  alphabet = "abcXYZ 0123456789+-*/=#()[]{}.,;:!?'\"\n\t  ünïcødé€😀"
  for _ in range(200):
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids and all(0 <= i < tok.vocab_size for i in ids)


def test_digits_are_single_tokens(tok):
  for digit in "0123456789":
    (token,) = tok.encode(digit)
    assert tok.id_to_piece(token) == digit
  ids = tok.encode("reach 1234 with 56: 7+8+1=16 #### 90")
  digit_pieces = [tok.id_to_piece(i) for i in ids if any(c.isdigit() for c in tok.id_to_piece(i))]
  assert "".join(digit_pieces) == "1234567811690"
  assert all(len(p) == 1 for p in digit_pieces)


@pytest.mark.parametrize("name", ["arithmetic", "countdown", "sorting"])
def test_default_difficulty_fits_token_budget(tok, name):
  task = get_task(name)
  rng = random.Random(0)
  for record in task.generate("train", 300):
    assert len(tok.encode(task.format_prompt(record))) <= PROMPT_BUDGET
    for variant in ("oracle", "careful", "terse", "noisy"):
      assert len(tok.encode(task.teacher(record, variant, rng))) <= RESPONSE_BUDGET
