"""Scheduled preprocessing: one schedule slot, one submission id, so a slot never runs twice.

    # Kubernetes: the CronJob's container (infra/k8s/preprocess/cronjob.yaml) creates the slot's RayJob.
    python -m infra.schedule rayjob --template /etc/tvlt-schedule/rayjob.yaml
    # Any Ray cluster (the local one, VMs) from cron: submit the slot's job through the Ray job API.
    python -m infra.schedule submit --every 60 --wait -- python jobs/preprocess.py --input s3://raw/videos \
        --output s3://shards/pretrain --mode pretrain

The id is ``preprocess-<yyyymmddHHMM of the slot, UTC>``. On Kubernetes it is the RayJob's name and its Ray
submission id: the API server refuses a second RayJob of that name (HTTP 409). On a Ray cluster it is the
submission id, which Ray refuses to reuse (``Job with submission_id ... already exists``). Either refusal means
"this slot was already submitted" and ends the run with status 0, so retries of the cron pod are harmless.

Overlapping runs are not this module's concern: a slot is submitted even while an earlier slot's job still runs,
and the job itself refuses to start (exit 4, "being written by run ...") while another run holds the output
folder's lease (``pipelines/lease.py``, taken with a conditional create in the store). Listing running jobs and
then submitting was racy (two slots, or a manual run, could both see none), and it missed runs started by other
means; the lease covers every writer. The preprocessing job is incremental, so the next slot picks up whatever a
refused one would have done.

The slot of a Kubernetes run is read from the name of the Job the CronJob created: the CronJob controller names it
``<cronjob>-<scheduled time in minutes since the epoch>``, and the pod sees it in its ``batch.kubernetes.io/job-name``
label (passed in as $JOB_NAME). A Job created by hand (``kubectl create job --from=cronjob/...``) has another
name; its slot is the current minute.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

log = logging.getLogger("schedule")

PREFIX = "preprocess"
COMPONENT_LABEL = "app.kubernetes.io/component"
SLOT_ANNOTATION = "tvlt.io/schedule-slot"
RAY_JOB_DONE = {"SUCCEEDED", "FAILED", "STOPPED"}
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


# --- slots and ids --------------------------------------------------------------------------------------------------
def submission_id(slot: datetime, prefix: str = PREFIX) -> str:
    """``preprocess-202501311200``: the slot's UTC minute. A valid RayJob name and Ray submission id."""
    return f"{prefix}-{slot.astimezone(UTC):%Y%m%d%H%M}"


def slot_from_job_name(job_name: str, cronjob: str) -> datetime | None:
    """The scheduled time encoded in a CronJob-created Job's name, or None for any other name."""
    match = re.fullmatch(re.escape(cronjob) + r"-(\d+)", job_name or "")
    if not match:
        return None
    slot = datetime.fromtimestamp(int(match.group(1)) * 60, UTC)
    # A hand-made Job called e.g. "preprocess-1" matches the pattern but is no schedule slot.
    return slot if slot.year >= 2000 else None


