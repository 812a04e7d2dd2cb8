"""Screenshots of the MLflow UI after a main-job run, taken with headless Chromium (nothing here is timed).

    make demo   # or a shrunk one: .venv/bin/python -m jobs.demo --work_dir work/shots --corpus.pretrain_videos 6 ...
    .venv/bin/python benchmarks/mlflow_ui_screenshots.py --work_dir work/demo --out /tmp/mlflow-shots

Needs a Chromium on the PATH (``apt-get install chromium``; ``--chromium PATH`` for another). Starts ``mlflow ui``
on 127.0.0.1 over the run's sqlite store and saves, for each registered model holding ``@champion``:

    <name>-run-images.png     the training run's "Model metrics" page: loss curves and the pictures logged with
                              log_image, with their step slider
    <name>-version.png        the registered version's page: description (the model card), source MLflow model
    <name>-logged-model.png   the version's MLflow model page: its metrics from the evaluation, with the dataset

The images are written to ``--out`` (not the repository); the UI server is stopped by its pid.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def screenshot(chromium: str, url: str, out: Path) -> None:
    """One page, rendered with a virtual-time budget so the single-page app has fetched and drawn its data."""
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1600,1400", "--virtual-time-budget=20000", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    print(f"{out}  <- {url}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work_dir", default="work/demo", help="the main job's work dir (holds mlflow.db)")
    parser.add_argument("--out", default="/tmp/mlflow-shots")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "")
    parser.add_argument("--alias", default="champion")
    args = parser.parse_args()
    if not args.chromium:
        raise SystemExit("no chromium on the PATH: apt-get install chromium, or pass --chromium PATH")
    from mlflow import MlflowClient

    from tests.fixtures.servers import free_port, start_http_service, stop_service
    from tvlt_core.tracking import logged_model_id

    store = f"sqlite:///{Path(args.work_dir).resolve()}/mlflow.db"
    client = MlflowClient(store, registry_uri=store)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port, mlflow_cli = free_port(), str(Path(sys.executable).parent / "mlflow")
    ui = start_http_service([mlflow_cli, "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)],
                            f"http://127.0.0.1:{port}/health", out / "mlflow-ui.log", timeout_s=120)  # fmt: skip
    base = f"http://127.0.0.1:{port}/#"
    try:
        for model in client.search_registered_models():
            if args.alias not in model.aliases:
                continue
            version = client.get_model_version_by_alias(model.name, args.alias)
            run = client.get_run(version.run_id)
            experiment = run.info.experiment_id
            screenshot(args.chromium, f"{base}/experiments/{experiment}/runs/{run.info.run_id}/model-metrics",
                       out / f"{model.name}-run-images.png")  # fmt: skip
            screenshot(args.chromium, f"{base}/models/{model.name}/versions/{version.version}",
                       out / f"{model.name}-version.png")  # fmt: skip
            model_id = logged_model_id(version)
            if model_id:
                screenshot(args.chromium, f"{base}/experiments/{experiment}/models/{model_id}",
                           out / f"{model.name}-logged-model.png")  # fmt: skip
    finally:
        stop_service(ui)  # mlflow ui and its workers, started here, by their process group


if __name__ == "__main__":
    main()
