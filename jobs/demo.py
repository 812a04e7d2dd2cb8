"""The main job: the whole pipeline end to end on the embedded defaults (local Ray, sqlite MLflow, local folders,
the synthetic corpus), ending with models that beat their baselines on held-out videos. The README's first command:

    make demo                      # = .venv/bin/python -m jobs.demo
    python -m jobs.demo --work_dir work/demo --corpus.pretrain_videos 40
    python -m jobs.demo --pretrain.args '[--schedule.max_steps, 50]' --finetune.args '[--schedule.max_steps, 50]'

Each job gets its preset (``--pretrain.config``), then what the main job sets (its input, its output folders, the
main job's MLflow), then the overrides in ``--pretrain.args``; the training and evaluation configs are made before
the first stage, so a bad override fails at once.

Stages, each a named function below, in order; everything goes under ``work_dir``:
    corpus      synthetic videos: pretraining clips of the default mix (sizes, rates, durations) and broken files
                in corpus/, grounding videos with Charades-STA annotations in corpus-grounding/; reused when
                corpus.json says they were made with the same settings
    split       held-out videos: a seeded share of the pretraining videos (by video, never by clip), listed in
                splits/pretrain-{train,test}.jsonl; grounding uses the corpus's Charades-STA train/test split
    preprocess  Ray Data into WebDataset shards: shards/{pretrain,grounding}-{train,test}
    pretrain    TVLT (MAE + matching) on 2 DeepSpeed ZeRO workers under Ray Train, registered as tvlt-pretrain
    vocab       a WordPiece vocabulary from the training split's sentences (jobs.build_vocab) in vocab/
    finetune    TVP grounding from scratch with that vocabulary, the same machinery, registered as tvp-grounding
    evaluate    both pulled from the registry (models:/NAME@latest), evaluated on the held-out shards on Ray actors
                beside their baselines, logged to MLflow, @champion moved when better
It ends with a summary table, both evaluation tables, and the command that opens the MLflow UI on the results.

Running it again in the same work_dir redoes nothing that is done: the corpus is reused, preprocessing finds no
new video, the training runs (fixed names ``tracking.run_name``) are already at their last step; the evaluation
runs again and @champion stays unless the new numbers beat it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from jobs import evaluate, finetune_tvp, preprocess, pretrain
from jobs.cli import run
from jobs.config import parse, write_resolved
from jobs.build_vocab import VocabSummary, build_and_save
from pipelines.config import PreprocessConfig
from synthetic import CorpusInfo, generate_corpus, load_corpus
from synthetic.corpus import CORPUS_JSON, FORMAT_VERSION, corpus_options
from tvlt_core import shards
from tvlt_core.eval import Report
from tvlt_core.ray_session import connect_ray
from tvlt_core.redaction import redact
from tvlt_core.tracking import tracking_uri

log = logging.getLogger("demo")
VOCAB_DIR = "vocab"  # under work_dir: the WordPiece vocabulary TVP fine-tunes with
T = TypeVar("T")


@dataclass
class CorpusSection:
    pretrain_videos: int = 192  # a quarter held out (~150 clips); fewer training videos are memorised, not generalised
    grounding_videos: int = 150  # a quarter are the Charades-STA test split
    seed: int = 0
    broken: bool = True
    heldout_fraction: float = 0.25  # pretraining videos held out for evaluation
    # Grounding videos are made small and slow (cheap to write and decode) and all of one kind; pretraining clips
    # keep the default mix of sizes, rates and durations.
    grounding_size: list[int] = field(default_factory=lambda: [160, 120])
    grounding_fps: int = 10
    grounding_duration: list[float] = field(default_factory=lambda: [18.0, 30.0])

    def __post_init__(self):
        if self.pretrain_videos < 2 or self.grounding_videos < 2:
            raise ValueError("corpus.pretrain_videos and corpus.grounding_videos must be >= 2 (some are held out)")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"corpus.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if len(self.grounding_size) != 2 or len(self.grounding_duration) != 2:
            raise ValueError("corpus.grounding_size is [width, height], corpus.grounding_duration [low, high] s")


@dataclass
class JobSection:
    """One job of the pipeline: its preset and any extra command-line overrides (``["--optim.lr", "1e-3"]``), which
    win over what the main job sets."""

    config: str = ""
    # Numbers are taken as typed: '[--schedule.max_steps, 10]' reads 10 as a YAML int, and the job's argv wants text.
    args: list[str | int | float] = field(default_factory=list)

    def __post_init__(self):
        self.args = [str(a) for a in self.args]


@dataclass
class DemoConfig:
    work_dir: str = "work/demo"
    corpus: CorpusSection = field(default_factory=CorpusSection)
    preprocess_pretrain: JobSection = field(default_factory=lambda: JobSection("demo_preprocess_pretrain"))
    preprocess_grounding: JobSection = field(default_factory=lambda: JobSection("demo_preprocess_grounding"))
    pretrain: JobSection = field(default_factory=lambda: JobSection("tvlt_demo"))
    finetune: JobSection = field(default_factory=lambda: JobSection("tvp_demo"))
    evaluate: JobSection = field(default_factory=lambda: JobSection("", ["--parallel.actors", "2"]))
    promote: str = "champion"  # alias moved to an evaluated version that beats its holder ("" = no promotion)


@dataclass
class Shards:
    """The four shard folders the pipeline makes, ``<work_dir>/shards/pretrain-train`` and so on."""

    pretrain_train: str
    pretrain_test: str
    grounding_train: str
    grounding_test: str

    @classmethod
    def under(cls, work: Path) -> Shards:
        return cls(*(str((work / "shards" / f.name.replace("_", "-")).resolve()) for f in fields(cls)))


def job_config(config_cls: type[T], job: JobSection, prog: str, settings: dict[str, Any]) -> T:
    """A job's config: its defaults < its preset ``job.config`` < the main job's ``settings`` < ``job.args``."""
    return parse(config_cls, job.args, prog=prog, preset=job.config, settings=settings)


def job_configs(
    cfg: DemoConfig, out: Shards, work: Path
) -> tuple[pretrain.PretrainConfig, finetune_tvp.FinetuneConfig, dict[str, evaluate.EvaluateConfig]]:
    """The training and evaluation jobs' configs ({stage name: config} for the evaluations), with the main job's
    shards, MLflow, run and vocabulary folders."""
    folders = {"work_dir": str(work), "checkpoint": {"storage_path": str(work / "runs")}}
    pretraining = job_config(pretrain.PretrainConfig, cfg.pretrain, "pretrain",
                             {**folders, "data": {"manifest": out.pretrain_train}})  # fmt: skip
    finetuning = job_config(finetune_tvp.FinetuneConfig, cfg.finetune, "finetune_tvp",
                            {**folders, "data": {"manifest": out.grounding_train},
                             "text": {"tokenizer": str(work / VOCAB_DIR)}})  # fmt: skip
    evaluations = {
        name: job_config(evaluate.EvaluateConfig, cfg.evaluate, "evaluate",
                         {"model": model, "data": data, "work_dir": str(work), "promote": cfg.promote})
        for name, model, data in (("evaluate tvlt", "models:/tvlt-pretrain@latest", out.pretrain_test),
                                  ("evaluate tvp", "models:/tvp-grounding@latest", out.grounding_test))
    }  # fmt: skip
    return pretraining, finetuning, evaluations


# --- stages -----------------------------------------------------------------------------------------------------------
def _same_corpus(root: Path, seed: int, counts: dict[str, int], options: dict) -> CorpusInfo | None:
    """The corpus already in ``root`` when it was made with these settings (``options`` as ``corpus_options``
    gives them); rewriting identical files would change their mtimes, and preprocessing would take them for changed
    videos."""
    if not (root / CORPUS_JSON).exists():
        return None
    made = json.loads((root / CORPUS_JSON).read_text())
    info = load_corpus(root)
    found = {kind: len(info.of_kind(kind)) for kind in counts}
    same_options = options == made.get("options")
    same_generator = made.get("format_version") == FORMAT_VERSION
    return info if same_generator and made.get("seed") == seed and found == counts and same_options else None


def stage_corpus(cfg: CorpusSection, work: Path) -> tuple[CorpusInfo, CorpusInfo]:
    """(pretraining + broken corpus, grounding corpus)."""
    from synthetic import BROKEN_KINDS

    counts = {"pretrain": cfg.pretrain_videos, "broken": len(BROKEN_KINDS) if cfg.broken else 0}
    pretrain_corpus = _same_corpus(work / "corpus", cfg.seed, counts, corpus_options()) or generate_corpus(
        work / "corpus", cfg.pretrain_videos, 0, cfg.seed, cfg.broken
    )
    size, duration = tuple(cfg.grounding_size), tuple(cfg.grounding_duration)
    options = corpus_options(size=size, fps=cfg.grounding_fps, duration=duration)
    grounding_corpus = _same_corpus(work / "corpus-grounding", cfg.seed, {"grounding": cfg.grounding_videos}, options)
    if grounding_corpus is None:
        grounding_corpus = generate_corpus(work / "corpus-grounding", 0, cfg.grounding_videos, cfg.seed,
                                           size=size, fps=cfg.grounding_fps, duration=duration)  # fmt: skip
    return pretrain_corpus, grounding_corpus


def stage_split(corpus: CorpusInfo, cfg: CorpusSection, work: Path) -> tuple[str, str]:
    """List files of the pretraining videos to train on (broken files included: they are quarantined) and to
    hold out. Returns (train list, test list)."""
    videos = corpus.of_kind("pretrain")
    held = set(random.Random(cfg.seed).sample(range(len(videos)), max(1, round(cfg.heldout_fraction * len(videos)))))
    folder = work / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    lists = {"train": [v for i, v in enumerate(videos) if i not in held] + corpus.of_kind("broken"),
             "test": [v for i, v in enumerate(videos) if i in held]}  # fmt: skip
    for split, records in lists.items():
        lines = [json.dumps({"uri": str(corpus.path(r).resolve())}) for r in records]
        (folder / f"pretrain-{split}.jsonl").write_text("".join(f"{line}\n" for line in lines))
    return str(folder / "pretrain-train.jsonl"), str(folder / "pretrain-test.jsonl")


def _preprocess(job: JobSection, settings: dict[str, Any]) -> None:
    cfg = job_config(PreprocessConfig, job, "preprocess", settings)
    if preprocess.run_preprocessing(cfg) != 0:
        raise RuntimeError(f"preprocessing {cfg.input} -> {cfg.output} failed; see the log above")


def stage_preprocess(cfg: DemoConfig, lists: tuple[str, str], grounding: CorpusInfo, out: Shards) -> None:
    for source, folder in ((lists[0], out.pretrain_train), (lists[1], out.pretrain_test)):
        _preprocess(cfg.preprocess_pretrain, {"mode": "pretrain", "input": source, "output": folder})
    videos = str(grounding.root.resolve() / "grounding")
    for split, folder in (("train", out.grounding_train), ("test", out.grounding_test)):
        annotations = [str(grounding.annotation_file(split))]
        _preprocess(cfg.preprocess_grounding, {"mode": "grounding", "input": videos, "output": folder,
                                               "grounding": {"annotations": annotations}})  # fmt: skip


def stage_vocab(grounding: CorpusInfo, max_text_length: int, work: Path) -> VocabSummary:
    """The tokenizer TVP trains with, from the training split only (test sentences must not shape it)."""
    return build_and_save([str(grounding.annotation_file("train"))], str(work / VOCAB_DIR), vocab_size=500,
                          max_text_length=max_text_length)  # fmt: skip


def stage_train(run_job, cfg) -> None:
    """Pretraining or fine-tuning: the job's own ``run_*`` function on its config."""
    if run_job(cfg) != 0:
        raise RuntimeError(f"training on {cfg.data.manifest} failed; see the log above")


