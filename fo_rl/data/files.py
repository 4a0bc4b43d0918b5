"""Users' data files: JSON Lines (`.jsonl`, `.json`, anything else) and Parquet (`.parquet`).

    records = load_records("train.parquet", prompt_field="problem", answer_field="solution")

Each row gives a record `{"prompt", "answer" (the final answer), "solution" (the raw answer field),
"line"}` (see `fo_rl.data.jsonl`). `line` is the 1-based line of a JSON Lines file, or the 1-based row
of a Parquet file. Every error names the file and the line (row): a missing field, a value of the wrong
type, an unparsable line, an empty file; a Parquet file that pyarrow cannot read names the file.
"""

from __future__ import annotations

import os
from typing import Any

from fo_rl.data import jsonl

PARQUET_SUFFIXES = (".parquet", ".pq")


def is_parquet(path: str | os.PathLike) -> bool:
  return os.fspath(path).lower().endswith(PARQUET_SUFFIXES)


def load_parquet(
    path: str | os.PathLike, prompt_field: str = "prompt", answer_field: str = "answer"
) -> list[dict[str, Any]]:
  """Records of a Parquet file (pyarrow); only the two columns are read."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = os.fspath(path)
  try:
    schema = pq.read_schema(path)
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
  for field in (prompt_field, answer_field):
    if field not in schema.names:
      raise ValueError(f"{path}, row 1: missing key {field!r} (columns: {schema.names})")
  try:
    table = pq.read_table(path, columns=[prompt_field, answer_field])
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
  records = []
  for row, obj in enumerate(table.to_pylist(), start=1):
    obj = {k: v for k, v in obj.items() if v is not None}  # a null cell is a missing field
    fail = lambda m, row=row: ValueError(f"{path}, row {row}: {m}")  # noqa: E731
    records.append(jsonl.make_record(obj, prompt_field, answer_field, fail, row))
  if not records:
    raise ValueError(f"{path}, row 1: empty file: no records")
  return records


def load_records(
    path: str | os.PathLike, prompt_field: str = "prompt", answer_field: str = "answer"
) -> list[dict[str, Any]]:
  """Records of a JSON Lines or (by suffix) Parquet file."""
  if is_parquet(path):
    return load_parquet(path, prompt_field, answer_field)
  return jsonl.load_jsonl(path, prompt_field, answer_field)
