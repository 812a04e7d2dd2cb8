"""TVP evaluation: temporal grounding R@1 at IoU 0.3 / 0.5 / 0.7 and mIoU, beside two baselines on the same queries.

Every query of every video in the shards is evaluated (training draws one per video; evaluation takes them all).
Per query the model predicts one segment; the metrics are ``tvlt_core.metrics.grounding_metrics``. The baselines,
computed on exactly the same queries:

    random          a segment with start and end drawn uniformly over the video (``random_draws`` draws per query,
                    averaged), from a generator seeded by the settings, over the queries in (key, query) order
    best constant   the one (start, end) pair, on a 1/``constant_grid`` grid of the duration, that scores best on
                    each metric over this evaluation set: an oracle that has seen the answers, so the strongest
                    guess that ignores the video and the sentence

IoU does not change when both segments are scaled, so the baselines work in fractions of each video's duration.

Beside them, the query-swap test (``tvlt_core.metrics.query_swap``): for every two distinct events of one video,
does asking for the other event's sentence move the prediction onto that event, where the video's own sentence did
not put it? A grounding score can beat both baselines without reading the sentence (by finding "an event"); the
swap rows cannot: any prediction that ignores the sentence scores ``swap_moved`` 0 and lands on the other event as
often with either sentence. The baselines are scored by the same rows (the best-constant one with its mIoU segment).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import fsspec
import torch

from tvlt_core import metrics, shards
from tvlt_core.data.batches import uniform_indices
from tvlt_core.data.plan import seed_for
from tvlt_core.data.stream import read_shard
from tvlt_core.eval.report import Report, Row
from tvlt_core.eval.settings import EvalSettings, EvalUnit
from tvlt_core.models.tvp import TvpForVideoGrounding
from tvlt_core.text import TextTokenizer
from tvlt_core.video import tvp_logits_to_seconds, tvp_preprocess

log = logging.getLogger(__name__)

DEFAULT_MAX_TEXT_LENGTH = 32  # when the checkpoint's tokenizer_config.json does not say


def saved_text_length(folder: str, limit: int) -> int:
    """The tokenizer length the checkpoint was trained with (``model_max_length``), at most ``limit``."""
    fs, root = fsspec.core.url_to_fs(folder)
    path = f"{root.rstrip('/')}/tokenizer_config.json"
    if not fs.exists(path):
        return min(DEFAULT_MAX_TEXT_LENGTH, limit)
    with fs.open(path, "r") as f:
        return min(int(json.load(f).get("model_max_length", DEFAULT_MAX_TEXT_LENGTH)), limit)


class TvpEvaluator:
    """A ``TvpForVideoGrounding`` and its tokenizer, loaded once, evaluating units."""

    def __init__(self, model: TvpForVideoGrounding, tokenizer: TextTokenizer, settings: EvalSettings):
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    @classmethod
    def load(cls, folder: str, settings: EvalSettings) -> TvpEvaluator:
        model = TvpForVideoGrounding.from_pretrained(folder)
        length = saved_text_length(folder, model.config.max_position_embeddings)
        return cls(model, TextTokenizer.from_folder(folder, length), settings)

    @torch.no_grad()
    def evaluate_unit(self, unit: EvalUnit) -> dict[str, Any]:
        """Per query: key, query index, sentence, duration, true and predicted (start, end) in seconds."""
        queries, rows, skipped = [], [], 0
        for raw in read_shard(unit.url):
            try:
                sample = shards.decode_sample(raw)
                duration, annotated = float(sample.record["duration"]), sample.record["queries"]
            except (ValueError, KeyError, OSError) as err:  # corrupt entries, or not a grounding sample
                log.warning("skipping sample %s of %s: %s", raw.get("__key__"), unit.url, err)
                skipped += 1
                continue
            pixels = self.pixels(sample.frames)
            for i, q in enumerate(annotated):
                queries.append({"key": sample.key, "query": i, "sentence": q["sentence"], "duration": duration,
                                "true": [float(q["start"]), float(q["end"])], "pixels": pixels})  # fmt: skip
            while len(queries) >= self.settings.batch_size:
                rows += self.predict(queries[: self.settings.batch_size])
                queries = queries[self.settings.batch_size :]
        if queries:
            rows += self.predict(queries)
        return {"unit": unit.index, "queries": rows, "videos": len({r["key"] for r in rows}), "skipped": skipped}

    def pixels(self, frames) -> torch.Tensor:
        """A video's stored frames, uint8 (N, h, w, 3) with the longest edge at the recipe's size, -> the model's
        (num_frames, 3, S, S) input; serving feeds a raw video's frames through this too."""
        c = self.model.config
        return tvp_preprocess(frames[uniform_indices(len(frames), c.num_frames, repeat=True)], c.max_img_size)

    def predict(self, queries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Queries (``sentence``, ``duration`` s, ``pixels`` from ``pixels``, anything else kept) -> the same dicts
        without ``pixels``, with ``predicted`` (start, end) in seconds. One forward pass: at most a batch."""
        text = self.tokenizer([q["sentence"] for q in queries])
        out = self.model(
            input_ids=text["input_ids"].to(self.device),
            pixel_values=torch.stack([q["pixels"] for q in queries]).to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
        )
        predicted = tvp_logits_to_seconds(out.logits.float().cpu(), [q["duration"] for q in queries])
        return [{**{k: v for k, v in q.items() if k != "pixels"}, "predicted": p} for q, p in zip(queries, predicted.tolist())]

    @staticmethod
    def summarize(parts: list[dict[str, Any]], settings: EvalSettings) -> Report:
        """Model and baselines over every query of ``parts`` (in unit order)."""
        rows = sorted((r for p in parts for r in p["queries"]), key=lambda r: (r["key"], r["query"]))
        if not rows:
            raise ValueError("nothing to evaluate: the shards hold no grounding query (made with --mode grounding?)")
        true = torch.tensor([r["true"] for r in rows], dtype=torch.float64)
        predicted = torch.tensor([r["predicted"] for r in rows], dtype=torch.float64)
        durations = torch.tensor([r["duration"] for r in rows], dtype=torch.float64)[:, None]
        model = metrics.grounding_metrics(predicted, true)
        fractions = true / durations
        random = random_segment_metrics(fractions, settings.random_draws, settings.seed)
        constant, segment = best_constant_metrics(fractions, settings.constant_grid)
        table = [Row(k, label, model[k], {"random": random[k], "best-constant": constant[k]})
                 for k, label in metrics.GROUNDING_LABELS.items()]  # fmt: skip
        pairs = metrics.distinct_event_pairs([r["key"] for r in rows], true)
        table += swap_rows(predicted, true, durations, pairs, segment, settings)
        references = {
            "random": f"start and end drawn uniformly over the video, {settings.random_draws} draws per query",
            "best-constant": f"the best single (start, end) on a 1/{settings.constant_grid} grid of the duration for "
            f"each metric, chosen on these answers (for mIoU and the swap rows: {segment[0]:.2f}-{segment[1]:.2f} of the duration)",
        }
        counts = {"videos": sum(p["videos"] for p in parts), "queries": len(rows), "swap_pairs": int(pairs.shape[0]),
                  "skipped": sum(p["skipped"] for p in parts)}  # fmt: skip
        iou = metrics.temporal_iou(predicted, true).tolist()
        predictions = [{**r, "iou": round(v, 4)} for r, v in zip(rows, iou)]
        files = {"predictions.json": json.dumps(predictions, indent=1).encode()}
        return Report("tvp-grounding", table, references, counts, primary=metrics.recall_key(0.5), files=files)


SWAP_LABELS = {
    "swap_lands_on_other": "swap: other sentence lands on its event",
    "swap_own_on_other": "swap: own sentence on the other event",
    "swap_moved": "swap: moved by the sentence",
}


def swap_rows(predicted: torch.Tensor, true: torch.Tensor, durations: torch.Tensor, pairs: torch.Tensor,
              segment: tuple[float, float], settings: EvalSettings) -> list[Row]:  # fmt: skip
    """The query-swap rows of the model (``predicted`` and ``true`` in seconds) beside the random guess (averaged
    over its draws) and the best-constant ``segment`` (both in fractions of each video's ``durations``)."""
    model = metrics.query_swap(predicted, true, pairs)
    fractions = true / durations
    guesses = random_segments(fractions, settings.random_draws, settings.seed)
    per_draw = [metrics.query_swap(guesses[:, d], fractions, pairs) for d in range(guesses.shape[1])]
    random = {k: sum(d[k] for d in per_draw) / len(per_draw) for k in metrics.SWAP_KEYS}
    constant = metrics.query_swap(fractions.new_tensor(segment).expand_as(fractions), fractions, pairs)
    return [Row(k, SWAP_LABELS[k], model[k], {"random": random[k], "best-constant": constant[k]},
                higher_is_better=k != "swap_own_on_other") for k in metrics.SWAP_KEYS]  # fmt: skip


def random_segments(fractions: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """(Q, draws, 2) segments with start and end drawn uniformly over each video, in fractions of its duration."""
    g = torch.Generator().manual_seed(seed_for(seed, "random-segment"))
    return torch.rand(fractions.shape[0], draws, 2, generator=g, dtype=torch.float64).sort(dim=-1).values


def random_segment_metrics(fractions: torch.Tensor, draws: int, seed: int) -> dict[str, float]:
    """Grounding metrics of uniformly random segments against (Q, 2) true segments in fractions of the duration."""
    guesses = random_segments(fractions, draws, seed)
    return metrics.grounding_metrics(guesses.reshape(-1, 2), fractions.repeat_interleave(draws, dim=0))


def iou_grid(candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of every candidate (C, 2) with every target (Q, 2): (C, Q), the same formula as ``temporal_iou``."""
    c, t = candidates[:, None, :], targets[None, :, :]
    inter = (torch.minimum(c[..., 1], t[..., 1]) - torch.maximum(c[..., 0], t[..., 0])).clamp(min=0)
    hull = torch.maximum(c[..., 1], t[..., 1]) - torch.minimum(c[..., 0], t[..., 0])
    return torch.where(hull > 0, inter / hull.clamp(min=torch.finfo(hull.dtype).tiny), torch.zeros_like(hull))


def best_constant_metrics(fractions: torch.Tensor, grid: int) -> tuple[dict[str, float], tuple[float, float]]:
    """For each grounding metric, the best score any one segment (start < end on a 1/``grid`` grid) gets when
    predicted for every (Q, 2) true segment (fractions of the duration); and the segment with the best mIoU."""
    points = torch.arange(grid + 1, dtype=torch.float64) / grid
    start, end = torch.triu_indices(grid + 1, grid + 1, offset=1)
    candidates = torch.stack([points[start], points[end]], dim=1)  # (C, 2)
    thresholds = torch.tensor(metrics.IOU_THRESHOLDS, dtype=torch.float64)
    recalls, mious = [], []
    for chunk in candidates.split(256):  # (256, Q) IoUs at a time: bounded memory for large evaluation sets
        iou = iou_grid(chunk, fractions)
        recalls.append((iou[:, :, None] >= thresholds).double().mean(dim=1))  # (chunk, thresholds)
        mious.append(iou.mean(dim=1))
    recall, miou = torch.cat(recalls), torch.cat(mious)
    best = {metrics.recall_key(m): float(recall[:, i].max()) for i, m in enumerate(metrics.IOU_THRESHOLDS)}
    best["miou"] = float(miou.max())
    s, e = candidates[int(miou.argmax())].tolist()
    return best, (s, e)
