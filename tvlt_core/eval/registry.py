"""The MLflow side of an evaluation: which registered version a URI names, the evaluation run, promotion by alias.

    ref = resolve_ref("models:/tvp-grounding@champion", client)      # pinned: models:/tvp-grounding/3
    run_id = log_evaluation(client, report, ref, data=..., params=..., experiment="evaluation")
    decision = promote(client, ref, report, "champion", "r1_iou0.5", incumbent_value, digest=digest)

An evaluation run holds the settings (params), the data (an MLflow dataset input with context "evaluation"), every
metric of the report (references under ``<reference>/<metric>``), the table (the run's description and
``evaluation/report.txt``) and the report's detail files; its tags name the model version. The version itself gets
the model's metrics as tags ``eval.<metric>``, with ``eval.run_id`` linking back to the run and ``eval.digest``
naming the data and settings they were measured on (promotion reads them); the run's metrics are also linked to
the version's MLflow model and the evaluated dataset, so the registered version's page shows them.

Promotion moves an alias to the evaluated version only when it is strictly better on the chosen metric than the
version holding the alias now, measured on the same data with the same settings (read from the holder's tags when
its ``eval.digest`` matches, else measured again by the caller). Nothing holding the alias yet counts as beaten.
Evaluators promoting at once end with the best of them holding the alias, by a re-check that converges (MLflow
has no compare-and-set on aliases; ``promote`` says why it is safe); a non-finite result never takes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvlt_core.eval.report import Report
from tvlt_core.redaction import redact
from tvlt_core.tracking import (DatasetInfo, artifact_location, ensure_experiment, flatten, logged_model_id,
                                tracking_store)

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
    """One evaluation run for ``report`` of ``ref`` on ``dataset``; tags the registered version. Returns the run id.

    The metrics carry the time they were logged, the registered version's MLflow model (``model_id``) and the
    evaluated dataset (name, digest), so the version's page lists them; the dataset is an input of the run,
    linked to the same model, through ``mlflow.log_input``."""
    import mlflow
    from mlflow.entities import LoggedModelInput, Metric, Param

    tags = {"tvlt.task": report.task, "tvlt.evaluation_of": ref.describe(), "model.uri": redact(ref.uri),
            "model.name": ref.name, "model.version": ref.version, "model.run_id": ref.run_id, "eval.digest": digest,
            "mlflow.note.content": f"Evaluation of {ref.describe()} on `{redact(dataset.manifest_url)}`\n\n```\n"
                                   f"{report.table()}\n```\n"}  # fmt: skip
    name = f"eval-{ref.name}-v{ref.version}" if ref.registered else f"eval-{Path(ref.uri.rstrip('/')).name}"
    experiment_id = ensure_experiment(client, experiment, artifact_location(client.tracking_uri, experiment))
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    values = flatten(redact(dict(params)))
    client.log_batch(run_id, params=[Param(k, v) for k, v in values.items()])
    model_id = logged_model_id(client.get_model_version(ref.name, ref.version)) if ref.registered else None
    evaluated, now = dataset.mlflow_dataset(), int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0, model_id=model_id, dataset_name=evaluated.name,
                                             dataset_digest=evaluated.digest, run_id=run_id)
                                      for k, v in report.metrics().items() if math.isfinite(v)])  # fmt: skip
    with tracking_store(client.tracking_uri), mlflow.start_run(run_id=run_id):
        mlflow.log_input(evaluated, context="evaluation", tags=dataset.input_tags(),
                         model=LoggedModelInput(model_id) if model_id else None)  # fmt: skip
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
            incumbent_value: Callable[[ModelRef], float], *, digest: str, rounds: int = 8,
            pause: Callable[[str, int], None] = lambda stage, round_: None) -> Promotion:  # fmt: skip
    """Move ``alias`` to the best of ``ref`` and every other version contending for it on the same data and
    settings (``digest``), when that beats the version holding it (strictly: a tie keeps the holder).
    ``incumbent_value(holder)`` gives the holder's score when its tags hold none for ``digest``.

    MLflow has no compare-and-set on aliases, so two evaluators promoting at once could each read the holder,
    and the slower writer win whatever it scored. Instead, a re-check that converges:

    1. contend: tag the version ``eval.promote.<alias>`` = digest (its ``eval.<metric>`` tags are already there);
    2. read the holder and every contender's score on this digest; the best is the holder unless a contender
       strictly beats it (ties among contenders: the lowest version, so every evaluator picks the same);
    3. if the holder is not that best, set the alias to it and go to 2; stop when a read finds the best holding.

    Why it is safe: each evaluator contends before its first read, and stops only after a read, taken after its
    own last write, that found the alias on the best of what it saw. Take the last write of all. Its writer's
    final read came after it, so saw the alias as written and every contender that had contended by then, and
    found it the best. Any later contender reads afterwards, sees that alias, and would have written (there is
    no later write) had it been better. So the alias ends on the best contender, whatever the interleaving; a
    stale write (decided on an old read) can show a worse version for a moment, until its writer's re-check or
    another's puts the best back. A non-finite result never contends and never takes the alias. A version
    that lost removes its contention tag; a holder keeps it, since a stale write could still displace it.
    ``pause(stage, round)`` runs before contending, each "read" and each "write" (tests force interleavings)."""
    if not ref.registered:
        raise ValueError(f"promote: {ref.uri} is not a registered model version; evaluate models:/NAME@ALIAS or /VERSION")
    row = report.row(metric)
    if not math.isfinite(row.value):
        decision = Promotion(alias, metric, False, f"{metric} is {row.value}: a non-finite result never takes @{alias}", row.value)
        log.info("%s %s", ref.describe(), decision.summary())
        return decision
    contend_tag = f"{TAG_PREFIX}promote.{alias}"
    pause("contend", 0)
    client.set_model_version_tag(ref.name, ref.version, contend_tag, digest)
    outside: dict[str, float] = {}  # holders that are not contenders: their score, measured once
    for round_ in range(rounds):
        pause("read", round_)
        holder = client.get_registered_model(ref.name).aliases.get(alias)
        holder = str(holder) if holder is not None else None
        first_holder = holder if round_ == 0 else first_holder
        scores = contenders(client, ref.name, contend_tag, metric, digest)
        if holder is not None and holder not in scores and holder not in outside:
            outside[holder] = incumbent_value(ModelRef(uri=f"models:/{ref.name}/{holder}",
                                                       load_uri=f"models:/{ref.name}/{holder}", name=ref.name,
                                                       version=holder))  # fmt: skip
        best = choose(holder, {**outside, **scores}, row.higher_is_better)
        if best == holder:
            return _decided(client, ref, row, alias, metric, holder, {**outside, **scores}, contend_tag, first_holder)
        pause("write", round_)
        client.set_registered_model_alias(ref.name, alias, best)
    raise RuntimeError(f"promote: @{alias} of {ref.name} did not settle in {rounds} rounds of re-checking")


def contenders(client, name: str, contend_tag: str, metric: str, digest: str) -> dict[str, float]:
    """Versions contending for an alias on ``digest``, with their finite ``metric`` scored on it."""
    found = {}
    for v in client.search_model_versions(f"name='{name}'"):
        tags = v.tags or {}
        if tags.get(contend_tag) == digest and tags.get(TAG_PREFIX + "digest") == digest and TAG_PREFIX + metric in tags:
            value = float(tags[TAG_PREFIX + metric])
            if math.isfinite(value):
                found[str(v.version)] = value
    return found


def choose(holder: str | None, scores: dict[str, float], higher_is_better: bool) -> str | None:
    """The holder, unless a version strictly beats it; the best such (ties: the lowest version number)."""
    sign = 1.0 if higher_is_better else -1.0
    challengers = [v for v in scores if v != holder]
    if not challengers:
        return holder
    best = max(challengers, key=lambda v: (sign * scores[v], -int(v)))
    if holder is None or not math.isfinite(scores.get(holder, math.nan)):
        return best
    return best if sign * scores[best] > sign * scores[holder] else holder


def _decided(client, ref: ModelRef, row, alias: str, metric: str, holder: str | None, scores: dict[str, float],
             contend_tag: str, first_holder: str | None) -> Promotion:  # fmt: skip
    if holder == ref.version == first_holder:
        decision = Promotion(alias, metric, False, f"version {ref.version} already holds @{alias}", row.value,
                             holder, row.value)  # fmt: skip
    elif holder == ref.version:
        was = f"version {first_holder} held it" if first_holder else f"no version held @{alias}"
        decision = Promotion(alias, metric, True, f"{metric} {row.value:.4f}, the best of versions "
                             f"{sorted(scores, key=int)} ({was})", row.value, first_holder or "")  # fmt: skip
    else:
        client.delete_model_version_tag(ref.name, ref.version, contend_tag)  # lost: no longer a contender
        theirs = scores.get(holder, math.nan) if holder is not None else math.nan
        decision = Promotion(alias, metric, False, f"{metric} {row.value:.4f} does not beat version {holder}'s "
                             f"{theirs:.4f}", row.value, holder or "", theirs)  # fmt: skip
    log.info("%s %s", ref.describe(), decision.summary())
    return decision
