"""TVLT evaluation: masked reconstruction per modality, video-audio matching, audio-to-video retrieval.

For every shard (a unit) the clips are cut into galleries of about ``gallery_size`` clips (the shard's sample
count split evenly, so no gallery is left with a handful). Per gallery of G clips:

    reconstruction  MAE with 75% of video patches and 15% of audio time steps removed, the masking noise seeded by
                    each clip's key; per clip the squared error summed over removed real patches and their count,
                    and the same for the mean-fill reference (every removed patch predicted as the mean of the
                    clip's visible patches of that modality)
    matching        the matching logit of every (audio i, video j) pair: a (G, G) score matrix, true pairs on the
                    diagonal

Metrics over the whole set (``summarize``):

    pixel_mse, audio_mse      summed squared error / removed patches, as the training loss averages; vs mean-fill
    matching_accuracy         logit > 0 on a balanced set: every true pair and, per audio, the video of the next
                              clip of another source video in the gallery (a clip of the same video shows the same
                              content, so it is no clear negative; the plain next clip when the gallery has one
                              source)
    matching_roc_auc          true pairs against every pair of clips of different source videos in their gallery
                              (every wrong pair when the gallery has one source)
    a2v_r1, a2v_r5, a2v_r10   the audio's own video among the gallery's G videos ranked by matching logit;
                              chance is min(k, G) / G

Clips without audio are skipped (they have nothing to match or reconstruct) and counted.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Iterator
from typing import Any

import torch

from tvlt_core import metrics, shards
from tvlt_core.data.batches import TvltBatcher
from tvlt_core.data.plan import seed_for
from tvlt_core.data.stream import read_shard
from tvlt_core.eval.report import Report, Row
from tvlt_core.eval.settings import EvalSettings, EvalUnit
from tvlt_core.models.tvlt import TvltForPreTraining, make_audio_mask_noise, patchify_audio, patchify_pixels

log = logging.getLogger(__name__)

REFERENCES = {
    "chance": "a scorer without information: 0.5 for matching, min(k, G) / G for recall among a gallery's G clips",
    "mean-fill": "every removed patch predicted as the mean of the same clip's visible patches of that modality",
}


def gallery_sizes(samples: int, size: int) -> list[int]:
    """``samples`` split into ceil(samples / size) galleries whose sizes differ by at most one."""
    count = max(1, math.ceil(samples / size))
    return [samples // count + (1 if i < samples % count else 0) for i in range(count)]


def masked_sums(pred: torch.Tensor, target: torch.Tensor, removed: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per clip (B, 3): summed squared error over removed real patches, their count, and the mean-fill reference's
    summed squared error. pred, target (B, N, D); removed (B, N) 1 = removed and real; real (B, N) 1 = not padding.
    A patch's error is the mean over its D values, as in the training loss."""
    pred, target = pred.float(), target.float()
    sse = ((pred - target).square().mean(-1) * removed).sum(1)
    visible = (real - removed).clamp(min=0)[..., None]
    fill = (target * visible).sum(1, keepdim=True) / visible.sum(1, keepdim=True).clamp(min=1)  # (B, 1, D)
    fill_sse = ((fill - target).square().mean(-1) * removed).sum(1)
    return torch.stack([sse, removed.sum(1), fill_sse], dim=1)