# --- the summary --------------------------------------------------------------------------------------------------------
def _samples(folder: str) -> str:
    manifest = shards.load_manifest(folder)
    quarantined = len(manifest.quarantine())
    return f"{manifest.num_samples} samples in {len(manifest.shards)} shards" + (
        f", {quarantined} quarantined" if quarantined else "")


# The metrics that show each model learned, read beside their references on held-out videos.
EVIDENCE = {"tvlt-pretrain": ("matching_accuracy", "a2v_r1"), "tvp-grounding": ("r1_iou0.5", "miou", "swap_moved")}


def learning_line(report: Report) -> str:
    """``label value (reference value, ratio; ...)`` for the report's evidence metrics."""
    parts = []
    for key in EVIDENCE[report.task]:
        row = report.row(key)
        refs = "; ".join(f"{name} {v:.3f}" + (f", {row.value / v:.1f}x" if v > 0 else "")
                         for name, v in row.references.items())  # fmt: skip
        parts.append(f"{row.label} {row.value:.3f} ({refs})")
    return ", ".join(parts)


def summary_table(rows: list[tuple[str, str, float]]) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{width}}  {'seconds':>8}  result", f"{'-' * width}  {'-' * 8}  {'-' * 40}"]
    lines += [f"{name:<{width}}  {secs:8.1f}  {result}" for name, result, secs in rows]
    return "\n".join(lines)


