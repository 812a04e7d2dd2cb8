"""infra/ agrees with the schemas it is applied against and with the code it runs. Offline, about 30 s.

    .venv/bin/python -m pytest tests/test_infra_manifests.py -q

How each part is validated:
- Core Kubernetes kinds (and every pod template inside a RayCluster/RayJob, as a PodTemplate): kubernetes-validate's
  bundled OpenAPI schemas in strict mode (unknown fields fail), for the oldest Kubernetes the recipes claim and the
  newest the validator knows.
- RayCluster/RayJob: KubeRay's own CRD schemas (infra/k8s/schemas/kuberay-*.json, from the release's CRDs), made
  strict, so a misspelt field fails here instead of being pruned silently by the API server.
- The VM cluster config: Ray's cluster-launcher schema and Ray's own config preparation.
- Entry points: every job command named in infra/ names an existing script and preset, and its arguments parse
  with the job's own parser (``--print_config``); training pods hold the ScalingConfig their config asks for.
- Versions: image tags, rayVersion, Python, CUDA, uv and MLflow agree with the lock (uv.lock), pyproject.toml and
  the installed packages; the image installs from the lock.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) leaves the repository root off sys.path
    sys.path.insert(0, str(ROOT))

from infra import schedule  # noqa: E402
from tests.fixtures.lock import locked_versions  # noqa: E402

INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "docker" / "mlflow.Dockerfile"
VM_CLUSTER = INFRA / "vm" / "cluster.yaml"
KUBERAY_SCHEMAS = sorted((K8S / "schemas").glob("kuberay-*.json"))
# CronJob.spec.timeZone is GA since 1.27 and pods carry the batch.kubernetes.io/job-name label since 1.27;
# 1.30 is the oldest release still in the big providers' support windows.
KUBE_VERSIONS = ("1.30", kubernetes_validate.latest_version())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKED = locked_versions()
# Secrets the recipes read, and their keys: the README's `kubectl create secret` lines create exactly these.
SECRETS = {
    "tvlt-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "tvlt-mlflow-client": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
    "mlflow-server": {"backend-store-uri", "basic_auth.ini", "admin-password", "aws-access-key-id",
                      "aws-secret-access-key", "postgres-password"},
}
SENSITIVE = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL|_URI$", re.IGNORECASE)
NOT_SENSITIVE = {"MLFLOW_TRACKING_URI", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME"}
SLOT = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)


# --- loading --------------------------------------------------------------------------------------------------------
def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def manifests() -> list[tuple[str, dict]]:
    """(label, document) of every Kubernetes object in infra/k8s; the preprocessing template rendered for a slot."""
    out = []
    for path in k8s_files():
        for i, doc in enumerate(docs(path)):
            if path == K8S / "preprocess" / "rayjob.yaml":
                doc = schedule.render_rayjob(doc, SLOT, image="tvlt-pipeline:0.1.0")
            out.append((f"{path.relative_to(ROOT)}#{i} {doc['kind']}", doc))
    return out


MANIFESTS = manifests()
RAY_KINDS = {"RayCluster", "RayJob"}


def of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(label, d) for label, d in MANIFESTS if d["kind"] in kinds]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_groups(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def pod_templates(doc: dict) -> list[dict]:
    kind = doc["kind"]
    if kind in RAY_KINDS:
        return [g["template"] for g in ray_groups(doc)]
    if kind in {"Deployment", "StatefulSet", "Job"}:
        return [doc["spec"]["template"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for t in pod_templates(doc) for c in t["spec"]["containers"]]


def app_dir() -> str:
    """The image's WORKDIR: where the manifests find the repository's files."""
    return re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)


def repo_path(path: str) -> Path:
    prefix = app_dir().rstrip("/") + "/"
    return ROOT / path[len(prefix):] if path.startswith(prefix) else ROOT / path


def quantity(value) -> float:
    """Kubernetes quantity -> float (CPUs, or bytes for memory)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    return float(match.group(1)) * units.get(match.group(2), 1)


