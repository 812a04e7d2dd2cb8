"""Screenshots of the MLflow UI after a main-job run, taken with headless Chromium (nothing here is timed).

    make demo   # or a shrunk one: .venv/bin/python -m jobs.demo --work_dir work/shots --corpus.pretrain_videos 6 ...
    .venv/bin/python benchmarks/mlflow_ui_screenshots.py --work_dir work/demo --out /tmp/mlflow-shots

Needs a Chromium on the PATH (``apt-get install chromium``; ``--chromium PATH`` for another). Starts ``mlflow ui``
on 127.0.0.1 over the run's sqlite store and one headless Chromium, and drives the browser through the DevTools
protocol (a websocket, with aiohttp from the lock): each page is loaded, the script waits (bounded) until what the
picture is for has rendered, scrolls it into view, and captures. For each registered model holding ``@champion``:

    <name>-run-images.png     the training run's "Model metrics" page scrolled to the pictures logged with
                              log_image: the image cards with their step slider
    <name>-version.png        the registered version's page: description (the model card), source MLflow model
    <name>-logged-model.png   the version's MLflow model page: its metrics from the evaluation, with the dataset

The images are written to ``--out`` (not the repository); the UI and the browser are stopped by their process group.
A page that does not render within ``--page_timeout_s`` fails the script, naming the page and what it waited for.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fixtures.servers import free_port, start_http_service, stop_service  # noqa: E402

WIDTH, HEIGHT = 1600, 1300

# What each page must show before it is captured (a JavaScript expression that is true then), and what to scroll to.
RUN_IMAGES_READY = """(() => {
  const slider = document.querySelector('[role="slider"]');
  const pictures = [...document.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 64);
  return slider !== null && pictures.length > 0;
})()"""
SCROLL_TO_SLIDER = """(() => {
  const slider = document.querySelector('[role="slider"]');
  slider.scrollIntoView({block: 'center'});
  window.scrollBy(0, 0);
  return true;
})()"""
TEXT_READY = "document.body.innerText.includes({text})"


class Browser:
    """One page of a headless Chromium, driven over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            reply = await self.ws.receive_json(timeout=60)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def capture(self, url: str, ready: str, out: Path, *, scroll: str | None, timeout_s: float) -> None:
        await self.call("Page.navigate", url=url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self.evaluate(ready):
            if loop.time() > deadline:
                raise SystemExit(f"{url} did not render within {timeout_s:.0f} s (waited for: {ready.strip()[:200]})")
            await asyncio.sleep(0.5)
        if scroll:
            await self.evaluate(scroll)
        await asyncio.sleep(2)  # the charts and images around it finish drawing
        shot = await self.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        print(f"{out}  <- {url}")


def start_chromium(chromium: str, port: int, profile: str) -> subprocess.Popen:
    return start_http_service([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--window-size={WIDTH},{HEIGHT}", f"--remote-debugging-port={port}",
                               f"--user-data-dir={profile}", "about:blank"],
                              f"http://127.0.0.1:{port}/json/version", Path(profile) / "chromium.log", timeout_s=60)  # fmt: skip


async def take(pages: list[tuple[str, str, Path, str | None]], devtools_port: int, timeout_s: float) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{devtools_port}/json/list") as reply:
            targets = [t for t in await reply.json() if t["type"] == "page"]
        async with session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            browser = Browser(ws)
            await browser.call("Page.enable")
            await browser.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                               deviceScaleFactor=1, mobile=False)  # fmt: skip
            for url, ready, out, scroll in pages:
                await browser.capture(url, ready, out, scroll=scroll, timeout_s=timeout_s)


def pages_to_take(store: str, base: str, out: Path, alias: str) -> list[tuple[str, str, Path, str | None]]:
    from mlflow import MlflowClient

    from tvlt_core.tracking import logged_model_id

    client = MlflowClient(store, registry_uri=store)
    pages = []
    for model in client.search_registered_models():
        if alias not in model.aliases:
            continue
        version = client.get_model_version_by_alias(model.name, alias)
        run = client.get_run(version.run_id)
        experiment = run.info.experiment_id
        pages.append((f"{base}/experiments/{experiment}/runs/{run.info.run_id}/model-metrics", RUN_IMAGES_READY,
                      out / f"{model.name}-run-images.png", SCROLL_TO_SLIDER))  # fmt: skip
        pages.append((f"{base}/models/{model.name}/versions/{version.version}",
                      TEXT_READY.format(text=json.dumps(f"Version {version.version}")),
                      out / f"{model.name}-version.png", None))  # fmt: skip
        model_id = logged_model_id(version)
        if model_id:
            pages.append((f"{base}/experiments/{experiment}/models/{model_id}",
                          TEXT_READY.format(text=json.dumps("Metrics")), out / f"{model.name}-logged-model.png", None))
    if not pages:
        raise SystemExit(f"no registered model in {store} holds @{alias}: run the main job first")
    return pages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work_dir", default="work/demo", help="the main job's work dir (holds mlflow.db)")
    parser.add_argument("--out", default="/tmp/mlflow-shots")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--page_timeout_s", type=float, default=90)
    args = parser.parse_args()
    if not args.chromium:
        raise SystemExit("no chromium on the PATH: apt-get install chromium, or pass --chromium PATH")
    store = f"sqlite:///{Path(args.work_dir).resolve()}/mlflow.db"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ui_port, devtools_port, mlflow_cli = free_port(), free_port(), str(Path(sys.executable).parent / "mlflow")
    pages = pages_to_take(store, f"http://127.0.0.1:{ui_port}/#", out, args.alias)
    ui = start_http_service([mlflow_cli, "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                             "--port", str(ui_port)], f"http://127.0.0.1:{ui_port}/health", out / "mlflow-ui.log",
                            timeout_s=120)  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            browser = start_chromium(args.chromium, devtools_port, profile)
            try:
                asyncio.run(take(pages, devtools_port, args.page_timeout_s))
            finally:
                stop_service(browser)
    finally:
        stop_service(ui)  # mlflow ui and its workers, started here, by their process group


if __name__ == "__main__":
    main()
