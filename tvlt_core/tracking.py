"""MLflow for training jobs: one run per job (written by rank 0), resumed by name, models exported and registered.

Where: ``MLFLOW_TRACKING_URI`` (a tracking server, ``http://...``) when set, else a sqlite database and an
artifact folder under the work dir (``work/mlflow.db``, ``work/mlartifacts``).

One run per job. The run carries the tag ``tvlt.run_name``; starting a job whose run name already has a run
continues that run (a restarted worker group, or a relaunch to resume), so a job never makes two runs. Metrics
for steps the run already holds are not logged again: after a restart from a checkpoint at step 40, the steps
41..N that the crashed attempt logged are kept and the repeated ones skipped, so each step appears once.

Secrets: params are the resolved config with secrets masked (``tvlt_core.redaction``), redacted again here.

Models. ``export_model`` logs a Hugging Face folder (config.json, model.safetensors, tokenizer files, a model
card README.md, the shards' preprocessing.json) as an MLflow pyfunc model of the run (``tvlt_core.serving``:
models-from-code, signature, input example, requirements from uv.lock; the folder under ``artifacts/checkpoint``)
and registers it as a new version of a registered model, the model card as the version's description;
``models:/NAME@latest`` always resolves to the newest version (MLflow reserves that alias), configured aliases
(e.g. ``candidate``) are moved to it. ``resolve_model_uri`` turns ``models:/NAME@ALIAS`` or ``models:/NAME/N``
into the local Hugging Face folder, which is how ``from_pretrained("models:/...")`` loads a registered model;
``mlflow.pyfunc.load_model`` and ``mlflow models serve`` load the same version as an MLflow model.

Pictures (``log_images``) go through ``log_image`` with the step, so the UI shows them on a step slider.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvlt_core.redaction import redact

log = logging.getLogger(__name__)

RUN_NAME_TAG = "tvlt.run_name"
ATTEMPTS_TAG = "tvlt.attempts"  # 1 + restarts (worker failures, relaunches) of the job
MODEL_ARTIFACT_PATH = "model"
DEFAULT_WORK_DIR = "work"


def tracking_uri(work_dir: str = DEFAULT_WORK_DIR) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else sqlite under ``work_dir`` (created)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    folder = Path(work_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder}/mlflow.db"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite-backed experiment go beside the database file; a server chooses its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts" / experiment).as_uri()
    return None


@contextlib.contextmanager
def tracking_store(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide (fluent) API at ``uri`` for the block, then back. ``mlflow.set_tracking_uri``
    also exports ``MLFLOW_TRACKING_URI``, which would make every later ``tracking_uri(work_dir)`` in this process
    answer this store; the variable is put back as it was."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    point_fluent_api(uri)
    try:
        yield
    finally:
        point_fluent_api(previous)


def point_fluent_api(uri: str) -> None:
    """Point the process-wide API at ``uri`` (a training job's rank 0 for good), leaving the variable alone."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def checkpoint_folder(model_dir: str) -> str:
    """The Hugging Face folder inside a downloaded registered version: ``artifacts/checkpoint`` of an MLflow model
    (read from its MLmodel file), or the folder itself for versions registered as plain folders (before pyfunc)."""
    import yaml

    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.exists():
        return model_dir
    from tvlt_core.serving.export import CHECKPOINT_ARTIFACT

    flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
    return str(Path(model_dir) / flavor["artifacts"][CHECKPOINT_ARTIFACT]["path"])


def logged_model_id(version) -> str | None:
    """The MLflow model (``m-...``) a registered version was made from: ``version.model_id`` where the registry
    keeps it, else read from its source ``models:/m-...`` (MLflow's SQL registry does not store the id), None
    for versions registered from plain artifact folders."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source[len("models:/") :] if source.startswith("models:/m-") and "/" not in source[len("models:/") :] else None


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+|latest))$")


def resolve_model_uri(uri: str, work_dir: str = DEFAULT_WORK_DIR, *, store: str = "") -> str:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/NAME/latest`` -> a local folder holding the
    registered files, from the registry at ``store`` (default: ``tracking_uri(work_dir)``).

    The version is looked up with a client naming that registry explicitly: MLflow's own ``models:/`` resolution
    (``download_artifacts``, even given ``registry_uri``) asks the process-wide registry, which an earlier
    ``mlflow.set_tracking_uri`` in the same process may have pointed at another store."""
    import mlflow
    from mlflow import MlflowClient

    match = _MODEL_URI.match(uri)
    if match is None:
        raise ValueError(f"{uri}: expected models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest")
    store = store or tracking_uri(work_dir)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name, alias, version = match["name"], match["alias"], match["version"]
    if alias is not None:  # the registry resolves the reserved alias "latest" to the newest version itself
        version = client.get_model_version_by_alias(name, alias).version
    elif version == "latest":
        version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    source = client.get_model_version_download_uri(name, str(version))
    return checkpoint_folder(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=store))


