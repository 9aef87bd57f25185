"""Render the vLLM server's manifests (Deployment, Service, HorizontalPodAutoscaler,
PodDisruptionBudget) from k8s/vllm/values.yaml, a deployment's values file and --set overrides.

    python k8s/vllm/render.py -f prod.yaml --set namespace=team-b --set autoscaling.maxReplicas=12 | kubectl apply -f -

Only the standard library and PyYAML: no helm or kustomize needed, and tests render it offline.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

DEFAULTS = Path(__file__).with_name("values.yaml")


def merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``, dicts merged key by key, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


def set_value(values: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to ``values``."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise SystemExit(f"--set expects key=value, got {assignment!r}")
    *parents, leaf = path.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = yaml.safe_load(raw)


def load_values(files: list[str], sets: list[str]) -> dict[str, Any]:
    values = yaml.safe_load(DEFAULTS.read_text())
    for f in files:
        values = merge(values, yaml.safe_load(Path(f).read_text()) or {})
    for s in sets:
        set_value(values, s)
    unknown = set(values) - set(yaml.safe_load(DEFAULTS.read_text()))
    if unknown:
        raise SystemExit(f"unknown vLLM values {sorted(unknown)} (see {DEFAULTS})")
    return values


def render(v: dict[str, Any]) -> list[dict[str, Any]]:
    name, ns = v["name"], v["namespace"]
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "realsyn"}
    meta = {"name": name, "namespace": ns, "labels": labels}
    requests = {**v["resources"]["requests"], "nvidia.com/gpu": str(v["gpus"])}
    limits = {**v["resources"]["limits"], "nvidia.com/gpu": str(v["gpus"])}
    container = {
        "name": "vllm",
        "image": v["image"],
        "args": [
            f"--model={v['model']}",
            f"--served-model-name={v['servedModelName']}",
            f"--max-model-len={v['maxModelLen']}",
            f"--gpu-memory-utilization={v['gpuMemoryUtilization']}",
            f"--port={v['port']}",
        ],
        "env": [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": dict(v["apiKeySecret"])}}],
        "ports": [{"name": "http", "containerPort": v["port"]}],
        # weights load for minutes: ready only when /health answers, restarted only if it stops
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 90},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 30, "failureThreshold": 3},
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "nodeSelector": dict(v["nodeSelector"]),
                "tolerations": [dict(t) for t in v["tolerations"]],
                "terminationGracePeriodSeconds": 60,
                "containers": [container],
                "volumes": [
                    {"name": "models", "persistentVolumeClaim": {"claimName": v["modelsClaim"], "readOnly": True}},
                    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": v["shmSize"]}},
                ],
            },
        },
    }
    autoscaling = v["autoscaling"]
    if not autoscaling["enabled"]:
        deployment_spec = {"replicas": v["replicas"], **deployment_spec}  # with an HPA, the HPA owns replicas
    docs: list[dict[str, Any]] = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": deployment_spec},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {"selector": {"app.kubernetes.io/name": name}, "ports": [{"name": "http", "port": v["port"], "targetPort": "http"}]},
        },
    ]
    if autoscaling["enabled"]:
        docs.append(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": meta,
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": autoscaling["minReplicas"],
                    "maxReplicas": autoscaling["maxReplicas"],
                    "metrics": [
                        {
                            "type": "Pods",
                            "pods": {
                                "metric": {"name": autoscaling["metric"]},
                                "target": {"type": "AverageValue", "averageValue": str(autoscaling["averageValue"])},
                            },
                        }
                    ],
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": autoscaling["scaleDownStabilizationSeconds"]}},
                },
            }
        )
    docs.append(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta,
            "spec": {"minAvailable": v["minAvailable"], "selector": {"matchLabels": {"app.kubernetes.io/name": name}}},
        }
    )
    return json.loads(json.dumps(docs))  # plain trees: no YAML anchors between objects


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-f", "--values", action="append", default=[], help="values file over k8s/vllm/values.yaml (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="key.path=value over the files (repeatable)")
    args = parser.parse_args(argv)
    yaml.safe_dump_all(render(load_values(args.values, args.set)), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