# --- parsing and schemas --------------------------------------------------------------------------------------------
def test_every_yaml_under_infra_parses_into_objects_with_kind():
    files = sorted(INFRA.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        loaded = docs(path)
        assert loaded, f"{path}: empty"
        for doc in loaded:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if path.is_relative_to(K8S):
                assert {"apiVersion", "kind"} <= doc.keys(), f"{path}: document without apiVersion/kind"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_core_kinds_and_pod_templates_validate_against_kubernetes_schemas(version):
    checked = set()
    for label, doc in MANIFESTS:
        if doc["kind"] not in RAY_KINDS:
            _kube_validate(doc, version, label)
            checked.add(doc["kind"])
        for i, template in enumerate(pod_templates(doc)):
            wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            _kube_validate(wrapper, version, f"{label} pod template {i}")
    assert {"CronJob", "Deployment", "StatefulSet", "Service", "ConfigMap", "NetworkPolicy", "Role"} <= checked


def _kube_validate(doc: dict, version: str, label: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{label} (Kubernetes {version}): {e.message} at {'/'.join(map(str, e.path))}")


def strict(schema):
    """A CRD schema in which an object with listed properties accepts no other key (what kubectl's field
    validation reports and the API server otherwise prunes without a word)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(x) for x in schema]
    return schema


@pytest.fixture(scope="module")
def kuberay_schema() -> dict:
    assert KUBERAY_SCHEMAS, "infra/k8s/schemas/kuberay-*.json is missing"
    return json.loads(KUBERAY_SCHEMAS[-1].read_text())


def test_kuberay_resources_validate_against_the_crd_schemas(kuberay_schema):
    ray = of_kind(*RAY_KINDS)
    assert {d["kind"] for _, d in ray} == RAY_KINDS and len(ray) >= 5
    for label, doc in ray:
        errors = sorted(jsonschema.Draft7Validator(strict(kuberay_schema[doc["kind"]])).iter_errors(doc),
                        key=lambda e: list(e.path))
        assert not errors, f"{label}: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_strict_crd_check_catches_a_misspelt_field(kuberay_schema):
    _, rayjob = of_kind("RayJob")[0]
    bad = json.loads(json.dumps(rayjob))
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    assert not jsonschema.Draft7Validator(strict(kuberay_schema["RayJob"])).is_valid(bad)


def test_vm_cluster_config_validates_with_rays_own_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(VM_CLUSTER.read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs before it starts a node


# --- the KubeRay fields the code relies on --------------------------------------------------------------------------
def test_rayjobs_run_the_entrypoint_on_a_cluster_of_their_own():
    jobs = of_kind("RayJob")
    assert len(jobs) >= 4  # pretrain, finetune, evaluate, scheduled preprocessing
    for label, doc in jobs:
        spec = doc["spec"]
        assert spec["entrypoint"].startswith("python "), label
        assert spec["submissionMode"] == "K8sJobMode", f"{label}: a submitter Job retries submission and logs"
        assert spec["shutdownAfterJobFinishes"] is True, f"{label}: the cluster must go when the job ends"
        assert spec.get("ttlSecondsAfterFinished", 0) > 0 and spec.get("activeDeadlineSeconds", 0) > 0, label
        assert "clusterSelector" not in spec, label
        assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), label


def test_ray_clusters_agree_with_pyproject_and_keep_to_the_namespace():
    ray_pin = _dependency("ray")
    import ray

    for label, doc in of_kind(*RAY_KINDS):
        spec = cluster_spec(doc)
        assert Version(spec["rayVersion"]) == Version(ray.__version__) == Version(LOCKED["ray"]), label
        assert spec["rayVersion"] in ray_pin.specifier, label
        assert spec["authOptions"]["mode"] == "token", f"{label}: Ray token authentication"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", label
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{label}: keep tasks off the head"
        assert spec.get("workerGroupSpecs"), label
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], label
    assert not [d for _, d in MANIFESTS if d["kind"] == "Ingress"
                or (d["kind"] == "Service" and d["spec"].get("type", "ClusterIP") != "ClusterIP")]


def test_every_ray_pod_has_shared_memory_for_its_object_store():
    for label, doc in of_kind(*RAY_KINDS):
        for group in ray_groups(doc):
            pod = group["template"]["spec"]
            (container,) = pod["containers"]
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert limits == requests, f"{label}: Ray sizes itself from limits; requests must match them"
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
            assert shm["emptyDir"]["medium"] == "Memory", label
            assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"], label
            store = int(group["rayStartParams"]["object-store-memory"])
            assert store <= quantity(shm["emptyDir"]["sizeLimit"]) <= quantity(limits["memory"]), label
            assert container["image"] == f"tvlt-pipeline:{PYPROJECT['project']['version']}", label
            assert {"configMapRef": {"name": "tvlt-env"}} in container["envFrom"], label


def test_gpu_pods_ask_for_gpus_and_tolerate_gpu_nodes():
    for label, doc in of_kind(*RAY_KINDS):
        for group in cluster_spec(doc).get("workerGroupSpecs", []):
            pod = group["template"]["spec"]
            gpus = quantity(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            assert (group["groupName"] == "gpu") == (gpus > 0), label
            if gpus:
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


# --- credentials ----------------------------------------------------------------------------------------------------
def test_credentials_come_only_from_kubernetes_secrets():
    used: dict[str, set[str]] = {}
    for label, doc in MANIFESTS:
        assert doc["kind"] != "Secret", f"{label}: secrets are created by hand (README), never committed"
        if doc["kind"] == "ConfigMap":
            assert not [k for k in doc.get("data", {}) if SENSITIVE.search(k) and k not in NOT_SENSITIVE], label
        for c in containers(doc):
            for env in c.get("env", []):
                if SENSITIVE.search(env["name"]) and env["name"] not in NOT_SENSITIVE:
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    assert ref and "value" not in env, f"{label}: {env['name']} must come from a Secret"
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    used.setdefault(source["secretRef"]["name"], set())
        for t in pod_templates(doc):
            for volume in t["spec"].get("volumes", []):
                if "secret" in volume:
                    used.setdefault(volume["secret"]["secretName"], set()).update(
                        i["key"] for i in volume["secret"].get("items", []))
    assert set(used) == set(SECRETS), "the README's secret list and the manifests disagree"
    for name, keys in used.items():
        assert keys <= SECRETS[name], f"secret {name}: keys {keys - SECRETS[name]} are not documented"


def test_mlflow_server_requires_authentication_and_vm_dashboard_stays_on_loopback():
    (_, deployment), = [(label, d) for label, d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--app-name=basic-auth" in args
    vm = yaml.safe_load(VM_CLUSTER.read_text())
    head = " ".join(vm["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(vm["worker_start_ray_commands"])


# --- entry points, presets, versions --------------------------------------------------------------------------------
def entrypoints() -> list[tuple[str, str]]:
    """(label, command) of every job command in infra/: RayJob entrypoints."""
    return [(label, d["spec"]["entrypoint"]) for label, d in of_kind("RayJob")]


def entrypoint_problems(command: str) -> list[str]:
    """What is wrong with a `python <script> [--config FILE] ...` command named in infra/ (empty: nothing)."""
    argv = shlex.split(command)
    if argv[:1] != ["python"] or len(argv) < 2:
        return [f"{command!r}: expected `python <script> ...`"]
    problems = []
    script = repo_path(argv[1])
    if not script.is_file():
        problems.append(f"{argv[1]}: no such job in the repository ({script.relative_to(ROOT)})")
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config" and not repo_path(value).is_file():
            problems.append(f"--config {value}: no such preset ({repo_path(value).relative_to(ROOT)})")
    return problems


def job_args(command: str) -> tuple[str, list[str]]:
    """(module name, argv with repository paths) of a job command."""
    argv = shlex.split(command)
    module = str(repo_path(argv[1]).relative_to(ROOT).with_suffix("")).replace("/", ".")
    return module, [str(repo_path(a)) if a.startswith(app_dir() + "/") else a for a in argv[2:]]


@pytest.mark.parametrize("label,command", entrypoints(), ids=[label for label, _ in entrypoints()])
def test_every_entrypoint_names_an_existing_job_and_preset_and_parses(label, command, capsys):
    assert not entrypoint_problems(command), entrypoint_problems(command)
    module, argv = job_args(command)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main([*argv, "--print_config"])  # parses with the job's own parser
    assert exit_.value.code in (0, None), capsys.readouterr().err


def test_the_entrypoint_check_fails_on_a_renamed_job_or_preset():
    _, command = next(e for e in entrypoints() if "preprocess" in e[1])
    assert not entrypoint_problems(command)
    assert entrypoint_problems(command.replace("jobs/preprocess.py", "jobs/preprocessing.py"))
    assert entrypoint_problems(command.replace("preprocess_pretrain.yaml", "preprocess_pretrain_v2.yaml"))


def _dependency(name: str):
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return next(r for r in reqs if r.name == name)


def test_installed_dependencies_carry_bytecode():
    """The set-up (``make``'s uv ``--compile-bytecode``, the image's UV_COMPILE_BYTECODE) compiles site-packages
    once. Without it, where PYTHONDONTWRITEBYTECODE is set or site-packages is read-only (the image runs as uid
    1000), every Ray worker and decoder child compiles ray.data and torch from source again: seconds per process."""
    import ray.data
    import torch

    for module in (ray.data, torch):
        cached = Path(importlib.util.cache_from_source(module.__file__))
        assert cached.exists(), f"{module.__name__} has no bytecode ({cached}): re-run the set-up (make setup)"
    assert re.search(r"^\s+UV_COMPILE_BYTECODE=1", DOCKERFILE.read_text(), re.M)


def test_dockerfile_installs_the_lock_and_matches_python_and_cuda():
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY pyproject.toml uv.lock ./$", text, re.M), "the dependency layer must copy the lock"
    installs = re.findall(r"^RUN .*\buv (sync|pip install)\b([^\n\\]*)", text, re.M)
    assert installs == [("sync", " --locked --no-install-project"), ("sync", " --locked ")], installs
    assert re.search(r"^\s+UV_PROJECT_ENVIRONMENT=/opt/venv", text, re.M)
    uv_image = re.search(r"^FROM ghcr.io/astral-sh/uv:(\S+) AS uv$", text, re.M).group(1)
    assert uv_image == LOCKED["uv"], "the image's uv is the version uv.lock holds (make setup bootstraps it)"
    for dep in PYPROJECT["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
        assert not re.search(rf"\b{re.escape(name)}\s*(\[[^\]]*\])?\s*[=<>~!]=", text), f"{name} pinned twice"
    python = re.search(r"^ARG PYTHON_VERSION=(\S+)", text, re.M).group(1)
    assert Version(python + ".0") in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert python == f"{sys.version_info.major}.{sys.version_info.minor}", "the image runs the Python CI tests"
    import torch

    cuda = re.search(r"^ARG CUDA_BASE=nvidia/cuda:(\d+\.\d+)\.\d+-", text, re.M).group(1)
    if torch.version.cuda:
        assert cuda == torch.version.cuda, "DeepSpeed JIT-builds its ops with the image's nvcc against torch's CUDA"
    assert re.search(rf"tvlt-pipeline:{re.escape(PYPROJECT['project']['version'])}\b", text)
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "work"} <= set(ignore)


def test_mlflow_server_image_matches_the_client():
    import mlflow

    text = MLFLOW_DOCKERFILE.read_text()
    server = re.search(r"^ARG MLFLOW_VERSION=(\S+)", text, re.M).group(1)
    assert server in _dependency("mlflow").specifier
    assert server == LOCKED["mlflow"], "the server image runs the MLflow version uv.lock gives the clients"
    assert Version(server).release[:2] == Version(mlflow.__version__).release[:2]
    images = {c["image"] for _, d in MANIFESTS for c in containers(d) if "mlflow" in c["image"]}
    assert images == {f"tvlt-mlflow:{server}"}


def test_image_tags_agree_everywhere():
    version = PYPROJECT["project"]["version"]
    ours = {c["image"] for _, d in MANIFESTS for c in containers(d) if "tvlt-pipeline" in c["image"]}
    assert ours == {f"tvlt-pipeline:{version}"}
    assert yaml.safe_load(VM_CLUSTER.read_text())["docker"]["image"] == f"tvlt-pipeline:{version}"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    tags = {i["name"]: i["newTag"] for i in kustomization["images"]}
    assert tags["tvlt-pipeline"] == version
    for _, doc in MANIFESTS:
        for c in containers(doc):
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]


# --- resources against the jobs' configs ----------------------------------------------------------------------------
def job_config(command: str):
    """The config a job command runs with, through the job's own config class and jobs.config.parse."""
    from jobs.config import parse

    module, argv = job_args(command)
    mod = importlib.import_module(module)
    (cls,) = {v for v in vars(mod).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
              and v.__module__ == module and "parallel" in {f.name for f in dataclasses.fields(v)}}
    return parse(cls, argv, prog=module)


def demand(parallel) -> tuple[int, float, float]:
    """(Ray workers, CPUs and GPUs each) of a job's ``parallel`` section: Ray Train workers or evaluation actors."""
    if hasattr(parallel, "num_workers"):
        return parallel.num_workers, parallel.cpus_per_worker, parallel.gpus_per_worker if parallel.use_gpu else 0
    return parallel.actors, parallel.cpus_per_actor, parallel.gpus_per_actor


def workers_per_pod(container: dict, cpus: float, gpus: float) -> int:
    limits = container["resources"]["limits"]
    fit = [math.floor(quantity(limits["cpu"]) / cpus) if cpus else math.inf]
    if gpus:
        fit.append(math.floor(quantity(limits.get("nvidia.com/gpu", 0)) / gpus))
    return min(fit)


GPU_JOBS = [(label, d) for label, d in of_kind("RayJob")
            if re.search(r"/jobs/(pretrain|finetune_tvp|evaluate)\.py", d["spec"]["entrypoint"])]


@pytest.mark.parametrize("label,doc", GPU_JOBS, ids=[label for label, _ in GPU_JOBS])
def test_gpu_pods_hold_the_jobs_ray_workers_exactly(label, doc):
    script = shlex.split(doc["spec"]["entrypoint"])[1]
    if not repo_path(script).exists():
        pytest.fail(f"{script} named by {label} does not exist")
    workers, cpus, gpus = demand(job_config(doc["spec"]["entrypoint"]).parallel)
    assert workers >= 1 and gpus > 0, f"{label} runs GPU pods, but its config puts the work on CPUs or the driver"
    (group,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    per_pod = workers_per_pod(container, cpus, gpus)
    assert per_pod >= 1, f"{label}: one worker does not fit a pod"
    # Enough pods for every worker, and not one more: a spare GPU pod would idle for the whole run.
    assert group["replicas"] == group["maxReplicas"] == math.ceil(workers / per_pod), label
    pod_gpus = quantity(container["resources"]["limits"]["nvidia.com/gpu"])
    assert per_pod * gpus == pod_gpus, f"{label}: the CPUs per worker leave {pod_gpus - per_pod * gpus} GPU(s) idle"


def test_standing_clusters_can_run_the_base_training_configs():
    needs = [job_config(d["spec"]["entrypoint"]).parallel for _, d in GPU_JOBS
             if "evaluate.py" not in d["spec"]["entrypoint"]]
    assert len(needs) == 2, "pretraining and fine-tuning RayJobs"
    (_, cluster), = of_kind("RayCluster")
    (gpu,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    vm = yaml.safe_load(VM_CLUSTER.read_text())["available_node_types"]["gpu"]
    for p in needs:
        per_pod = workers_per_pod(gpu["template"]["spec"]["containers"][0], p.cpus_per_worker, p.gpus_per_worker)
        assert gpu["maxReplicas"] * per_pod >= p.num_workers, "RayCluster gpu group too small for the base config"
        per_vm = min(vm["resources"]["CPU"] // p.cpus_per_worker, vm["resources"]["GPU"] // p.gpus_per_worker)
        assert vm["max_workers"] * per_vm >= p.num_workers, "VM gpu nodes too few for the base config"


def test_preprocessing_pods_have_memory_for_their_decoders():
    (_, rayjob), = [(lb, d) for lb, d in of_kind("RayJob") if "preprocess.py" in d["spec"]["entrypoint"]]
    from jobs.config import parse
    from pipelines.config import PreprocessConfig

    _, argv = job_args(rayjob["spec"]["entrypoint"])
    res = parse(PreprocessConfig, argv, prog="preprocess").resources
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        decoders = math.floor(quantity(limits["cpu"]) / res.decode_cpus)
        need = decoders * res.decode_memory_gib * 2**30 + int(group["rayStartParams"]["object-store-memory"])
        assert need <= quantity(limits["memory"]), f"{decoders} decoders and the object store need {need:.3g} B"


# --- kustomize and the scheduled preprocessing ----------------------------------------------------------------------
def test_kustomization_covers_every_manifest_and_builds():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    applied = {K8S / r for r in kustomization["resources"]}
    generated = {K8S / f.split("=", 1)[-1] for g in kustomization["configMapGenerator"] for f in g["files"]}
    on_demand = set((K8S / "jobs").glob("*.yaml"))  # created per run with `kubectl create -f`
    assert applied | generated | on_demand == set(k8s_files())
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: the file coverage was checked, the kustomize build was not")
    built = list(yaml.safe_load_all(subprocess.run(["kubectl", "kustomize", str(K8S)], check=True,
                                                   capture_output=True, text=True).stdout))
    (cm,) = [d for d in built if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("preprocess-rayjob")]
    (cron,) = [d for d in built if d["kind"] == "CronJob"]
    volumes = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "template", "configMap": {"name": cm["metadata"]["name"]}} in volumes
    assert all(d["metadata"].get("namespace", "tvlt") == "tvlt" for d in built)


def test_cronjob_runs_the_scheduler_on_the_mounted_template():
    (_, cron), = of_kind("CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:4] == ["python", "-m", "infra.schedule", "rayjob"]
    assert container["workingDir"] == app_dir() and (ROOT / "infra" / "schedule.py").is_file()
    template = command[command.index("--template") + 1]
    (mount,) = [m for m in container["volumeMounts"] if template.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (gen,) = [g for g in kustomization["configMapGenerator"] if g["name"] == volume["configMap"]["name"]]
    assert any(f.startswith(Path(template).name + "=") for f in gen["files"])
    assert command[command.index("--cronjob") + 1] == cron["metadata"]["name"]
    assert command[command.index("--container") + 1] == container["name"]
    job_name = next(e for e in container["env"] if e["name"] == "JOB_NAME")
    assert job_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (role,) = [d for _, d in of_kind("Role") if d["metadata"]["name"] == pod["serviceAccountName"]]
    verbs = {v for rule in role["rules"] if "rayjobs" in rule["resources"] for v in rule["verbs"]}
    assert verbs == {"create"}  # the lease on the output folder, not a listing of RayJobs, keeps runs apart


def test_one_submission_id_per_schedule_slot():
    slot = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
    job_name = f"preprocess-{int(slot.timestamp()) // 60}"  # how the CronJob controller names the slot's Job
    assert schedule.slot_from_job_name(job_name, "preprocess") == slot
    assert schedule.submission_id(slot) == "preprocess-202501311200"
    for other in ("preprocess-now", "preprocess-1", f"other-{int(slot.timestamp()) // 60}", ""):
        assert schedule.slot_from_job_name(other, "preprocess") is None, other
    now = datetime(2025, 1, 31, 12, 34, 56, tzinfo=UTC)
    assert schedule.floor_slot(now, 60) == slot
    assert schedule.floor_slot(now, 15) == datetime(2025, 1, 31, 12, 30, tzinfo=UTC)
    assert schedule.submission_id(schedule.floor_slot(now, 60)) == schedule.submission_id(slot)


def test_rendered_rayjob_names_the_slot_and_runs_the_schedulers_image(kuberay_schema):
    (template,) = docs(K8S / "preprocess" / "rayjob.yaml")
    before = json.dumps(template, sort_keys=True)
    rendered = schedule.render_rayjob(template, SLOT, image="registry.example/tvlt-pipeline:9")
    assert json.dumps(template, sort_keys=True) == before, "the template must not change"
    assert rendered["metadata"]["name"] == rendered["spec"]["jobId"] == "preprocess-202501311200"
    assert rendered == schedule.render_rayjob(template, SLOT, image="registry.example/tvlt-pipeline:9")
    assert {c["image"] for g in ray_groups(rendered) for c in g["template"]["spec"]["containers"]} == \
        {"registry.example/tvlt-pipeline:9"}
    assert jsonschema.Draft7Validator(strict(kuberay_schema["RayJob"])).is_valid(rendered)


def test_vm_secret_exports_survive_the_shell():
    from infra.vm.secret_env import exports

    secret = {"RAY_AUTH_TOKEN": "a'b \"c\" $HOME `id` ;x", "MLFLOW_TRACKING_PASSWORD": "p w\nline2"}
    script = 'eval "$(cat)"; printf "%s\\0%s" "$RAY_AUTH_TOKEN" "$MLFLOW_TRACKING_PASSWORD"'
    out = subprocess.run(["bash", "-c", script], input=exports(secret), capture_output=True, text=True,
                         check=True).stdout
    assert out.split("\0") == [secret["RAY_AUTH_TOKEN"], secret["MLFLOW_TRACKING_PASSWORD"]]
    with pytest.raises(ValueError):
        exports({"not-a-name": "x"})