class TvltEvaluator:
    """A pretrained ``TvltForPreTraining``, loaded once, evaluating units."""

    def __init__(self, model: TvltForPreTraining, settings: EvalSettings):
        self.model, self.settings = model.eval(), settings
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        c = model.config
        self.batcher = TvltBatcher(image_size=c.image_size, num_frames=c.num_frames, patch_size=c.image_patch_size[0],
                                   max_audio_frames=c.spectrogram_length, matching=False)  # fmt: skip

    @classmethod
    def load(cls, folder: str, settings: EvalSettings) -> TvltEvaluator:
        return cls(TvltForPreTraining.from_pretrained(folder), settings)

    # --- one unit ----------------------------------------------------------------------------------------------------
    def prepare(self, raw: dict[str, Any], url: str) -> dict[str, Any] | None:
        """One shard sample as model-ready tensors; None for a clip that cannot be read or has no audio."""
        try:
            item = self.batcher.prepare(shards.decode_sample(raw), random.Random(0))
        except (ValueError, KeyError, OSError) as err:  # a corrupt JPEG/npy/JSON or a missing entry
            log.warning("skipping sample %s of %s: %s", raw.get("__key__"), url, err)
            return None
        return None if item["silent"] else item

    def galleries(self, unit: EvalUnit, skipped: list[str]) -> Iterator[list[dict[str, Any]]]:
        """The unit's clips, prepared, one list per gallery; the keys of clips left out go to ``skipped``."""
        ends, gallery = set(itertools.accumulate(gallery_sizes(unit.samples, self.settings.gallery_size))), []
        for i, raw in enumerate(read_shard(unit.url)):
            item = self.prepare(raw, unit.url)
            if item is None:
                skipped.append(str(raw.get("__key__")))
            else:
                gallery.append(item)
            if i + 1 in ends and gallery:
                yield gallery
                gallery = []
        if gallery:  # samples beyond the manifest's count, if a shard ever holds more than it says
            yield gallery

    @torch.no_grad()
    def evaluate_unit(self, unit: EvalUnit) -> dict[str, Any]:
        """Per clip reconstruction sums and per gallery score matrices, as plain lists."""
        keys, pixel, audio, scores, sources, skipped = [], [], [], [], [], []
        for gallery in self.galleries(unit, skipped):
            batch = self.batcher.collate(gallery, random.Random(0))
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            keys += batch["keys"]
            if self.model.config.task_mae:
                pixel_sums, audio_sums = self.reconstruct(batch)
                pixel.append(pixel_sums)
                audio.append(audio_sums)
            if self.model.config.task_matching and len(gallery) >= 2:
                scores.append(self.score_matrix(batch).tolist())
                sources.append([shards.key_source(k) for k in batch["keys"]])
        return {
            "unit": unit.index,
            "keys": keys,
            "pixel": torch.cat(pixel).tolist() if pixel else [],
            "audio": torch.cat(audio).tolist() if audio else [],
            "scores": scores,
            "sources": sources,
            "skipped": len(skipped),
        }

    def noise(self, keys: list[str], n_pixel: int, n_audio: int) -> tuple[torch.Tensor, torch.Tensor]:
        """MAE masking noise (B, Np), (B, Na), each row drawn from a generator seeded by the clip's key."""
        c, pixel, audio = self.model.config, [], []
        for key in keys:
            g = torch.Generator().manual_seed(seed_for(self.settings.seed, "mae", key))
            pixel.append(torch.rand(n_pixel, generator=g))
            audio.append(make_audio_mask_noise(1, n_audio, c.freq_patches, c.audio_mask_type, generator=g)[0])
        return torch.stack(pixel).to(self.device), torch.stack(audio).to(self.device)

    def reconstruct(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per clip ``masked_sums`` for pixels and audio: two (B, 3) tensors."""
        c, step = self.model.config, self.settings.batch_size
        n_pixel = batch["pixel_values"].shape[1] * c.patches_per_frame
        n_audio = batch["audio_values"].shape[2] // c.audio_patch_size[0] * c.freq_patches
        pixel, audio = [], []
        for s in range(0, len(batch["keys"]), step):
            part = {k: v[s : s + step] for k, v in batch.items()}
            pixel_noise, audio_noise = self.noise(part["keys"], n_pixel, n_audio)
            pixel_logits, audio_logits, encoded = self.model.forward_mae(
                part["pixel_values"], part["audio_values"], part["pixel_mask"], part["audio_mask"],
                pixel_noise, audio_noise,
            )  # fmt: skip
            target = patchify_pixels(part["pixel_values"], c.image_patch_size[0])
            pixel.append(masked_sums(pixel_logits, target, encoded.pixel_label_masks, part["pixel_mask"]).cpu())
            target = patchify_audio(part["audio_values"], c.audio_patch_size)
            audio.append(masked_sums(audio_logits, target, encoded.audio_label_masks, part["audio_mask"]).cpu())
        return torch.cat(pixel), torch.cat(audio)

    @torch.no_grad()
    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each clip's pooled embedding (B, D), tanh(pooler(cls)) as the matching head reads it, and the matching
        logit (B,) of its own audio with its own video: the diagonal of ``score_matrix``, by the same layers."""
        pooled, logits = [], []
        head = self.model.matching_head
        for s in range(0, len(batch["keys"]), self.settings.batch_size):
            part = {k: v[s : s + self.settings.batch_size] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            cls = self.model.tvlt(part["pixel_values"], part["audio_values"], part["pixel_mask"], part["audio_mask"],
                                  cls_only=True).last_hidden_state[:, 0]  # fmt: skip
            out = torch.tanh(head.pooler.dense(cls))
            pooled.append(out.float().cpu())
            logits.append(head.fc(out).float().view(-1).cpu())
        return torch.cat(pooled), torch.cat(logits)

    def score_matrix(self, batch: dict[str, Any]) -> torch.Tensor:
        """(G, G) matching logits, row i = clip i's audio, column j = clip j's video."""
        g = len(batch["keys"])
        audio_idx, video_idx = (ix.reshape(-1) for ix in torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"))
        logits = []
        for s in range(0, g * g, self.settings.batch_size):
            a, v = audio_idx[s : s + self.settings.batch_size], video_idx[s : s + self.settings.batch_size]
            logits.append(self.model.forward_matching(
                batch["pixel_values"][v], batch["audio_values"][a], batch["pixel_mask"][v], batch["audio_mask"][a]
            ).float().view(-1).cpu())  # fmt: skip
        return torch.cat(logits).view(g, g)

    # --- the whole set -------------------------------------------------------------------------------------------------
    @staticmethod
    def summarize(parts: list[dict[str, Any]], settings: EvalSettings) -> Report:
        """The metrics of every unit's clips (``parts`` in unit order)."""
        rows: list[Row] = []
        for name, label in (("pixel", "pixel MSE, removed patches"), ("audio", "audio MSE, removed patches")):
            sums = torch.tensor([s for p in parts for s in p[name]], dtype=torch.float64).reshape(-1, 3).sum(0)
            if sums[1] > 0:
                rows.append(Row(f"{name}_mse", label, float(sums[0] / sums[1]),
                                {"mean-fill": float(sums[2] / sums[1])}, higher_is_better=False))  # fmt: skip
        matrices = [torch.tensor(m, dtype=torch.float64) for p in parts for m in p["scores"]]
        if matrices:
            rows += matching_rows(matrices, [s for p in parts for s in p["sources"]])
        clips = sum(len(p["keys"]) for p in parts)
        if not rows:
            raise ValueError(f"nothing to evaluate: {clips} clips with audio, none scored (is the model pretrained "
                             "with task_mae or task_matching?)")  # fmt: skip
        counts = {"clips": clips, "galleries": len(matrices), "skipped": sum(p["skipped"] for p in parts)}
        primary = "a2v_r1" if matrices else "pixel_mse"
        return Report("tvlt-pretrain", rows, dict(REFERENCES), counts, primary)


def negative_pairs(sources: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """For a gallery's clips: (G,) the video index paired with each audio as its negative (the next clip of another
    source, cyclically; the next clip when all share one source), and the (G, G) mask of negative pairs for ROC-AUC
    (clips of different sources; every off-diagonal pair when all share one source)."""
    g = len(sources)
    other = torch.tensor([[a != b for b in sources] for a in sources], dtype=torch.bool)
    if not other.any():
        return (torch.arange(g) + 1) % g, ~torch.eye(g, dtype=torch.bool)
    nxt = [next((i + d) % g for d in range(1, g) if other[i, (i + d) % g]) for i in range(g)]  # each has one
    return torch.tensor(nxt), other


def matching_rows(matrices: list[torch.Tensor], sources: list[list[str]]) -> list[Row]:
    """Matching accuracy and ROC-AUC, and audio-to-video R@k, from the (G, G) score matrices of the galleries and
    the source video of each gallery clip."""
    logits, labels, positives, negatives, ranks, sizes = [], [], [], [], [], []
    for m, gallery_sources in zip(matrices, sources, strict=True):
        g = m.shape[0]
        negative, wrong = negative_pairs(gallery_sources)
        logits += [m.diagonal(), m[torch.arange(g), negative]]
        labels += [torch.ones(g), torch.zeros(g)]
        positives.append(m.diagonal())
        negatives.append(m[wrong])
        ranks.append(metrics.target_ranks(m, torch.arange(g)))
        sizes += [g] * g
    accuracy = metrics.matching_accuracy(torch.cat(logits), torch.cat(labels))
    positives, negatives = torch.cat(positives), torch.cat(negatives)
    auc = metrics.roc_auc(torch.cat([positives, negatives]),
                          torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]))  # fmt: skip
    recall, chance = metrics.recall_at_k(torch.cat(ranks)), metrics.chance_recall_at_k(sizes)
    rows = [Row("matching_accuracy", "matching accuracy", accuracy, {"chance": 0.5}),
            Row("matching_roc_auc", "matching ROC-AUC", auc, {"chance": 0.5})]  # fmt: skip
    rows += [Row(f"a2v_r{k}", f"audio->video R@{k}", recall[k], {"chance": chance[k]}) for k in metrics.RECALL_KS]
    return rows
