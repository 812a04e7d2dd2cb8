"""TVP grounding from scratch, in memory (issue 19): the main job's model and grounding data in one process, no Ray,
no DeepSpeed, so an aid or augmentation can be tried in minutes; held-out R@1 and the query-swap test every few
hundred steps. An experiment harness, not the job: what it finds must be confirmed with jobs/finetune_tvp.py.

    .venv/bin/python benchmarks/tvp_learning.py --data /tmp/g19-0 --steps 1500 --ws 1 --qt 1 [--fw 1] [--shuffle]

--data is made on first use like the main job makes it (corpus seed --corpus_seed, 150 grounding videos, the demo's
grounding preprocessing and vocabulary). --ws/--qt: the word-segment and query-token aids' weights
(tvlt_core.models.tvp_aids); --fw: a per-frame word head on each frame's visual features before the temporal mean
(BCE on the tokens of the sentence whose segment holds the frame), an experiment only; --shuffle: each draw shows the
video with its runs of frames (each event, each gap) in a random order and the segments moved with them, so a
training video's segments cannot be memorised; --fw_bins B: the frame head's targets are each word crossed with the
frame's time bin (B bins over the video, positives and negatives weighted alike), so each frame's features must say
what is seen *and when* before the mean; --frame_tokens: not TVP, one visual token per frame (the unused position
table as a temporal embedding) instead of the mean over frames, to test whether the mean is the limit.
THREADS=1 runs two at once on 2 cores (about 0.46 s a step each).
Measured 2026-12-07 (see README, "What it shows today").
"""

import argparse
import glob
import os
import random
import time
import numpy as np, torch, torch.nn.functional as F
from torch import nn
from tvlt_core import metrics, shards
from tvlt_core.data.stream import read_shard
from tvlt_core.eval.settings import EvalSettings
from tvlt_core.eval.tvp import TvpEvaluator
from tvlt_core.data.batches import TvpBatcher, uniform_indices
from tvlt_core.models.tvp import tvp_tiny_config
from tvlt_core.models.tvp_aids import TvpForGroundingWithAids
from tvlt_core.text import TextTokenizer
from tvlt_core.train.lr_schedule import lr_at

p = argparse.ArgumentParser()
p.add_argument("--data", default="/tmp/g19-0")
p.add_argument("--steps", type=int, default=1500)
p.add_argument("--ws", type=float, default=1.0)
p.add_argument("--qt", type=float, default=1.0)
p.add_argument("--fw", type=float, default=0.0)
p.add_argument("--fw_own", action="store_true")
p.add_argument("--fw_bins", type=int, default=0)
p.add_argument("--frame_tokens", action="store_true")
p.add_argument("--batch", type=int, default=16)
FRAMES = 16  # frames per video, as tvp_demo.yaml
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval_every", type=int, default=250)
p.add_argument("--tag", default="x")
p.add_argument("--corpus_seed", type=int, default=0)
p.add_argument("--shuffle", action="store_true")

def make_data(work, seed):
    """Grounding shards + vocabulary as the main job builds them, into ``work``."""
    from pathlib import Path
    from jobs.demo import CorpusSection, DemoConfig, Shards, _preprocess, stage_vocab
    from synthetic import generate_corpus
    from tvlt_core.ray_session import connect_ray
    work = Path(work)
    c = CorpusSection(seed=seed)
    g = generate_corpus(work / "corpus-grounding", 0, c.grounding_videos, seed, size=tuple(c.grounding_size),
                        fps=c.grounding_fps, duration=tuple(c.grounding_duration))
    cfg, out = DemoConfig(work_dir=str(work)), Shards.under(work)
    connect_ray(cpus=2)
    videos = str(g.root.resolve() / "grounding")
    for split, folder in (("train", out.grounding_train), ("test", out.grounding_test)):
        _preprocess(cfg.preprocess_grounding, {"mode": "grounding", "input": videos, "output": folder,
                                               "grounding": {"annotations": [str(g.annotation_file(split))]}})
    stage_vocab(g, 16, work)


