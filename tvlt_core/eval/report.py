"""What an evaluation produces: rows of metrics, each beside its references, as a table and as MLflow metrics.

A number is never read without its reference: every row carries the values the references score on the same data
(a random guess, the best constant guess, chance, a trivial reconstruction), and the table prints them side by side.

    report.table()        # the printed table
    report.metrics()      # {"r1_iou0.5": ..., "random/r1_iou0.5": ..., ...}: what goes to MLflow
    report.value("miou")  # one model metric, by key
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    """One metric of the model and, by reference name, what each reference scores on it."""

    key: str  # MLflow metric key (letters, digits, ``_ . / -``): "r1_iou0.5", "matching_accuracy"
    label: str  # what the table prints: "R@1 IoU=0.5"
    value: float
    references: dict[str, float] = field(default_factory=dict)
    higher_is_better: bool = True

    def beats(self, other: float) -> bool:
        """Strictly better than ``other`` in this metric's direction (a tie is not an improvement)."""
        if math.isnan(self.value):
            return False
        if math.isnan(other):
            return True
        return self.value > other if self.higher_is_better else self.value < other


@dataclass
class Report:
    """The evaluation of one model on one evaluation set."""

    task: str  # "tvp-grounding" | "tvlt-pretrain"
    rows: list[Row]
    references: dict[str, str]  # reference name -> what it is, in one line (printed under the table)
    counts: dict[str, int]  # what was evaluated: {"videos": 9, "queries": 27, "skipped": 0}
    primary: str  # the key promotion compares by default
    files: dict[str, bytes] = field(default_factory=dict)  # details logged as artifacts (per-query predictions)

    def row(self, key: str) -> Row:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(f"no metric {key!r} in this {self.task} evaluation; it has {[r.key for r in self.rows]}")

    def value(self, key: str) -> float:
        return self.row(key).value

    def metrics(self) -> dict[str, float]:
        """Model metrics under their key, each reference's under ``<reference>/<key>``, counts under ``n/<name>``."""
        out = {row.key: row.value for row in self.rows}
        for row in self.rows:
            out.update({f"{ref}/{row.key}": v for ref, v in row.references.items()})
        out.update({f"n/{name}": float(n) for name, n in self.counts.items()})
        return out

    def table(self) -> str:
        """Model and references side by side, one row per metric, then what was counted and what each reference is."""
        names = list(self.references)
        header = ["metric", "model", *names]
        body = [[row.label, f"{row.value:.4f}", *(_cell(row.references.get(n)) for n in names)] for row in self.rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        fmt = [lambda s, w: s.ljust(w)] + [lambda s, w: s.rjust(w)] * (len(header) - 1)
        lines = ["  ".join(f(c, w) for f, c, w in zip(fmt, line, widths)) for line in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("evaluated: " + ", ".join(f"{n} {name}" for name, n in self.counts.items()))
        lines += [f"{name}: {what}" for name, what in self.references.items()]
        return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
