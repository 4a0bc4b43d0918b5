"""Training-curve plots (PNG) from metrics rows (see fo_rl.metrics_writer).

Rendering uses matplotlib's Agg canvas directly (`matplotlib.figure.Figure` +
`FigureCanvasAgg`), so no display is needed, pyplot's global state is never
touched and the process-wide backend is not changed.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["plot_curves", "DEFAULT_PANELS"]

# Panel title -> metric keys drawn in it (in order).
DEFAULT_PANELS: dict[str, tuple[str, ...]] = {
    "training reward": ("reward_mean",),
    "held-out accuracy": ("eval/greedy_accuracy", "eval/mean_accuracy"),
    "token entropy": ("entropy",),
    "train-infer KL": ("train_infer_kl",),
    "clip fraction": ("clip_frac_high", "clip_frac_low"),
}
# Panels that also get a "sum" line (at steps where all their keys are present).
DEFAULT_SUM_PANELS: tuple[str, ...] = ("clip fraction",)


def _finite_number(v: Any) -> float | None:
  """float(v) for numeric scalars (python / numpy / jax), None otherwise or
  when not finite (NaN / inf points are not drawn)."""
  if v is None or isinstance(v, (bool, str, bytes, list, tuple, dict)):
    return None
  if getattr(v, "ndim", 0) != 0:
    return None
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


def _series(rows: Sequence[Mapping[str, Any]], key: str, step_key: str):
  xs, ys = [], []
  for i, row in enumerate(rows):
    if key not in row:
      continue
    y = _finite_number(row[key])
    if y is None:
      continue
    step = _finite_number(row.get(step_key, i))
    xs.append(i if step is None else step)
    ys.append(y)
  return xs, ys


def _sum_series(rows, keys, step_key):
  xs, ys = [], []
  for i, row in enumerate(rows):
    vals = [_finite_number(row.get(k)) for k in keys]
    if any(v is None for v in vals):
      continue
    step = _finite_number(row.get(step_key, i))
    xs.append(i if step is None else step)
    ys.append(sum(vals))
  return xs, ys


def plot_curves(
    metrics_rows: Iterable[Mapping[str, Any]] | str | os.PathLike,
    path: str | os.PathLike,
    keys: Mapping[str, Sequence[str]] = DEFAULT_PANELS,
    *,
    sum_panels: Sequence[str] = DEFAULT_SUM_PANELS,
    step_key: str = "step",
    title: str | None = None,
    dpi: int = 100,
) -> str:
  """Write a PNG with one subplot per panel of `keys` vs `step_key`.

  Args:
    metrics_rows: list of dicts (e.g. `read_metrics(...)`) or a path to a
      metrics.jsonl / workdir.
    path: output PNG path (parent directories are created), e.g.
      `<workdir>/curves.png`.
    keys: `{panel title: (metric keys...)}`; defaults to reward_mean,
      eval/greedy_accuracy + eval/mean_accuracy, entropy, train_infer_kl,
      clip_frac_high + clip_frac_low.
    sum_panels: titles of panels that also show the sum of their keys
      (default: the clip fraction panel -> high + low).

  Each key is drawn only at steps where it is present with a finite numeric
  value (so sparse eval metrics appear at their eval steps, with markers).
  A panel whose keys are all missing shows a "no data" note; keys missing
  from a panel that has other data are listed in its legend title.
  Returns the path written.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if isinstance(metrics_rows, (str, os.PathLike)):
    from fo_rl.metrics_writer import read_metrics

    rows = read_metrics(metrics_rows)
  else:
    rows = list(metrics_rows)

  panels = list(keys.items())
  n = max(1, len(panels))
  ncols = min(3, n)
  nrows = math.ceil(n / ncols)
  fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows), dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()

  for ax, (panel, panel_keys) in zip(axes, panels):
    ax.set_title(panel)
    ax.set_xlabel(step_key)
    ax.grid(True, alpha=0.3)
    missing, drawn = [], 0
    for key in panel_keys:
      xs, ys = _series(rows, key, step_key)
      if not xs:
        missing.append(key)
        continue
      sparse = len(xs) < max(2, 0.5 * len(rows))
      ax.plot(xs, ys, label=key, marker="o" if sparse else None, markersize=3, linewidth=1.2)
      drawn += 1
    if panel in sum_panels and len(panel_keys) > 1:
      xs, ys = _sum_series(rows, panel_keys, step_key)
      if xs:
        ax.plot(xs, ys, label=" + ".join(panel_keys), color="black", linestyle="--", linewidth=1.0)
        drawn += 1
    if drawn == 0:
      ax.text(
          0.5,
          0.5,
          "no data for\n" + "\n".join(panel_keys),
          ha="center",
          va="center",
          transform=ax.transAxes,
          fontsize=9,
          color="gray",
      )
      ax.set_xticks([])
      ax.set_yticks([])
      continue
    legend_title = ("missing: " + ", ".join(missing)) if missing else None
    if drawn > 1 or missing:
      ax.legend(fontsize=8, title=legend_title, title_fontsize=7)
    else:
      ax.set_ylabel(panel_keys[0])

  for ax in axes[len(panels) :]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title)

  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)  # readers never see a half-written PNG
  return path
