"""What the TensorBoard sink names and shows: per-layer tags in model order, the scalar card
budget, and the Text tab's problem table (host side, no TensorFlow).

- Per-layer tags carry the layer's input-to-output index, zero-padded, before its name
  (``gradwatch/grad_norm/03_dense_2``): TensorBoard sorts cards by tag, so they come in
  model order (``sigmoid_10`` no longer sorts after ``sigmoid_1``).
- :class:`ScalarPlan` keeps a run to at most ``max_cards`` scalar tags (cards in the Scalars
  tab): the window scalars, then whole per-layer families in order of use while they fit;
  when even the gradient norms of every layer do not fit, those of evenly spaced layers
  (the first and the last among them). The Gradient Flow tab shows every layer.
- :class:`ProblemTable` is the Text tab's table: one row per problem (layer, variable,
  kind) in the order they first appeared, its state now, and what to try below it.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

#: Scalar cards per run by default (the Scalars tab shows one card per tag).
MAX_SCALAR_CARDS = 20
#: Problems listed in one Text-tab table; the rest are counted.
MAX_PROBLEMS = 10

#: per-layer scalar families (layer-row or histogram column -> tag prefix), most useful first
LAYER_FAMILIES: tuple[tuple[str, str], ...] = (
    ("l2", "gradwatch/grad_norm/"),
    ("update_ratio", "gradwatch/update_ratio/"),
    ("dead_frac", "gradwatch/dead_fraction/"),
    ("l2_max", "gradwatch/grad_norm_max/"),
    ("nonfinite", "gradwatch/nonfinite/"),
    ("zeros", "gradwatch/zero_count/"),
    ("hist_nonfinite", "gradwatch/hist_nonfinite/"),
)
_PREFIXES = dict(LAYER_FAMILIES)
_TAGGED = re.compile(r"^(\d+)_(.*)$", re.S)


def layer_tag(prefix: str, index: int, count: int, layer: str) -> str:
    """``prefix`` + the layer's zero-padded model index + ``_`` + its name."""
    width = max(2, len(str(max(count - 1, 0))))
    return f"{prefix}{index:0{width}d}_{layer}"


def tag_layer(tag: str, prefix: str) -> str | None:
    """The layer name in a per-layer ``tag`` under ``prefix`` (None: another tag)."""
    if not tag.startswith(prefix):
        return None
    rest = tag[len(prefix):]
    match = _TAGGED.match(rest)
    return match.group(2) if match else rest


def spread(count: int, keep: int) -> list[int]:
    """``keep`` evenly spaced indices of ``range(count)``, the first and the last among them."""
    if keep >= count:
        return list(range(count))
    if keep <= 1:
        return [0][:keep]
    return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)})


class ScalarPlan:
    """Which per-layer scalar tags a run writes (see the module docstring).

    Args:
        layers: the layer names, input to output.
        window_cards: scalar tags written for the whole model.
        max_cards: the card budget of the run.
    """

    def __init__(self, layers: Sequence[str], window_cards: int, max_cards: int = MAX_SCALAR_CARDS):
        self.layers = list(layers)
        self.max_cards = max_cards
        budget = max(0, max_cards - window_cards)
        count = len(self.layers)
        self.families: dict[str, list[int]] = {}
        for column, _ in LAYER_FAMILIES:
            if count and count <= budget:
                self.families[column] = list(range(count))
                budget -= count
            elif column == "l2":  # the norms of evenly spaced layers, nothing else
                self.families[column] = spread(count, budget)
                break
            else:
                break
        self._kept = {column: set(indices) for column, indices in self.families.items()}
        self._tags: dict[tuple[str, str, int], str | None] = {}

    def index(self, layer: str) -> int:
        """The layer's model index (a layer not in the run's list is added at the end)."""
        try:
            return self.layers.index(layer)
        except ValueError:
            self.layers.append(layer)
            return len(self.layers) - 1

    def tag(self, column: str, layer: str) -> str | None:
        """The tag of ``column`` for ``layer``, or None when the plan leaves it out."""
        key = (column, layer, len(self.layers))  # a layer added later widens every tag's index
        if key not in self._tags:
            position = self.index(layer)
            kept = position in self._kept.get(column, ())
            count = len(self.layers)
            self._tags[key] = layer_tag(_PREFIXES[column], position, count, layer) if kept else None
        return self._tags[key]

    def layer_tags(self, column: str) -> list[tuple[str, str]]:
        """(layer, tag) of ``column`` in model order, for the layers the plan keeps."""
        prefix = _PREFIXES[column]
        return [(self.layers[i], layer_tag(prefix, i, len(self.layers), self.layers[i]))
                for i in self.families.get(column, [])]


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#!|])")  # the characters Markdown lets a backslash escape


def markdown_cell(value: Any) -> str:
    """Text safe in one Markdown table cell: HTML-escaped, Markdown specials and ``|`` backslashed."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = " ".join(str(value).split())  # newlines would end the table row
    text = html.escape(text, quote=True)
    return _MD_SPECIAL.sub(r"\\\1", text)


class ProblemTable:
    """The run's problems so far, first one first, as the Text tab shows them."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(self, alert_rows: Sequence[Mapping[str, Any]]) -> None:
        """Takes a window's alert rows: a warning or error opens (or updates) its problem,
        an ``info`` row marks it cleared."""
        for row in alert_rows:
            key = (str(row.get("layer", "")), str(row.get("variable", "")), str(row.get("kind", "")))
            problem = self._rows.get(key)
            if row.get("severity") == "info":
                if problem is not None:
                    problem["cleared"] = row.get("step")
                continue
            if problem is None:
                problem = self._rows[key] = {"step": row.get("step"), "layer": key[0], "kind": key[2],
                                             "severity": row.get("severity"), "count": 0}
            problem.update(cleared=None, message=row.get("message"), hint=row.get("hint"))
            problem["count"] += 1
            if row.get("severity") == "error":
                problem["severity"] = "error"

    def markdown(self) -> str:
        """The table (step, layer, problem, now) and what to try, in first-step order."""
        rows = sorted(self._rows.values(), key=lambda p: (p["step"] if p["step"] is not None else 0))
        if not rows:
            return "No open problem: every alert so far has cleared."
        shown = rows[:MAX_PROBLEMS]
        lines = ["| first step | layer | problem | now |", "|---:|---|---|---|"]
        for p in shown:
            now = f"cleared at step {p['cleared']}" if p["cleared"] is not None else "open"
            problem = f"**{p['severity']}** {p['kind'].replace('_', ' ')}"
            lines.append(f"| {markdown_cell(p['step'])} | {markdown_cell(p['layer'] or 'whole model')} | "
                         f"{problem} | {now} |")
        if len(rows) > len(shown):
            more = len(rows) - len(shown)
            lines.append(f"\n{more} more problems: see alerts.csv or the Gradient Flow tab.")
        lines.append("\n**What to try**\n")
        for number, p in enumerate(shown, 1):
            text = markdown_cell(p.get("message"))
            hint = markdown_cell(p.get("hint"))
            lines.append(f"{number}. {text}" + (f" — {hint}" if hint else ""))
        return "\n".join(lines)
