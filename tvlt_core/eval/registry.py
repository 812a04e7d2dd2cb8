"""The MLflow side of an evaluation: which registered version a URI names, the evaluation run, promotion by alias.

    ref = resolve_ref("models:/tvp-grounding@champion", client)      # pinned: models:/tvp-grounding/3
    run_id = log_evaluation(client, report, ref, data=..., params=..., experiment="evaluation")
    decision = promote(client, ref, report, "champion", "r1_iou0.5", incumbent_value)

An evaluation run holds the settings (params), the data (an MLflow dataset input with context "evaluation"), every
metric of the report (references under ``<reference>/<metric>``), the table (the run's description and
``evaluation/report.txt``) and the report's detail files; its tags name the model version. The version itself gets
the model's metrics as tags ``eval.<metric>``, with ``eval.run_id`` linking back to the run and ``eval.digest``
naming the data and settings they were measured on (registry versions made from run artifacts have no metrics
field of their own, so tags are where the registry UI shows them).

Promotion moves an alias to the evaluated version only when it is strictly better on the chosen metric than the
version holding the alias now, measured on the same data with the same settings (read from the holder's tags when
its ``eval.digest`` matches, else measured again by the caller). Nothing holding the alias yet counts as beaten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvlt_core.eval.report import Report
from tvlt_core.redaction import redact
from tvlt_core.tracking import DatasetInfo, artifact_location, ensure_experiment, flatten

log = logging.getLogger(__name__)

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
TAG_PREFIX = "eval."


@dataclass(frozen=True)
class ModelRef:
    """The model an evaluation is about. For a registered model ``load_uri`` pins the version the alias named when
    the evaluation started, so an alias moving meanwhile cannot mix two versions into one result."""

    uri: str  # as the user gave it
    load_uri: str  # models:/NAME/VERSION, or the folder / fsspec URL itself
    name: str = ""  # registered model name; "" for a plain folder
    version: str = ""
    run_id: str = ""  # the run that produced the version

    @property
    def registered(self) -> bool:
        return bool(self.name)

    def describe(self) -> str:
        return f"{self.name} version {self.version}" if self.registered else self.uri


def resolve_ref(uri: str, client) -> ModelRef:
    """``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` -> the registered version; anything else is a folder."""
    if not uri.startswith("models:/"):
        return ModelRef(uri=uri, load_uri=uri)
    match = MODELS_URI.match(uri)
    if match is None:
        raise ValueError(f"model {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name = match["name"]
    version = client.get_model_version_by_alias(name, match["alias"]) if match["alias"] else client.get_model_version(name, match["version"])
    return ModelRef(uri=uri, load_uri=f"models:/{name}/{version.version}", name=name, version=str(version.version),
                    run_id=version.run_id or "")  # fmt: skip


def data_digest(dataset: DatasetInfo, settings: Mapping[str, Any]) -> str:
    """Names the data and the settings metrics were measured with: equal digests, comparable numbers."""
    identity = {"data": redact(dataset.manifest_url), "generation": dataset.generation, "recipe": dataset.recipe_hash,
                "samples": dataset.num_samples, "settings": dict(settings)}  # fmt: skip
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def log_evaluation(client, report: Report, ref: ModelRef, *, dataset: DatasetInfo, params: Mapping[str, Any],
                   digest: str, experiment: str) -> str:  # fmt: skip
    """One evaluation run for ``report`` of ``ref`` on ``dataset``; tags the registered version. Returns the run id."""
    from mlflow.entities import DatasetInput, InputTag, Metric, Param
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    tags = {"tvlt.task": report.task, "tvlt.evaluation_of": ref.describe(), "model.uri": redact(ref.uri),
            "model.name": ref.name, "model.version": ref.version, "model.run_id": ref.run_id, "eval.digest": digest,
            "mlflow.note.content": f"Evaluation of {ref.describe()} on `{redact(dataset.manifest_url)}`\n\n```\n"
                                   f"{report.table()}\n```\n"}  # fmt: skip
    name = f"eval-{ref.name}-v{ref.version}" if ref.registered else f"eval-{Path(ref.uri.rstrip('/')).name}"
    experiment_id = ensure_experiment(client, experiment, artifact_location(client.tracking_uri, experiment))
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    values = flatten(redact(dict(params)))
    client.log_batch(run_id, params=[Param(k, v) for k, v in values.items()])
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in report.metrics().items() if math.isfinite(v)])
    url = redact(dataset.manifest_url)
    source = MetaDataset(resolve_dataset_source(url), name=url.rstrip("/").rsplit("/", 1)[-1], digest=dataset.recipe_hash)
    input_tags = {"mlflow.data.context": "evaluation", "generation": str(dataset.generation),
                  "recipe_hash": dataset.recipe_hash, "samples": str(dataset.num_samples)}  # fmt: skip
    client.log_inputs(run_id, datasets=[DatasetInput(source._to_mlflow_entity(), [InputTag(k, v) for k, v in input_tags.items()])])
    files = {"report.txt": report.table().encode() + b"\n", "metrics.json": json.dumps(report.metrics(), indent=1).encode(),
             **report.files}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for file_name, data in files.items():
            (Path(tmp) / file_name).write_bytes(data)
        client.log_artifacts(run_id, tmp, "evaluation")
    client.set_terminated(run_id)
    if ref.registered:
        for key, value in {**{row.key: f"{row.value:.6g}" for row in report.rows}, "run_id": run_id, "digest": digest}.items():
            client.set_model_version_tag(ref.name, ref.version, TAG_PREFIX + key, value)
    log.info("MLflow: evaluation run %s (%s) in experiment %s%s", name, run_id, experiment,
             f"; metrics tagged on {ref.describe()}" if ref.registered else "")  # fmt: skip
    return run_id


