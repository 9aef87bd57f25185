import json
from pathlib import Path

import kubernetes_validate
import yaml

from assets.execution import GLOBAL_STEP_TAGS, GPU_STEP_TAGS

K8S = Path(__file__).resolve().parents[1] / "k8s"


def test_vllm_manifests_are_valid_kubernetes():
    docs = [d for f in sorted((K8S / "vllm").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert {d["kind"] for d in docs} == {"Deployment", "Service"}
    for d in docs:
        kubernetes_validate.validate(d, "1.30", strict=True)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--served-model-name=realsyn-fusion-llama3-8b" in container["args"]


def test_step_pod_profiles_are_valid_pod_specs():
    # the dagster-k8s/config of GPU and global steps, rendered into a Pod, must be valid Kubernetes
    for tags in (GPU_STEP_TAGS, GLOBAL_STEP_TAGS):
        cfg = tags["dagster-k8s/config"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "step"},
            "spec": {
                "containers": [{"name": "step", "image": "realsyn:gpu", "resources": cfg["container_config"]["resources"]}],
                "nodeSelector": cfg["pod_spec_config"]["node_selector"],
                "tolerations": [
                    {"key": t["key"], "operator": t["operator"], "effect": t["effect"]} for t in cfg["pod_spec_config"]["tolerations"]
                ],
            },
        }
        kubernetes_validate.validate(json.loads(json.dumps(pod)), "1.30", strict=True)


def test_helm_values_point_at_the_code_location():
    values = yaml.safe_load((K8S / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"][:2] == ["--module-name", "definitions"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["REALSYN_ENV"] == "production" and env["REALSYN_STORAGE_ROOT"].startswith("s3://")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