def ensure_experiment(client, name: str, location: str | None) -> str:
    """The experiment's id, created when missing (another job creating it at the same moment is fine)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"optim.lr": "0.0001", ...} (strings cut to MLflow's 6000-character limit)."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


@dataclass(frozen=True)
class DatasetInfo:
    """What a run trained on: recorded as its MLflow dataset input, so a model traces back to its shards."""

    manifest_url: str
    generation: int
    recipe_hash: str
    num_samples: int
    num_shards: int
    digest: str = ""  # the run's data snapshot digest (tvlt_core.data.snapshot); "" = name the recipe only
    recipe: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the preprocessing recipe itself

    def mlflow_dataset(self):
        """The shards as an MLflow dataset (a source URL, a name, a digest) for ``mlflow.log_input``."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        url = redact(self.manifest_url)
        return MetaDataset(resolve_dataset_source(url), name=url.rstrip("/").rsplit("/", 1)[-1],
                           digest=self.digest or self.recipe_hash)  # fmt: skip

    def input_tags(self) -> dict[str, str]:
        """Tags of the dataset input (``mlflow.log_input`` adds the context as ``mlflow.data.context``)."""
        return {"generation": str(self.generation), "recipe_hash": self.recipe_hash, "samples": str(self.num_samples),
                "shards": str(self.num_shards)}  # fmt: skip


@dataclass(frozen=True)
class RunInfo:
    """Which run this is, for MLflow and the model card; the run's settings are its config's, not in here."""

    name: str = "run"  # the resolved tracking.run_name: the MLflow run, the Ray Train run and its folder
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config, secrets masked: params, model card
    dataset: DatasetInfo | None = None


