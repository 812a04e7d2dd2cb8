"""Alias promotion against a real MLflow server: two evaluators promoting at once end with the better version
holding the alias in the interleaving that a read-then-write loses (the worse one's stale write landing after the
better one finished), and a non-finite result never takes the alias.

Versions are registered on the server (their files are not needed to promote); their ``eval.*`` tags are set as
``log_evaluation`` sets them. Every wait in the scripted interleaving is bounded.

    .venv/bin/python -m pytest tests/test_promotion.py -q
"""

from __future__ import annotations

import math
import threading

import pytest
from mlflow import MlflowClient

from tests.fixtures.bounded import bounded
from tvlt_core.eval.registry import ModelRef, TAG_PREFIX, promote
from tvlt_core.eval.report import Report, Row

DIGEST, METRIC, WAIT_S = "d1", "r1_iou0.5", 60


def register(client: MlflowClient, name: str, scores: list[float]) -> list[ModelRef]:
    client.create_registered_model(name)
    refs = []
    for score in scores:
        v = str(client.create_model_version(name, source=f"s3://nowhere/{name}").version)
        client.set_model_version_tag(name, v, TAG_PREFIX + METRIC, f"{score:.6g}")
        client.set_model_version_tag(name, v, TAG_PREFIX + "digest", DIGEST)
        refs.append(ModelRef(uri=f"models:/{name}/{v}", load_uri=f"models:/{name}/{v}", name=name, version=v))
    return refs


def report(score: float) -> Report:
    return Report(task="tvp-grounding", rows=[Row(METRIC, "R@1 IoU=0.5", score)], references={}, counts={}, primary=METRIC)


def never(holder: ModelRef) -> float:
    raise AssertionError(f"{holder.describe()} holds no alias here: nothing to measure")


def holder(client, name: str) -> str | None:
    return client.get_registered_model(name).aliases.get("champion")


def test_the_better_version_wins_when_the_worse_ones_stale_write_lands_last(mlflow_server):
    client = MlflowClient(mlflow_server)
    better, worse = register(client, "race", [0.9, 0.5])
    worse_read, better_done = threading.Event(), threading.Event()
    stages: list[str] = []
    seen_after_stale_write: list[str | None] = []

    def pause_better(stage, round_):
        if (stage, round_) == ("contend", 0):  # contends only after the worse one has read: it saw no rival
            assert worse_read.wait(WAIT_S), "the worse evaluator never read"
        stages.append(f"better {stage} {round_}")

    def pause_worse(stage, round_):
        if (stage, round_) == ("write", 0):  # decided on its stale read; writes after the better one finished
            worse_read.set()
            assert better_done.wait(WAIT_S), "the better evaluator never finished"
        if (stage, round_) == ("read", 1):
            seen_after_stale_write.append(holder(client, "race"))
        stages.append(f"worse {stage} {round_}")

    results = {}

    def run(name, ref, score, pause, done=None):
        try:
            results[name] = promote(client, ref, report(score), "champion", METRIC, never, digest=DIGEST, pause=pause)
        except BaseException as err:  # re-raised in the test's thread below
            results[name] = err
        finally:
            if done is not None:
                done.set()

    def run_better():
        run("better", better, 0.9, pause_better, better_done)

    def run_worse():
        run("worse", worse, 0.5, pause_worse)

    threads = [threading.Thread(target=run_better), threading.Thread(target=run_worse)]

    def both():
        threads[1].start()
        threads[0].start()
        for t in threads:
            t.join()

    bounded(both, WAIT_S * 2)
    for outcome in results.values():
        if isinstance(outcome, BaseException):
            raise outcome
    assert stages.index("worse write 0") > stages.index("better read 1") > stages.index("worse read 0"), stages
    assert seen_after_stale_write == [worse.version], "the bad interleaving happened: the stale write landed last"
    assert holder(client, "race") == better.version, f"the stale write won: {stages}"
    assert results["better"].promoted and not results["worse"].promoted
    assert "does not beat version" in results["worse"].reason
    tags = client.get_model_version("race", worse.version).tags
    assert TAG_PREFIX + "promote.champion" not in tags, "the loser no longer contends"


def test_promotion_is_monotone_and_a_non_finite_result_never_takes_the_alias(mlflow_server):
    client = MlflowClient(mlflow_server)
    nan, mid, low = register(client, "mono", [math.nan, 0.6, 0.4])
    decision = promote(client, nan, report(math.nan), "champion", METRIC, never, digest=DIGEST)
    assert not decision.promoted and holder(client, "mono") is None, "NaN took the alias with nobody holding it"
    assert promote(client, mid, report(0.6), "champion", METRIC, never, digest=DIGEST).promoted
    assert not promote(client, low, report(0.4), "champion", METRIC, never, digest=DIGEST).promoted
    assert holder(client, "mono") == mid.version
    again = promote(client, mid, report(0.6), "champion", METRIC, never, digest=DIGEST)
    assert not again.promoted and "already holds" in again.reason