def floor_slot(now: datetime, every_minutes: int) -> datetime:
    """The start of the ``every_minutes`` slot that holds ``now`` (slots aligned to the epoch, in UTC)."""
    step = every_minutes * 60
    return datetime.fromtimestamp(int(now.timestamp()) // step * step, UTC)


def render_rayjob(template: dict, slot: datetime, image: str | None = None) -> dict:
    """The template with the slot's id as name and Ray submission id, and ``image`` on every Ray container."""
    rayjob = copy.deepcopy(template)
    name = submission_id(slot)
    meta = rayjob.setdefault("metadata", {})
    meta["name"] = name
    meta.pop("generateName", None)
    meta.setdefault("annotations", {})[SLOT_ANNOTATION] = slot.astimezone(UTC).isoformat()
    meta.setdefault("labels", {}).setdefault(COMPONENT_LABEL, PREFIX)
    rayjob["spec"]["jobId"] = name
    if image:
        cluster = rayjob["spec"]["rayClusterSpec"]
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            for container in group["template"]["spec"]["containers"]:
                container["image"] = image
    return rayjob


# --- Kubernetes: create the slot's RayJob ---------------------------------------------------------------------------
class InCluster:
    """The few Kubernetes API calls the scheduler makes, with the pod's service account (no client library:
    the call is three HTTP requests, and the image stays free of a Kubernetes SDK)."""

    def __init__(self, namespace: str | None = None):
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        self.base = f"https://{host}:{port}"
        self.namespace = namespace or (SA_DIR / "namespace").read_text().strip()
        self.token = (SA_DIR / "token").read_text().strip()
        self.tls = ssl.create_default_context(cafile=str(SA_DIR / "ca.crt"))

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.tls, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def own_image(self, pod: str, container: str) -> str:
        status, body = self.request("GET", f"/api/v1/namespaces/{self.namespace}/pods/{pod}")
        if status != 200:
            raise RuntimeError(f"reading pod {pod}: HTTP {status} {body.get('message', '')}")
        return next(c["image"] for c in body["spec"]["containers"] if c["name"] == container)

    def create_rayjob(self, rayjob: dict) -> bool:
        """True when created, False when a RayJob of that name exists (this slot was submitted already)."""
        status, body = self.request("POST", f"/apis/ray.io/v1/namespaces/{self.namespace}/rayjobs", rayjob)
        if status == 409 and body.get("reason") == "AlreadyExists":
            return False
        if status not in (200, 201):
            raise RuntimeError(f"creating RayJob {rayjob['metadata']['name']}: HTTP {status} {body.get('message')}")
        return True


def create_slot_rayjob(args: argparse.Namespace) -> int:
    import yaml  # in the runtime image (a project dependency); only this subcommand needs it

    slot = slot_from_job_name(os.environ.get("JOB_NAME", ""), args.cronjob)
    if slot is None:
        slot = floor_slot(datetime.now(UTC), 1)
        log.info("Job %r was not created by CronJob %r: using the current minute as the slot",
                 os.environ.get("JOB_NAME"), args.cronjob)
    api = InCluster()
    image = api.own_image(os.environ["POD_NAME"], args.container)
    rayjob = render_rayjob(yaml.safe_load(Path(args.template).read_text()), slot, image)
    name = rayjob["metadata"]["name"]
    if api.create_rayjob(rayjob):
        log.info("created RayJob %s (image %s)", name, image)
    else:
        log.info("RayJob %s exists: slot already submitted, nothing to do", name)
    return 0


# --- any Ray cluster: submit the slot's job -------------------------------------------------------------------------
def submit_slot(client, entrypoint: str, slot: datetime, *,
                working_dir: str | None = ".") -> tuple[str, bool]:
    """Submit ``entrypoint`` as the slot's Ray job; returns (submission id, whether this call submitted it).

    ``client`` is a ``ray.job_submission.JobSubmissionClient``. Not submitted: the slot's id exists already. An
    earlier slot's job still running is no reason to skip: the job's lease on its output folder decides."""
    sid = submission_id(slot)
    runtime_env = {"working_dir": working_dir} if working_dir else None
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
                          metadata={"schedule_slot": slot.astimezone(UTC).isoformat()})
    except RuntimeError as e:
        if "already exists" not in str(e):
            raise
        log.info("job %s exists: slot already submitted, nothing to do", sid)
        return sid, False
    log.info("submitted job %s", sid)
    return sid, True


def wait_for(client, sid: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Block until the job ends or ``timeout_s`` passes; returns its last status (SUCCEEDED, FAILED, ...)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(sid))
        if status in RAY_JOB_DONE or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def submit_from_cron(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient  # address and auth token from the environment

    if not args.entrypoint:
        raise SystemExit("submit: give the job's command after --")
    if args.slot:
        slot = datetime.fromisoformat(args.slot)
        slot = slot.replace(tzinfo=UTC) if slot.tzinfo is None else slot.astimezone(UTC)  # no offset: UTC
    else:
        slot = floor_slot(datetime.now(UTC), args.every)
    client = JobSubmissionClient(args.address)
    sid, submitted = submit_slot(client, " ".join(args.entrypoint), slot, working_dir=args.working_dir)
    if not (submitted and args.wait):
        return 0
    status = wait_for(client, sid, args.timeout)
    log.info("job %s ended: %s", sid, status)
    return 0 if status == "SUCCEEDED" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.schedule", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k8s = sub.add_parser("rayjob", help="in a CronJob pod: create the slot's RayJob from a template")
    k8s.add_argument("--template", required=True, help="RayJob YAML (metadata.name and spec.jobId are set here)")
    k8s.add_argument("--cronjob", default=PREFIX, help="name of the CronJob that created this pod's Job")
    k8s.add_argument("--container", default="scheduler", help="this pod's container whose image the RayJob runs")
    ray = sub.add_parser("submit", help="from cron: submit the slot's job to a Ray cluster")
    ray.add_argument("--every", type=int, default=60, help="schedule period in minutes (the slot is now, floored)")
    ray.add_argument("--slot", help="ISO time of the slot instead of now, UTC unless it has an offset")
    ray.add_argument("--address", default=None, help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS)")
    ray.add_argument("--working-dir", default=".", help="code shipped with the job ('' for the image's /app)")
    ray.add_argument("--wait", action="store_true", help="wait for the job; exit 1 unless it succeeds")
    ray.add_argument("--timeout", type=float, default=6 * 3600, help="seconds --wait waits")
    ray.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- the job's command")
    args = parser.parse_args(argv)
    if getattr(args, "entrypoint", None) and args.entrypoint[0] == "--":
        args.entrypoint = args.entrypoint[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_slot_rayjob(args) if args.command == "rayjob" else submit_from_cron(args)


if __name__ == "__main__":
    sys.exit(main())