def stored_value(client, ref: ModelRef, metric: str, digest: str) -> float | None:
    """``metric`` from ``ref``'s tags when they were measured with ``digest`` (same data, same settings)."""
    tags = client.get_model_version(ref.name, ref.version).tags
    if tags.get(TAG_PREFIX + "digest") != digest or TAG_PREFIX + metric not in tags:
        return None
    return float(tags[TAG_PREFIX + metric])


@dataclass(frozen=True)
class Promotion:
    """What ``promote`` decided, and on which numbers."""

    alias: str
    metric: str
    promoted: bool
    reason: str
    value: float
    incumbent_version: str = ""
    incumbent_value: float = math.nan

    def summary(self) -> str:
        return f"@{self.alias}: {'moved' if self.promoted else 'not moved'} ({self.reason})"


def promote(client, ref: ModelRef, report: Report, alias: str, metric: str,
            incumbent_value: Callable[[ModelRef], float]) -> Promotion:  # fmt: skip
    """Move ``alias`` to ``ref`` when it beats the version holding the alias on ``metric`` (strictly: a tie keeps
    the holder). ``incumbent_value(holder)`` gives the holder's score on the same data and settings."""
    if not ref.registered:
        raise ValueError(f"promote: {ref.uri} is not a registered model version; evaluate models:/NAME@ALIAS or /VERSION")
    row = report.row(metric)
    holder_version = client.get_registered_model(ref.name).aliases.get(alias)
    if holder_version is None:
        decision = Promotion(alias, metric, True, f"no version held @{alias}", row.value)
    elif str(holder_version) == ref.version:
        decision = Promotion(alias, metric, False, f"version {ref.version} already holds @{alias}", row.value,
                             str(holder_version), row.value)  # fmt: skip
    else:
        holder = ModelRef(uri=f"models:/{ref.name}/{holder_version}", load_uri=f"models:/{ref.name}/{holder_version}",
                          name=ref.name, version=str(holder_version))  # fmt: skip
        theirs = incumbent_value(holder)
        better = row.beats(theirs)
        verdict = "beats" if better else "does not beat"
        reason = f"{metric} {row.value:.4f} {verdict} version {holder_version}'s {theirs:.4f}"
        decision = Promotion(alias, metric, better, reason, row.value, str(holder_version), theirs)
    if decision.promoted:
        client.set_registered_model_alias(ref.name, alias, ref.version)
    log.info("%s %s", ref.describe(), decision.summary())
    return decision
