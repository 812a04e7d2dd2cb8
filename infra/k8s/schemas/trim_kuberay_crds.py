"""Make kuberay-<version>.json: the RayCluster and RayJob schemas of a KubeRay release, for offline validation.

    git clone --depth 1 --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay
    python infra/k8s/schemas/trim_kuberay_crds.py /tmp/kuberay/ray-operator/config/crd/bases v1.7.0

The CRDs are 1-1.4 MB each, nearly all of it the Kubernetes pod template repeated per group. Those subtrees are
replaced by a stub (tests/test_infra_manifests.py validates every pod template against Kubernetes' own PodTemplate
schema instead), and descriptions are dropped; what is left, about 25 kB per kind, is every KubeRay field with its
type and enum, and the source the operator's API server would validate against.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

POD_TEMPLATES = {"template", "submitterPodTemplate"}
STUB = {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "x-tvlt-pod-template": True}


def trim(node):
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description":
                continue
            if key == "properties":
                out[key] = {k: (STUB if k in POD_TEMPLATES else trim(v)) for k, v in value.items()}
            else:
                out[key] = trim(value)
        return out
    if isinstance(node, list):
        return [trim(x) for x in node]
    return node


def main(bases: str, version: str) -> None:
    out = {"$comment": f"KubeRay {version} ray.io/v1 RayCluster and RayJob, trimmed by {Path(__file__).name}"}
    for kind, file in (("RayCluster", "ray.io_rayclusters.yaml"), ("RayJob", "ray.io_rayjobs.yaml")):
        crd = yaml.safe_load((Path(bases) / file).read_text())
        v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = trim(v1["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)  # written by the operator, never by us
        out[kind] = schema
    target = Path(__file__).with_name(f"kuberay-{version}.json")
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
