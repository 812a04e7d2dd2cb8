"""Evaluate a model on the shards of a manifest, in this process or on Ray actors, with the same result either way.

    report = evaluate("models:/tvp-grounding/3", "work/shards/grounding-test", EvalSettings(), EvalParallel(actors=2))

Work is cut into units, one per shard (``settings.eval_units``). Each unit is evaluated by the same code with the
same batches wherever it runs, and every random choice inside (MAE masking noise, random baselines) is seeded from
the settings and the sample keys, never from the process. The per-unit results are put back in manifest order
before any metric is computed, so ``EvalParallel(actors=N)`` gives the single-process report for every N (up to
the last bits of float arithmetic where two processes run torch with different thread counts).

On Ray each actor loads the model once (a ``models:/`` URI is fetched from the registry by the actor itself, so
actors may sit on other machines) and is handed units until none are left.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import fsspec

from tvlt_core.eval.report import Report
from tvlt_core.eval.settings import EvalParallel, EvalSettings, EvalUnit, eval_units
from tvlt_core.eval.tvlt import TvltEvaluator
from tvlt_core.eval.tvp import TvpEvaluator
from tvlt_core.ray_session import connect_ray
from tvlt_core.tracking import resolve_model_uri

log = logging.getLogger(__name__)

# config.json ``model_type`` (as Hugging Face writes it) -> the evaluation of that kind of model
EVALUATORS = {"tvlt": TvltEvaluator, "tvp": TvpEvaluator}


def model_folder(model_uri: str, tracking_uri: str = "") -> str:
    """A folder (local or fsspec URL) holding the checkpoint: ``models:/`` URIs are fetched from the registry at
    ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI`` or the local sqlite database)."""
    if not model_uri.startswith("models:/"):
        return model_uri
    return resolve_model_uri(model_uri, store=tracking_uri)


def model_type(folder: str) -> str:
    """``model_type`` of the checkpoint's config.json: "tvlt" or "tvp"."""
    with fsspec.open(folder.rstrip("/") + "/config.json", "r") as f:
        kind = json.load(f).get("model_type", "")
    if kind not in EVALUATORS:
        raise ValueError(f"{folder}: config.json has model_type {kind!r}; evaluation knows {sorted(EVALUATORS)}")
    return kind


def load_evaluator(model_uri: str, settings: EvalSettings, tracking_uri: str = ""):
    folder = model_folder(model_uri, tracking_uri)
    return EVALUATORS[model_type(folder)].load(folder, settings)


class Progress:
    """A log line per finished unit: units and samples done, samples per second, ETA."""

    def __init__(self, units: list[EvalUnit]):
        self.units, self.total = len(units), sum(u.samples for u in units)
        self.done = self.samples = 0
        self.started = time.perf_counter()

    def unit_done(self, unit: EvalUnit) -> None:
        self.done, self.samples = self.done + 1, self.samples + unit.samples
        rate = self.samples / (time.perf_counter() - self.started)
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total - self.samples) / max(rate, 1e-9)))
        log.info("evaluated %d/%d shards, %d/%d samples, %.1f samples/s, ETA %s", self.done, self.units,
                 self.samples, self.total, rate, eta)  # fmt: skip


class EvalWorker:
    """The body of one Ray actor: the model is loaded when the actor starts, then every unit reuses it."""

    def __init__(self, model_uri: str, settings: EvalSettings, tracking_uri: str):
        self.evaluator = load_evaluator(model_uri, settings, tracking_uri)  # the launcher's MLflow, for models:/

    def evaluate_unit(self, unit: EvalUnit) -> dict[str, Any]:
        return self.evaluator.evaluate_unit(unit)


def run_on_ray(model_uri: str, units: list[EvalUnit], settings: EvalSettings, parallel: EvalParallel,
               tracking_uri: str) -> list[dict[str, Any]]:  # fmt: skip
    """Every unit's partial result, from ``parallel.actors`` actors (fewer when there are fewer units)."""
    import ray
    from ray.util import ActorPool

    started = connect_ray(need_cpus=parallel.actors * parallel.cpus_per_actor)
    actor_cls = ray.remote(num_cpus=parallel.cpus_per_actor, num_gpus=parallel.gpus_per_actor)(EvalWorker)
    actors = [actor_cls.remote(model_uri, settings, tracking_uri) for _ in range(min(parallel.actors, len(units)))]
    progress, parts = Progress(units), []
    try:
        for part in ActorPool(actors).map_unordered(lambda actor, unit: actor.evaluate_unit.remote(unit), units):
            parts.append(part)
            progress.unit_done(units[part["unit"]])
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
    return parts


def evaluate(model_uri: str, data_url: str, settings: EvalSettings, parallel: EvalParallel = EvalParallel(),
             tracking_uri: str = "") -> Report:  # fmt: skip
    """Evaluate the checkpoint at ``model_uri`` (``models:/NAME/VERSION``, a folder or an fsspec URL) on the shards
    at ``data_url``; what is measured follows the checkpoint's ``model_type``. ``models:/`` URIs are read from the
    registry at ``tracking_uri``, by this process and by every actor (default: each one's environment)."""
    units = eval_units(data_url)
    folder = model_folder(model_uri, tracking_uri)
    kind = model_type(folder)
    where = f"on {parallel.actors} Ray actors" if parallel.actors else "in this process"
    log.info("evaluating %s (%s) on %d samples in %d shards of %s, %s", model_uri, kind,
             sum(u.samples for u in units), len(units), data_url, where)  # fmt: skip
    if parallel.actors:
        parts = run_on_ray(model_uri, units, settings, parallel, tracking_uri)
    else:
        evaluator, progress, parts = EVALUATORS[kind].load(folder, settings), Progress(units), []
        for unit in units:
            parts.append(evaluator.evaluate_unit(unit))
            progress.unit_done(unit)
    return EVALUATORS[kind].summarize(sorted(parts, key=lambda p: p["unit"]), settings)
