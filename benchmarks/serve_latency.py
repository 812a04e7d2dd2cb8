"""Latency of one request to a registered TVP served by ``mlflow models serve``, beside the same predict in-process.

    .venv/bin/python benchmarks/serve_latency.py                       # tiny TVP, one synthetic video, CPU
    .venv/bin/python benchmarks/serve_latency.py --requests 10 --duration 20

A tiny TVP (``tvp_tiny_config``, random weights: latency does not depend on them) is registered the way training
registers it (an MLflow pyfunc model in a sqlite store under a temporary folder) with the default grounding recipe
(48 frames, longest edge 448, JPEG q90), then served on 127.0.0.1 with ``--env-manager local``. One request is
one row: (a local mp4 of ``--duration`` s, a sentence). After one warm-up request each, ``--requests`` requests
are timed, alternating server / in-process, so load from other work falls on both alike.

What the rows measure (median, best in brackets, seconds):
    served request      POST /invocations until the JSON answer is read (HTTP + JSON + predict in the server)
    in-process predict  ``mlflow.pyfunc.load_model(...).predict`` on the same row in this process
    of which: read      decoding the video to the model's input (``GroundingPredictor.read``)
    of which: model     tokenizer + forward pass + seconds (``TvpEvaluator.predict``)
ratio = served / in-process, on medians: what serving adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def setup(work: Path, duration: float):
    """(video path, sentence, model URI, tracking URI): a synthetic grounding video and a registered tiny TVP."""
    import torch

    from synthetic import generate_corpus
    from tvlt_core.models.tvp import TvpForVideoGrounding, tvp_tiny_config
    from tvlt_core.text import TextTokenizer, build_vocab
    from tvlt_core.tracking import RunTracker

    corpus = generate_corpus(work / "corpus", 0, n_grounding=1, seed=0, duration=(duration, duration), workers=1)
    (video,) = corpus.of_kind("grounding")
    sentences = [e["sentence"] for e in video["events"]]
    tokenizer = TextTokenizer.from_vocab(build_vocab(sentences * 3, 100), 16)
    torch.manual_seed(0)
    folder = work / "checkpoint"
    TvpForVideoGrounding(tvp_tiny_config(vocab_size=tokenizer.vocab_size)).save_pretrained(str(folder), extra_files=tokenizer.files())
    os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{work}/mlflow.db"
    tracker = RunTracker.start(experiment="latency", run_name="latency", params={}, system_metrics=False)
    tracker.export_model(str(folder), registered_model="tvp-latency", aliases=["champion"], description="benchmark")
    tracker.end()
    return str(corpus.path(video)), sentences[0], "models:/tvp-latency@champion", uri


def served(port: int, body: bytes) -> float:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        json.loads(response.read())
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of the request's video")
    args = parser.parse_args()

    import mlflow
    import pandas as pd

    from tests.fixtures.servers import free_port, start_http_service, stop_service

    with tempfile.TemporaryDirectory(prefix="serve-latency-") as tmp:
        work = Path(tmp)
        video, sentence, model_uri, _ = setup(work, args.duration)
        row = pd.DataFrame({"video": [video], "sentence": [sentence]})
        body = json.dumps({"dataframe_split": {"columns": ["video", "sentence"], "data": [[video, sentence]]}}).encode()
        port = free_port()
        bin_dir = str(Path(sys.executable).parent)  # uvicorn from this environment, as an activated venv has it
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        server = start_http_service([f"{bin_dir}/mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                                     "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                    f"http://127.0.0.1:{port}/ping", work / "serve.log", timeout_s=300, env=env)  # fmt: skip
        try:
            model = mlflow.pyfunc.load_model(model_uri)
            predictor = model.unwrap_python_model().predictor
            served(port, body), model.predict(row)  # warm-up: first request, imports, allocator
            times = {"served request": [], "in-process predict": [], "of which: read": [], "of which: model": []}
            for _ in range(args.requests):
                times["served request"].append(served(port, body))
                times["in-process predict"].append(timed(lambda: model.predict(row)))
                decoded = {}
                times["of which: read"].append(timed(lambda: decoded.update(x=predictor.read(video))))
                duration, pixels = decoded["x"]
                query = [{"sentence": sentence, "duration": duration, "pixels": pixels}]
                times["of which: model"].append(timed(lambda: predictor.evaluator.predict(query)))
        finally:
            stop_service(server)  # the server and its worker, started here, by their process group
    print(f"one request: 1 row, a {args.duration:g} s synthetic mp4, tiny TVP, recipe 48 frames / 448 px, CPU, "
          f"{args.requests} timed requests, torch threads {__import__('torch').get_num_threads()}\n")
    print("| what | median s | best s |\n| --- | --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} |")
    ratio = statistics.median(times["served request"]) / statistics.median(times["in-process predict"])
    print(f"\nratio served / in-process (medians): {ratio:.2f}")


if __name__ == "__main__":
    main()
