"""Screenshots of the MLflow UI after a main-job run, taken with headless Chromium (nothing here is timed).

    make demo   # or a shrunk one: .venv/bin/python -m jobs.demo --work_dir work/shots --corpus.pretrain_videos 6 ...
    .venv/bin/python benchmarks/mlflow_ui_screenshots.py --work_dir work/demo --out /tmp/mlflow-shots

Needs a Chromium on the PATH (``apt-get install chromium``; ``--chromium PATH`` for another). Starts ``mlflow ui``
on 127.0.0.1 over the run's sqlite store and one headless Chromium, and drives the browser through the DevTools
protocol (a websocket, with aiohttp from the lock): each page is loaded, the script waits (bounded) until what the
picture is for has rendered, scrolls it into view, and captures. For each registered model holding ``@champion``:

    <name>-run-images.png     the training run's "Model metrics" page scrolled to the pictures logged with
                              log_image: the image cards with their step sliders, moved to the last step
    <name>-run-image.png      the first of those cards opened (its expand button): the picture at that step, large,
                              above its step slider
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
SECTION_WAIT_S = 10  # how long a chart section may take to draw once it is in view

# What each page must show before it is captured (a JavaScript expression that is true then).
CHARTS_READY = "document.body.innerText.includes('Add section')"
TEXT_READY = "document.body.innerText.includes({text})"
# The run page draws a section's charts when it scrolls into view: sections are visited from the last one up (the
# pictures' keys have no prefix, so MLflow puts them in its last, "Model metrics" section) until a step slider shows.
# Then the box of each slider's track (to click its last step), and the first image card's expand button.
SECTIONS = "document.querySelectorAll('.du-bois-light-collapse-item').length"
SCROLL_TO_SECTION = "document.querySelectorAll('.du-bois-light-collapse-item')[{index}].scrollIntoView()"
SLIDER_SHOWN = "document.querySelector('[role=\"slider\"]') !== null"
SLIDER_TRACKS = """JSON.stringify([...document.querySelectorAll('[role="slider"]')].map(thumb => {
  let track = thumb.parentElement;
  while (track && track.getBoundingClientRect().width < 100) track = track.parentElement;
  const r = track.getBoundingClientRect();
  return {x: r.right - 3, y: r.top + r.height / 2};
}))"""
EXPAND_BUTTON = """JSON.stringify((() => {
  let card = document.querySelector('[role="slider"]');
  while (card && card.querySelectorAll('button').length === 0) card = card.parentElement;
  const r = card.querySelectorAll('button')[0].getBoundingClientRect();
  return {x: r.left + r.width / 2, y: r.top + r.height / 2};
})())"""
IMAGE_SHOWN = "[...document.querySelectorAll('img')].some(i => i.complete && i.naturalWidth > 64)"


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

    async def open(self, url: str, ready: str, timeout_s: float) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for(ready, timeout_s, url)

    async def wait_for(self, condition: str, timeout_s: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not await self.evaluate(condition):
            if loop.time() > deadline:
                raise SystemExit(f"{what}: not rendered within {timeout_s:.0f} s (waited for: {condition[:200]})")
            await asyncio.sleep(0.5)

    async def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def save(self, out: Path, url: str) -> None:
        await asyncio.sleep(2)  # the charts and images around it finish drawing
        shot = await self.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        print(f"{out}  <- {url}")

    async def run_images(self, url: str, out: Path, expanded: Path, timeout_s: float) -> None:
        """The run's image cards at their last step, then the first one opened large."""
        await self.open(url, CHARTS_READY, timeout_s)
        for index in reversed(range(await self.evaluate(SECTIONS))):
            await self.evaluate(SCROLL_TO_SECTION.format(index=index))
            try:
                await self.wait_for(SLIDER_SHOWN, SECTION_WAIT_S, "")
                break
            except SystemExit:
                continue
        else:
            raise SystemExit(f"{url}: no section shows an image with a step slider (were pictures logged?)")
        await asyncio.sleep(2)
        for track in json.loads(await self.evaluate(SLIDER_TRACKS)):
            await self.click(track["x"], track["y"])  # the right end of the track: the last step logged
            await asyncio.sleep(0.5)
        await self.save(out, url)
        button = json.loads(await self.evaluate(EXPAND_BUTTON))
        await self.click(button["x"], button["y"])
        await self.wait_for(IMAGE_SHOWN, timeout_s, f"{url}, the expanded image card")
        await self.save(expanded, url)


def start_chromium(chromium: str, port: int, profile: str) -> subprocess.Popen:
    return start_http_service([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--window-size={WIDTH},{HEIGHT}", f"--remote-debugging-port={port}",
                               f"--user-data-dir={profile}", "about:blank"],
                              f"http://127.0.0.1:{port}/json/version", Path(profile) / "chromium.log", timeout_s=60)  # fmt: skip


async def take(pages: list[tuple], devtools_port: int, timeout_s: float) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{devtools_port}/json/list") as reply:
            targets = [t for t in await reply.json() if t["type"] == "page"]
        async with session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            browser = Browser(ws)
            await browser.call("Page.enable")
            await browser.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                               deviceScaleFactor=1, mobile=False)  # fmt: skip
            for kind, url, *outs in pages:
                if kind == "run":
                    await browser.run_images(url, *outs, timeout_s=timeout_s)
                else:
                    await browser.open(url, kind, timeout_s)
                    await browser.save(outs[0], url)


def pages_to_take(store: str, base: str, out: Path, alias: str) -> list[tuple]:
    """(what to wait for, or "run" for the run page's steps; url; output files) for every model holding ``alias``."""
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
        pages.append(("run", f"{base}/experiments/{experiment}/runs/{run.info.run_id}/model-metrics",
                      out / f"{model.name}-run-images.png", out / f"{model.name}-run-image.png"))  # fmt: skip
        pages.append((TEXT_READY.format(text=json.dumps(f"Version {version.version}")),
                      f"{base}/models/{model.name}/versions/{version.version}", out / f"{model.name}-version.png"))
        model_id = logged_model_id(version)
        if model_id:
            pages.append((TEXT_READY.format(text=json.dumps("Metrics")),
                          f"{base}/experiments/{experiment}/models/{model_id}", out / f"{model.name}-logged-model.png"))
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