def mlflow_ui_command(work: Path) -> str:
    uri = tracking_uri(str(work))
    if not uri.startswith("sqlite:"):
        return f"open {redact(uri)} (the tracking server in MLFLOW_TRACKING_URI)"
    return f".venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   # then open http://127.0.0.1:5000"


def main(argv: list[str] | None = None) -> int:
    cfg = parse(DemoConfig, argv, prog="demo", description=__doc__.split("\n\n")[0])
    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, str(work))
    out = Shards.under(work)
    pretraining, finetuning, evaluations = job_configs(cfg, out, work)
    rows, reports, started = [], [], time.perf_counter()

    def stage(name: str, result, clock: float) -> None:
        rows.append((name, result, time.perf_counter() - clock))
        log.info("stage %s done in %.1f s: %s", name, rows[-1][2], result)

    # one Ray for every stage (each job would otherwise start and stop its own)
    ray_started = connect_ray(dashboard=True)
    try:
        t = time.perf_counter()
        pretrain_corpus, grounding_corpus = stage_corpus(cfg.corpus, work)
        stage("corpus", f"{pretrain_corpus.summary()}; {len(grounding_corpus.of_kind('grounding'))} grounding videos", t)
        t = time.perf_counter()
        lists = stage_split(pretrain_corpus, cfg.corpus, work)
        held = sum(1 for _ in open(lists[1]))
        stage("split", f"{held} pretraining videos held out; grounding: the Charades-STA test split", t)
        t = time.perf_counter()
        stage_preprocess(cfg, lists, grounding_corpus, out)
        stage("preprocess", "; ".join(f"{name} {_samples(getattr(out, name))}" for name in vars(out)), t)
        t = time.perf_counter()
        stage_train(pretrain.run_pretraining, pretraining)
        stage("pretrain", "TVLT registered as models:/tvlt-pretrain@latest", t)
        t = time.perf_counter()
        vocab = stage_vocab(grounding_corpus, finetuning.text.max_text_length, work)
        stage("vocab", f"{vocab.vocab_size} WordPiece tokens from {vocab.sentences} training sentences", t)
        t = time.perf_counter()
        stage_train(finetune_tvp.run_finetuning, finetuning)
        stage("finetune", "TVP registered as models:/tvp-grounding@latest", t)
        for name, evaluation in evaluations.items():
            t = time.perf_counter()
            result = evaluate.run_evaluation(evaluation)
            reports.append(result)
            stage(name, f"{result.ref.describe()}: {learning_line(result.report)}", t)
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    rows.append(("total", f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}", time.perf_counter() - started))
    print("\n" + summary_table(rows), flush=True)
    for result in reports:
        print(f"\n{result.ref.describe()} on {result.data}\n{result.report.table()}", flush=True)
        if result.promotion is not None:
            print(f"promotion: {result.promotion.summary()}", flush=True)
    print("\nlearning, on held-out videos:\n" + "\n".join(f"  {r.ref.describe()}: {learning_line(r.report)}"
                                                      for r in reports), flush=True)  # fmt: skip
    print(f"\nresults in MLflow (loss curves, reconstructions, evaluation runs, registered models):\n  "
          f"{mlflow_ui_command(work)}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
