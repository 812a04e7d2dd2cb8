"""Evaluate a model pulled from the MLflow registry on held-out shards, log the result back, optionally promote it.

    python jobs/evaluate.py --model models:/tvp-grounding@champion --data work/shards/grounding-test
    python jobs/evaluate.py --model models:/tvlt-pretrain@latest --data s3://bucket/shards/pretrain-test --parallel.actors 4
    python jobs/evaluate.py --model models:/tvp-grounding@latest --data DIR --promote champion   # move @champion if better
    python jobs/evaluate.py --model /models/tvp-base --data DIR          # a Hugging Face checkpoint folder, no registry

What is measured follows the checkpoint's ``model_type`` (tvlt_core/eval): TVP grounding R@1 at IoU 0.3/0.5/0.7 and
mIoU beside a random segment and the best constant segment; TVLT masked reconstruction per modality beside a
mean-fill reconstruction, matching accuracy and ROC-AUC and audio-to-video R@1/5/10 beside chance. The table is
printed, logged as an MLflow run in experiment ``tracking.experiment`` (tagged with the model version) and the
version gets the metrics as ``eval.*`` tags. ``--parallel.actors N`` evaluates on N Ray actors (a cluster when
``RAY_ADDRESS`` is set), each loading the model once; the numbers are those of the single-process run.

``--promote ALIAS`` moves ALIAS to the evaluated version only when it beats, on ``--promote_metric`` (default:
TVP r1_iou0.5, TVLT a2v_r1), the version holding ALIAS now, scored on the same data with the same settings.
Exit codes: 0 done (promoted or not), 2 bad config.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from jobs.cli import run
from jobs.config import ConfigError, parse, to_dict
from tvlt_core.eval import EvalParallel, EvalSettings, Report, evaluate
from tvlt_core.eval.registry import ModelRef, Promotion, data_digest, log_evaluation, promote, resolve_ref, stored_value
from tvlt_core.redaction import redact
from tvlt_core.tracking import DEFAULT_WORK_DIR, DatasetInfo, tracking_uri
from tvlt_core.train.ray_job import dataset_info
from tvlt_core.uris import absolute

log = logging.getLogger("evaluate")


@dataclass
class EvalTrackingSection:
    experiment: str = "evaluation"
    log: bool = True  # false: print the table only, write nothing to MLflow (no promotion either)


@dataclass
class EvaluateConfig:
    model: str = ""  # models:/NAME@ALIAS, models:/NAME/VERSION, or a Hugging Face checkpoint folder / URL
    data: str = ""  # shard folder (or its manifest.json), local or s3://
    promote: str = ""  # alias to move to the evaluated version when it beats the version holding it
    promote_metric: str = ""  # "" = the task's primary metric
    eval: EvalSettings = field(default_factory=EvalSettings)
    parallel: EvalParallel = field(default_factory=EvalParallel)
    tracking: EvalTrackingSection = field(default_factory=EvalTrackingSection)
    work_dir: str = DEFAULT_WORK_DIR  # local MLflow (sqlite + artifacts) when MLFLOW_TRACKING_URI is unset

    def __post_init__(self):
        if not self.model:
            raise ValueError("model: required, models:/NAME@ALIAS (e.g. models:/tvp-grounding@champion) or a folder")
        if not self.data:
            raise ValueError("data: required, the shard folder to evaluate on (jobs/preprocess.py --output)")
        if self.promote and not self.model.startswith("models:/"):
            raise ValueError(f"promote: needs a registered model (models:/NAME@ALIAS), not {self.model!r}")
        if self.promote.lower() == "latest":
            raise ValueError("promote: 'latest' is reserved by MLflow (always the newest version); pick another alias")
        if self.promote and not self.tracking.log:
            raise ValueError("promote: needs tracking.log true (the decision rests on logged, comparable results)")


class Evaluation:
    """One invocation: the MLflow client and what every evaluation of it shares (data, settings, digest)."""

    def __init__(self, cfg: EvaluateConfig, dataset: DatasetInfo):
        from mlflow import MlflowClient

        self.cfg, self.dataset, self.data = cfg, dataset, absolute(cfg.data)
        self.tracking_uri = tracking_uri(cfg.work_dir)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.digest = data_digest(dataset, dataclasses.asdict(cfg.eval))

    def run(self, ref: ModelRef) -> tuple[Report, str]:
        """Evaluate ``ref`` and log it (unless tracking.log is false); returns the report and the run id."""
        report = evaluate(ref.load_uri, self.data, self.cfg.eval, self.cfg.parallel, self.tracking_uri)
        run_id = ""
        if self.cfg.tracking.log:
            params = {**to_dict(self.cfg), "model": ref.uri, "model_version": ref.version or "-"}
            run_id = log_evaluation(self.client, report, ref, dataset=self.dataset, params=params, digest=self.digest,
                                    experiment=self.cfg.tracking.experiment)  # fmt: skip
        return report, run_id

    def holder_value(self, holder: ModelRef, metric: str) -> float:
        """The alias holder's ``metric`` on this data: from its tags when measured with the same digest, else
        evaluated now (and logged, like any evaluation)."""
        value = stored_value(self.client, holder, metric, self.digest)
        if value is not None:
            log.info("%s: %s %.4f on the same data and settings (from its eval.* tags)", holder.describe(), metric, value)
            return value
        log.info("%s has no %s on this data and settings: evaluating it too", holder.describe(), metric)
        ref = resolve_ref(holder.load_uri, self.client)
        return self.run(ref)[0].value(metric)

    def promote(self, ref: ModelRef, report: Report) -> Promotion:
        metric = self.cfg.promote_metric or report.primary
        try:
            report.row(metric)
        except KeyError as e:
            raise ConfigError(f"evaluate: promote_metric: {e.args[0]}") from e
        return promote(self.client, ref, report, self.cfg.promote, metric, lambda h: self.holder_value(h, metric),
                       digest=self.digest)  # fmt: skip


@dataclass
class EvaluationResult:
    ref: ModelRef
    data: str
    report: Report
    run_id: str  # "" when tracking.log is false
    promotion: Promotion | None
    tracking_uri: str

    def text(self) -> str:
        """What the job prints: the table, where it was logged, what happened to the alias."""
        lines = [f"evaluation of {self.ref.describe()} ({self.ref.uri}) on {redact(self.data)}", self.report.table()]
        if self.run_id:
            lines.append(f"mlflow: evaluation run {self.run_id} at {redact(self.tracking_uri)}")
        if self.promotion is not None:
            lines.append(f"promotion: {self.promotion.summary()}")
        return "\n".join(lines)


def run_evaluation(cfg: EvaluateConfig) -> EvaluationResult:
    """Resolve the model, evaluate, log, promote: the job without its command line (the main job calls it)."""
    try:
        dataset = dataset_info(absolute(cfg.data))
    except FileNotFoundError as e:
        raise ConfigError(f"evaluate: data {cfg.data}: no manifest.json there ({e})") from e
    job = Evaluation(cfg, dataset)
    if cfg.model.startswith("models:/"):
        from mlflow.exceptions import MlflowException

        try:
            ref = resolve_ref(cfg.model, job.client)
        except (MlflowException, ValueError) as e:  # no such model, version or alias: the message says which
            raise ConfigError(f"evaluate: model {cfg.model}: {e}") from e
    else:
        ref = ModelRef(uri=cfg.model, load_uri=absolute(cfg.model))
    report, run_id = job.run(ref)
    decision = job.promote(ref, report) if cfg.promote else None
    return EvaluationResult(ref, cfg.data, report, run_id, decision, job.tracking_uri)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(EvaluateConfig, argv, prog="evaluate", description=__doc__.split("\n\n")[0])
    print(run_evaluation(cfg).text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
