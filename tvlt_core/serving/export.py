"""Logging a Hugging Face folder as an MLflow model: pyfunc from code (``pyfunc_model.py``), a signature and an
input example per model type, and pip requirements pinned to the versions in ``uv.lock``.

    model_id = log_pyfunc(client, run_id, folder, "model")    # a logged model of the run; register it

The stored model (``MLmodel``, ``python_model.py``, ``requirements.txt``, ``input_example.json``, ...) holds the
folder under ``artifacts/checkpoint/`` (config.json, model.safetensors, the tokenizer for TVP, the model card,
``preprocessing.json``): no pickle anywhere, and ``tvlt_core.tracking.resolve_model_uri`` finds the folder, so
``from_pretrained("models:/NAME@ALIAS")`` loads a registered version.
"""

from __future__ import annotations

import json
import logging
import tempfile
import tomllib
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"  # the artifact name of the Hugging Face folder in the MLflow model

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
PROJECT = "tvlt-pipeline"
LOCK_FILE = Path(__file__).resolve().parents[2] / "uv.lock"  # the repository's lock (the image has it too)

INPUT_EXAMPLES = {
    "tvp": {"video": ["s3://videos/kitchen-0001.mp4"], "sentence": ["a person opens the fridge"]},
    "tvlt": {"video": ["s3://videos/kitchen-0001.mp4"]},
}


def lock_requirements(lock_file: Path = LOCK_FILE) -> list[str]:
    """``name[extras]==version`` for every runtime dependency of the project, at the version the lock holds
    (the ``test`` extra is left out). Raises FileNotFoundError naming the lock when it is not there."""
    if not lock_file.exists():
        raise FileNotFoundError(f"{lock_file}: no uv.lock; registering a model pins its requirements from the lock")
    lock = tomllib.loads(lock_file.read_text())
    versions = {p["name"]: p["version"] for p in lock["package"] if "version" in p}
    (project,) = [p for p in lock["package"] if p["name"] == PROJECT]
    out = []
    for dep in project.get("dependencies", []):
        extras = f"[{','.join(sorted(dep['extra']))}]" if dep.get("extra") else ""
        out.append(f"{dep['name']}{extras}=={versions[dep['name']]}")
    return sorted(out)


def signature(kind: str):
    """The model signature of a ``model_type`` ("tvp" or "tvlt"): columns and types of ``predict``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    if kind == "tvp":
        inputs = Schema([ColSpec("string", "video"), ColSpec("string", "sentence")])
        outputs = Schema([ColSpec("double", "start_s"), ColSpec("double", "end_s"), ColSpec("double", "duration_s")])
    else:
        inputs = Schema([ColSpec("string", "video")])
        outputs = Schema([ColSpec("string", "video"), ColSpec("long", "clip"), ColSpec("double", "start_s"),
                          ColSpec("double", "end_s"), ColSpec(Array("double"), "embedding"),
                          ColSpec("double", "matching_score")])  # fmt: skip
    return ModelSignature(inputs=inputs, outputs=outputs)


def model_kind(folder: str) -> str:
    with open(Path(folder) / "config.json") as f:
        return json.load(f)["model_type"]


def log_pyfunc(client, run_id: str, folder: str, name: str, step: int = 0) -> str:
    """Save the local Hugging Face ``folder`` as an MLflow pyfunc model and log it as the logged model ``name``
    of run ``run_id`` (an output of the run at ``step``). Returns the logged model's id; the caller registers it.

    Saved, then logged, rather than ``mlflow.pyfunc.log_model``: that one predicts on the input example to
    validate it, and the example's video exists nowhere (it shows a request's shape); everything else is the
    same (MLmodel with signature, example, requirements and the model's id)."""
    import mlflow
    import pandas as pd
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    kind = model_kind(folder)
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, model_type=kind)
    try:
        with tempfile.TemporaryDirectory(prefix="pyfunc-") as tmp:
            path = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                str(path),
                mlflow_model=Model(artifact_path=name, run_id=run_id, model_id=logged.model_id),
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={CHECKPOINT_ARTIFACT: folder},
                signature=signature(kind),
                input_example=pd.DataFrame(INPUT_EXAMPLES[kind]),
                pip_requirements=lock_requirements(),
            )
            client.log_model_artifacts(logged.model_id, str(path))
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step)])
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id
