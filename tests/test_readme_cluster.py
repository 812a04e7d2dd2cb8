"""The README's `ray start --head` lines, run verbatim: a plain Ray head on loopback with Ray's default token
authentication, an MLflow server on loopback, `ray job submit` of preprocessing and pretraining, and a registered
model at the end. The block is parsed out of README.md, so the docs and this test cannot drift apart.

    .venv/bin/python -m pytest tests/test_readme_cluster.py -q      # about 2-3 minutes on 2 cores

It runs in a HOME of its own (so ``~/.ray/auth_token`` is made fresh, as on a new machine) and with no RAY_*,
MLFLOW_* or AWS_* variable of the caller's. It needs the README's ports (6379, 8265, 5000) free and says so if they
are not. Teardown stops exactly the processes the block started (by session), never another Ray on the machine,
which the README's own `ray stop` would.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray._private.utils import get_ray_address_file, read_ray_address

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # infra/ is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from infra.local.cluster import stop_session  # noqa: E402

pytestmark = pytest.mark.slow
HEADING = "### On a plain `ray start --head` cluster"
PORTS = (6379, 8265, 5000)
BLOCK_TIMEOUT_S = 900


def readme_block(heading: str = HEADING) -> str:
    """The first ```bash block after ``heading`` in README.md, as written."""
    text = (REPO / "README.md").read_text()
    assert heading in text, f"README.md has no section {heading!r}"
    after = text[text.index(heading):]
    match = re.search(r"^```bash\n(.*?)^```$", after, re.M | re.S)
    assert match, f"no ```bash block under {heading!r}"
    return match.group(1)


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_block_is_what_a_user_types():
    block = readme_block()
    assert "export RAY_AUTH_MODE=token" in block
    assert re.search(r"^ray start --head\b", block, re.M)
    assert len(re.findall(r"^ray job submit --working-dir \. -- python jobs/", block, re.M)) == 2
    assert "ray stop" not in block, "the block must leave other Ray clusters alone; stopping is told in prose"


def test_readme_ray_start_head_and_job_submit_run_verbatim(tmp_path):
    busy = [p for p in PORTS if port_in_use(p)]
    assert not busy, f"ports {busy} are taken on 127.0.0.1: the README's lines need them (stop what holds them)"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    shutil.rmtree(REPO / "work" / "cluster", ignore_errors=True)  # the block writes there, as a user's would
    script = "set -euo pipefail\n" + readme_block()
    proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=BLOCK_TIMEOUT_S)
        assert proc.returncode == 0, f"the README block failed (exit {proc.returncode}):\n{out[-6000:]}"
        assert (home / ".ray" / "auth_token").is_file(), "the token is where the README says"
        assert out.count("succeeded") >= 2, out[-4000:]

        client = MlflowClient("http://127.0.0.1:5000")
        (version,) = client.search_model_versions("name = 'tvlt-pretrain'")
        assert version.status == "READY"
        runs = client.search_runs([client.get_experiment_by_name("tvlt-pretrain").experiment_id])
        assert [r.info.status for r in runs] == ["FINISHED"]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the README block ran past {BLOCK_TIMEOUT_S} s")
    finally:
        started = read_ray_address()  # what the block's `ray start` recorded for later `ray.init()` calls
        stop_session(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # `ray stop` would also forget the stopped cluster's address; left behind, every later `ray.init()` on
        # the machine (the rest of the suite's) would try to connect to it instead of starting its own.
        if started and read_ray_address() == started:
            Path(get_ray_address_file(None)).unlink(missing_ok=True)
    assert not [p for p in PORTS if port_in_use(p)], "teardown left a service of the block running"