if __name__ == "__main__":  # the corpus generator's worker processes import this file too
    a = p.parse_args()
    if not glob.glob(f"{a.data}/shards/grounding-train/*.tar"):
        make_data(a.data, a.corpus_seed)
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)

    def load(folder):
        out = []
        for t in sorted(glob.glob(f"{folder}/*.tar")):
            for raw in read_shard(t):
                out.append(shards.decode_sample(raw))
        return out
    train, test = load(f"{a.data}/shards/grounding-train"), load(f"{a.data}/shards/grounding-test")
    tok = TextTokenizer.from_folder(f"{a.data}/vocab", 16)
    cfg = tvp_tiny_config(num_frames=FRAMES, max_img_size=64, visual_prompt_size=8, distance_loss_floor=0.0,
                          duration_loss_floor=0.0, vocab_size=tok.vocab_size)
    V = cfg.vocab_size
    batcher = TvpBatcher(tokenizer=tok, image_size=64, num_frames=FRAMES, aids=True)

    def frame_targets(sample):
        """(T, V) multi-hot: the tokens of the sentence whose segment holds each sampled frame's time."""
        idx = uniform_indices(len(sample.frames), FRAMES, repeat=True)
        times = np.asarray(sample.record["frame_times"])[idx]
        qs = sample.record["queries"]
        ids = [tok.word_ids(q["sentence"]) for q in qs]
        target = torch.zeros(FRAMES, V)
        for i, t in enumerate(times):
            for q, w in zip(qs, ids):
                if float(q["start"]) <= t < float(q["end"]):
                    own = w.difference(*(x for x in ids if x is not w)) if a.fw_own else w
                    for tid in own:
                        target[i, tid] = 1.0
        if a.fw_bins:  # word x time-bin conjunction: (T, V * B)
            bins = F.one_hot(torch.arange(FRAMES) * a.fw_bins // FRAMES, a.fw_bins).float()
            target = (target[:, :, None] * bins[:, None, :]).flatten(1)
        return target
    for s in train:
        s.fw = frame_targets(s) if a.fw else None

    class Aided(TvpForGroundingWithAids):
        def __init__(self, config, fw):
            super().__init__(config, word_segment_weight=a.ws, query_token_weight=max(a.qt, 0.0))
            self.fw = fw
            if fw:
                self.frame_word_head = nn.Linear(config.hidden_size, config.vocab_size * max(a.fw_bins, 1))
                self._grid = None
                self.model.vision_model.register_forward_hook(lambda m, i, o: setattr(self, "_grid", o))
        def forward(self, *args, frame_words=None, **kw):
            out = super().forward(*args, **kw)
            if self.fw and frame_words is not None:
                g = self._grid.mean((2, 3))  # (B, T, D)
                logits = self.frame_word_head(g)
                if a.fw_bins:  # sparse conjunction targets: positives and negatives weigh the same
                    each = F.binary_cross_entropy_with_logits(logits, frame_words, reduction="none")
                    pos = frame_words > 0.5
                    l = each[pos].mean() + each[~pos].mean()
                else:
                    l = F.binary_cross_entropy_with_logits(logits, frame_words)
                out.frame_word_loss = l
                out.loss = out.loss + self.fw * l
            return out

    model = Aided(cfg, a.fw)
    if a.frame_tokens:  # not TVP: one visual token per frame and grid cell, with a learned temporal embedding
        emb = model.model.visual_embeddings
        emb.position_embeddings.requires_grad_(True)

        def per_frame(grid, interpolate_pos_encoding=False):
            b, t, h, w, d = grid.shape
            x = grid + emb.position_grid(h, w, False)[:, None] + emb.position_embeddings.weight[:t][None, :, None, None]
            return emb.dropout(emb.layer_norm(x.reshape(b, t * h * w, d) + emb.token_type_embeddings.weight[0]))
        emb.forward = per_frame
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)

    def shuffled(sample):
        """The video with its runs of frames (each event's frames, each gap between) in a random order, the queries'
        segments moved with their frames (offsets from the first sampled frame kept)."""
        import copy
        rec = sample.record
        times = np.asarray(rec["frame_times"])
        qs = rec["queries"]
        n = len(times)
        if len(sample.frames) != n:
            return sample
        ev = np.full(n, -1)
        for k, q in enumerate(qs):
            ev[(times >= float(q["start"])) & (times < float(q["end"]))] = k
        if any((ev == k).sum() == 0 for k in range(len(qs))):
            return sample
        runs, i = [], 0
        while i < n:
            j = i
            while j < n and ev[j] == ev[i]:
                j += 1
            runs.append((i, j))
            i = j
        rng.shuffle(runs)
        order = np.concatenate([np.arange(i, j) for i, j in runs])
        dt = float(rec["duration"]) / n
        new_first = {}
        pos = 0
        for i, j in runs:
            if ev[i] >= 0:
                new_first[int(ev[i])] = (pos, i)
            pos += j - i
        nq = []
        for k, q in enumerate(qs):
            new, old = new_first[k]
            shift = (new - old) * dt
            d = float(rec["duration"])
            nq.append({**q, "start": min(max(float(q["start"]) + shift, 0.0), d), "end": min(max(float(q["end"]) + shift, 0.0), d)})
        out = copy.copy(sample)
        out.frames = sample.frames[order]
        out.record = {**rec, "queries": nq}
        return out

    def batch_of(samples):
        if a.shuffle:
            samples = [shuffled(s) for s in samples]
            for s in samples:
                s.fw = frame_targets(s) if a.fw else None
        items = [batcher.prepare(s, rng) for s in samples]
        b = batcher.collate(items, rng)
        b["frame_words"] = torch.stack([s.fw for s in samples]) if a.fw else None
        return b

    @torch.no_grad()
    def evaluate(samples):
        """(grounding metrics, query-swap shares) over every query of ``samples``, through the evaluation job's
        own pixels and predict (``TvpEvaluator``)."""
        evaluator = TvpEvaluator(model, tok, EvalSettings())  # puts the model in eval mode
        queries = []
        for s in samples:
            pixels = evaluator.pixels(s.frames)
            queries += [{"key": s.key, "duration": float(s.record["duration"]), "sentence": q["sentence"],
                         "true": [float(q["start"]), float(q["end"])], "pixels": pixels} for q in s.record["queries"]]
        rows = [r for i in range(0, len(queries), 16) for r in evaluator.predict(queries[i:i + 16])]
        model.train()
        true = torch.tensor([r["true"] for r in rows], dtype=torch.float64)
        pred = torch.tensor([r["predicted"] for r in rows], dtype=torch.float64)
        m = metrics.grounding_metrics(pred, true)
        sw = metrics.query_swap(pred, true, metrics.distinct_event_pairs([r["key"] for r in rows], true))
        return m, sw

    t0 = time.time()
    order = []
    hist = {}
    for step in range(1, a.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, base_lr=a.lr, warmup_steps=50, max_steps=a.steps, min_lr_ratio=0.1)
        if len(order) < a.batch:
            order += rng.sample(range(len(train)), len(train))
        pick, order = order[:a.batch], order[a.batch:]
        b = batch_of([train[i] for i in pick])
        out = model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"], word_segments=b["word_segments"],
                    word_segment_mask=b["word_segment_mask"], query_token_mask=b["query_token_mask"], frame_words=b["frame_words"])
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k in ("grounding_loss", "word_segment_loss", "query_token_loss", "frame_word_loss"):
            v = getattr(out, k, None)
            if v is not None:
                hist.setdefault(k, []).append(float(v.detach()))
        if step % 50 == 0:
            print(f"[{a.tag}] step {step} {time.time()-t0:.0f}s " + " ".join(f"{k.split('_')[0]}={np.mean(v[-50:]):.3f}" for k, v in hist.items()), flush=True)
        if step % a.eval_every == 0 or step == a.steps:
            mt, _ = evaluate(train)
            m, sw = evaluate(test)
            print(f"[{a.tag}] EVAL step {step}: train R@1@0.5 {mt[metrics.recall_key(0.5)]:.3f} | test R@1 0.3/0.5/0.7 "
                  f"{m[metrics.recall_key(0.3)]:.3f}/{m[metrics.recall_key(0.5)]:.3f}/{m[metrics.recall_key(0.7)]:.3f} "
                  f"mIoU {m['miou']:.3f} swap lands {sw['swap_lands_on_other']:.3f} own {sw['swap_own_on_other']:.3f} moved {sw['swap_moved']:.3f}", flush=True)