class RunTracker:
    """The MLflow run of one training job. Made on rank 0 only; every call is a no-op for steps already logged."""

    def __init__(self, client, run_id: str, last_step: int):
        self.client, self.run_id, self.last_step = client, run_id, last_step

    @classmethod
    def start(
        cls,
        *,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        dataset: DatasetInfo | None = None,
        system_metrics: bool = True,
        work_dir: str = DEFAULT_WORK_DIR,
        files: Mapping[str, bytes] | None = None,
    ) -> RunTracker:
        """Create the run for ``run_name``, or continue it when it exists. ``files`` (e.g. the resolved config)
        are logged as artifacts of a new run."""
        import mlflow
        from mlflow import MlflowClient

        uri = tracking_uri(work_dir)
        point_fluent_api(uri)  # the fluent run below (system metrics, log_input, log_model) needs it
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = ensure_experiment(client, experiment, artifact_location(uri, experiment))
        params = flatten(redact(dict(params)))
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=2
        )
        if runs:
            run_id = runs[0].info.run_id
            tracker = cls(client, run_id, cls._last_logged_step(client, run_id))
            tracker._note_changed_params(runs[0].data.params, params)
            attempts = int(runs[0].data.tags.get(ATTEMPTS_TAG, "1")) + 1
            client.set_tag(run_id, ATTEMPTS_TAG, str(attempts))
            logged = {d.dataset.digest for d in runs[0].inputs.dataset_inputs}
            new_data = dataset is not None and dataset.digest and dataset.digest not in logged  # data.refresh
            log.info("MLflow: continuing run %s (%s) after step %d, attempt %d", run_name, run_id, tracker.last_step, attempts)
        else:
            run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, ATTEMPTS_TAG: "1"})
            run_id = run.info.run_id
            tracker = cls(client, run_id, 0)
            tracker._log_params(params)
            tracker.log_files(files or {}, "")
            new_data = dataset is not None
            log.info("MLflow: new run %s (%s) in experiment %s at %s", run_name, run_id, experiment, redact(uri))
        mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        if new_data:
            mlflow.log_input(dataset.mlflow_dataset(), context="training", tags=dataset.input_tags())
        return tracker

    @staticmethod
    def _last_logged_step(client, run_id: str) -> int:
        history = client.get_metric_history(run_id, "train/loss")
        return max((m.step for m in history), default=0)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _note_changed_params(self, logged: Mapping[str, str], params: dict[str, str]) -> None:
        """A run's params cannot change; a relaunch with other settings is recorded as tags instead."""
        new = {k: v for k, v in params.items() if k not in logged}
        if new:
            self._log_params(new)
        for key, value in params.items():
            if key in logged and logged[key] != value:
                log.warning("resumed with %s=%s (the run was started with %s)", key, value, logged[key])
                self.client.set_tag(self.run_id, f"resumed_with.{key}", value)

    # --- during the run ------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``, unless the run already holds that step (a repeat after a restart)."""
        if step <= self.last_step:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_files(self, files: Mapping[str, bytes], artifact_path: str) -> None:
        """Write ``files`` (name -> bytes) as run artifacts under ``artifact_path``."""
        if not files:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.client.log_artifacts(self.run_id, tmp, artifact_path or None)

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """Log pictures (name -> uint8 (H, W, 3) or (H, W) array) with ``log_image`` at ``step``: one key per
        picture, so the run's page shows each with a step slider."""
        for key, image in images.items():
            self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True)

    def export_model(
        self,
        folder: str,
        *,
        registered_model: str,
        aliases: list[str],
        description: str,
        artifact_path: str = MODEL_ARTIFACT_PATH,
        step: int = 0,
    ) -> str | None:
        """Log the Hugging Face folder ``folder`` as the MLflow model ``artifact_path`` of this run at training step
        ``step`` (pyfunc, ``tvlt_core.serving.export``) and, with ``registered_model``, register it as a new version described by
        ``description`` (the model card) and move ``aliases`` to it. Returns the version (None when not
        registering)."""
        import mlflow
        from mlflow.exceptions import MlflowException

        from tvlt_core.serving.export import log_pyfunc

        model_id = log_pyfunc(self.client, self.run_id, folder, artifact_path, step=step)
        if not registered_model:
            return None
        try:
            self.client.create_registered_model(registered_model, description="TVLT / TVP checkpoints, Hugging Face format")
        except MlflowException as err:
            if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                raise
        with tracking_store(self.client.tracking_uri):  # register_model also links the logged model to the version
            version = mlflow.register_model(f"models:/{model_id}", registered_model).version
        self.client.update_model_version(registered_model, version, description=description)
        for alias in aliases:
            self.client.set_registered_model_alias(registered_model, alias, version)
        log.info("registered %s version %s (models:/%s@latest%s)", registered_model, version, registered_model,
                 "".join(f", @{a}" for a in aliases))  # fmt: skip
        return str(version)

    def end(self, status: str = "FINISHED") -> None:
        import mlflow

        mlflow.end_run(status=status)


def model_card(*, task: str, run_name: str, run_id: str, step: int, dataset: DatasetInfo | None,
               config: Mapping[str, Any], results: Mapping[str, float]) -> str:  # fmt: skip
    """A short README.md for an exported model: what was trained on what, with which config, how it scored."""
    lines = [
        f"# {task}",
        "",
        f"Trained by run `{run_name}` (MLflow run id `{run_id}`) for {step} optimizer steps.",
        "",
        "## Data",
    ]
    if dataset is not None:
        lines += [
            f"- shards: `{redact(dataset.manifest_url)}` (generation {dataset.generation}, "
            f"recipe `{dataset.recipe_hash}`, {dataset.num_samples} samples in {dataset.num_shards} shards)"
        ]
    lines += ["", "## Results (training batches, last logging window)"]
    lines += [f"- {k}: {v:.4g}" for k, v in sorted(results.items())] or ["- none recorded"]
    lines += ["", "## Configuration", "", "```"]
    lines += [f"{k}: {v}" for k, v in sorted(flatten(redact(dict(config))).items())]
    lines += ["```", ""]
    return "\n".join(lines)
