"""The Kubernetes deployment, checked offline: the Job dagster-k8s submits for every step, the chart
values' instance config, the vLLM manifests; every object against the Kubernetes 1.30 schemas.

Each step's Job is built by dagster-k8s's own ``k8s_job_executor`` (``K8sStepHandler.launch_step``:
run-launcher defaults, the code location's container context, the step's ``dagster-k8s/config``
tag, ``construct_dagster_k8s_job``) with the Kubernetes API replaced by a recorder. The only copy here
is how the Helm chart turns values into the instance and container-context config (no helm offline).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import dagster as dg
import kubernetes
import kubernetes_validate
import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
from dagster._core.execution.context_creation_job import create_context_free_log_manager
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.init import InitExecutorContext
from dagster._core.executor.step_delegating.step_handler.base import StepHandlerContext
from dagster._core.test_utils import create_run_for_test, instance_for_test
from dagster._grpc.types import ExecuteStepArgs
from dagster_k8s.executor import _K8S_EXECUTOR_CONFIG_SCHEMA, k8s_job_executor

from assets import profiles
from assets.jobs import JOBS_IN_ORDER
from definitions import build_definitions

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.30"
NAMESPACE = "realsyn"
RELEASE = "realsyn"
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "REALSYN_VLLM_API_KEY"}
# The right-sizing choice of every asset step: a GPU only where a CUDA kernel runs (model
# inference, faiss over all shards, training); remote-LLM captioning and tar writing on CPU pods.
EXPECTED_PROFILES = {
    "document_databases": "cpu-io",
    "filtered_images": "cpu-small",
    "sentence_candidates": "cpu-small",
    "sentence_perplexity": "gpu",
    "filtered_sentences": "cpu-small",
    "image_embeddings": "gpu",
    "sentence_embeddings": "gpu",
    "image_dedup": "gpu-bigmem",
    "sentence_dedup": "gpu-bigmem",
    "sentence_clusters": "gpu-bigmem",
    "image_clusters": "gpu-bigmem",
    "retrievals": "gpu-bigmem",
    "synthetic_captions": "cpu-model",
    "filtered_pairs": "gpu",
    "sampled_splits": "cpu-bigmem",
    "exported_shards": "cpu-io",
    "exported_splits": "cpu-io",
    "evaluations": "gpu",
}
GPU_STEPS = {step for step, profile in EXPECTED_PROFILES.items() if profile.startswith("gpu")}
# steps that load a model from /models: CLIP (embeddings, cosine band, the tagger's vocabulary), the perplexity LM
MODEL_STEPS = {"sentence_perplexity", "image_embeddings", "sentence_embeddings", "synthetic_captions", "filtered_pairs", "sampled_splits"}


def _values() -> dict:
    return yaml.safe_load((K8S / "values.yaml").read_text())


def _validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# --- the chart's values -> instance / container context, as its templates render them ------------
_RUN_K8S_KEYS = {
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}


def chart_instance_overrides(values: dict, kubeconfig: str) -> dict:
    """dagster.yaml of the chart (helpers/instance/_run-launcher, _compute-log-manager, _concurrency.tpl), for what values.yaml sets."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    config = {
        "load_incluster_config": False,  # the chart: loadInclusterConfig (true in a cluster)
        "kubeconfig_file": kubeconfig,
        "job_namespace": launcher.get("jobNamespace", NAMESPACE),
        "image_pull_policy": launcher.get("imagePullPolicy"),
        "service_account_name": values["global"]["serviceAccountName"],
        "dagster_home": "/opt/dagster/dagster_home",
        "instance_config_map": f"{RELEASE}-instance",
        "postgres_password_secret": "dagster-postgresql-secret",
    }
    for key, out in (("envSecrets", "env_secrets"), ("envConfigMaps", "env_config_maps")):
        if launcher.get(key):
            config[out] = [e["name"] for e in launcher[key]]
    for key, out in (("envVars", "env_vars"), ("volumeMounts", "volume_mounts"), ("volumes", "volumes"), ("resources", "resources")):
        if launcher.get(key):
            config[out] = launcher[key]
    if launcher.get("runK8sConfig"):
        config["run_k8s_config"] = {_RUN_K8S_KEYS[k]: v for k, v in launcher["runK8sConfig"].items()}
    s3 = values["computeLogManager"]["config"]["s3ComputeLogManager"]
    assert values["computeLogManager"]["type"] == "S3ComputeLogManager"
    compute_logs = {"bucket": s3["bucket"], "prefix": s3["prefix"], "skip_empty_files": s3["skipEmptyFiles"]}
    pools, runs = values["concurrency"]["pools"], values["concurrency"]["runs"]
    return {
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": config},
        "compute_logs": {"module": "dagster_aws.s3.compute_log_manager", "class": "S3ComputeLogManager", "config": compute_logs},
        "concurrency": {
            "pools": {"default_limit": pools["defaultLimit"], "granularity": pools["granularity"]},
            "runs": {"max_concurrent_runs": runs["maxConcurrentRuns"]},
        },
    }


def chart_container_context(deployment: dict) -> dict:
    """The code location's container context (dagster-user-deployments helpers/_helpers.tpl, k8sContainerContext)."""
    assert deployment["includeConfigInLaunchedRuns"]["enabled"]
    k8s = {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_config_maps": [f"{RELEASE}-dagster-user-deployments-{deployment['name']}-user-env"]
        + [c["name"] for c in deployment.get("envConfigMaps", [])],
        "namespace": NAMESPACE,
        "service_account_name": _values()["global"]["serviceAccountName"],
        "env": deployment["env"],
    }
    if deployment.get("envSecrets"):
        k8s["env_secrets"] = [s["name"] for s in deployment["envSecrets"]]
    if deployment.get("resources"):
        k8s["resources"] = deployment["resources"]
    return {"k8s": k8s}


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: offline, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: offline, user: {token: offline}}]
contexts: [{name: offline, context: {cluster: offline, user: offline, namespace: realsyn}}]
current-context: offline
"""


@pytest.fixture(scope="module")
def step_jobs(tmp_path_factory) -> dict[str, dict]:
    """Every step of every job -> the Kubernetes Job (a dict, as the API would receive it) the executor submits."""
    kubeconfig = tmp_path_factory.mktemp("kube") / "config"
    kubeconfig.write_text(KUBECONFIG)
    values = _values()
    deployment = values["dagster-user-deployments"]["deployments"][0]
    code_image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    defs = build_definitions("production", input_uri="s3://corpus/in/", storage_root="s3://data/out/")
    repo = ReconstructableRepository.for_module(
        "definitions",
        "defs",
        working_directory=str(ROOT),
        container_image=code_image,
        container_context=chart_container_context(deployment),
    )
    api = kubernetes.client.ApiClient()
    jobs: dict[str, dict] = {}
    with (
        instance_for_test(overrides=chart_instance_overrides(values, str(kubeconfig))) as instance,
        mock.patch("kubernetes.client.BatchV1Api") as batch_api,
        mock.patch("kubernetes.client.CoreV1Api"),
        mock.patch.dict(os.environ, {"REALSYN_VLLM_API_KEY": "unused-offline"}),
    ):
        for job in JOBS_IN_ORDER:
            job_def = defs.resolve_job_def(job.name)
            assert job_def.executor_def.name == "k8s"
            origin = repo.get_reconstructable_job(job.name).get_python_origin()
            executor_config = process_config(resolve_to_config_type(_K8S_EXECUTOR_CONFIG_SCHEMA), {})
            assert executor_config.success, executor_config.errors
            executor = k8s_job_executor.executor_creation_fn(
                InitExecutorContext(
                    job=InMemoryJob(job_def), executor_def=k8s_job_executor, executor_config=executor_config.value, instance=instance
                )
            )
            run = create_run_for_test(instance, job_name=job.name, job_code_origin=origin)
            plan = create_execution_plan(job_def)
            plan_context = PlanOrchestrationContext(
                plan_data=PlanData(
                    job=job_def, dagster_run=run, instance=instance, execution_plan=plan, raise_on_error=True, retry_mode=RetryMode.DISABLED
                ),
                log_manager=create_context_free_log_manager(instance, run),
                executor=executor,
                output_capture=None,
            )
            for step in plan.steps:
                args = ExecuteStepArgs(origin, run.run_id, [step.key])
                context = StepHandlerContext(
                    instance=instance, plan_context=plan_context, steps=plan.steps, execute_step_args=args, dagster_run=run
                )
                batch_api.return_value.create_namespaced_job.reset_mock()
                list(executor._step_handler.launch_step(context))  # noqa: SLF001 (the executor's own handler)
                call = batch_api.return_value.create_namespaced_job.call_args
                assert call.kwargs["namespace"] == NAMESPACE
                jobs[step.key] = api.sanitize_for_serialization(call.kwargs["body"])
        assert instance.get_concurrency_config().pool_config.default_pool_limit == values["concurrency"]["pools"]["defaultLimit"]
        assert type(instance.compute_log_manager).__name__ == "S3ComputeLogManager"
    return jobs


def _container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


@functools.cache
def _step_profile_names() -> dict[str, str]:
    """Op name -> profile of every asset step, as the production code location declares it."""
    defs = build_definitions("production", input_uri="s3://corpus/in/", storage_root="s3://data/out/")
    steps = {key.to_user_string(): defs.resolve_assets_def(key).op for key in defs.resolve_asset_graph().executable_asset_keys}
    return {op.name: op.tags[profiles.PROFILE_TAG] for op in steps.values()}


def test_every_step_has_a_job_and_every_job_is_valid_kubernetes(step_jobs):
    assert _step_profile_names() == EXPECTED_PROFILES
    assets = set(EXPECTED_PROFILES)
    checks = set(step_jobs) - assets
    assert assets <= set(step_jobs)
    # asset checks are steps too: they read small outputs on the code server's image and size
    assert checks == {"sentence_clusters_sentence_clusters_are_usable", "sampled_splits_sampled_splits_respect_caps", "exported_splits_exported_splits_match_sizes"}  # fmt: skip
    deployment = _values()["dagster-user-deployments"]["deployments"][0]
    for step in checks:
        assert _container(step_jobs[step])["resources"] == deployment["resources"]
        assert _container(step_jobs[step])["image"] == f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    for job in step_jobs.values():
        _validate(job)


def test_gpu_steps_run_the_cuda_image_with_a_gpu_and_cpu_steps_do_not(step_jobs):
    table = profiles.load_profile_table(environ={})
    values_env = {e["name"]: e.get("value") for e in _values()["dagster-user-deployments"]["deployments"][0]["env"]}
    cuda, cpu = values_env["REALSYN_IMAGE_CUDA"], values_env["REALSYN_IMAGE_CPU"]
    assert (cuda, cpu) == (table.images["cuda"], table.images["cpu"]) and cuda != cpu
    gpu_steps = set()
    for step, job in step_jobs.items():
        c, pod = _container(job), job["spec"]["template"]["spec"]
        if "nvidia.com/gpu" in c["resources"]["limits"]:
            gpu_steps.add(step)
            assert c["image"] == cuda, step
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert pod["nodeSelector"]["realsyn.io/node-pool"] in ("gpu", "gpu-highmem")
            assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert {"name": "REALSYN_DEVICE", "value": "cuda"} in c["env"]
        else:
            assert c["image"] == cpu, step
            assert "nvidia.com/gpu" not in c["resources"]["requests"], step
            assert "gpu" not in pod.get("nodeSelector", {}).get("realsyn.io/node-pool", ""), step
            assert "tolerations" not in pod, step
    assert gpu_steps == GPU_STEPS
    # the remote-LLM step and the tar writers never hold a GPU
    assert {"synthetic_captions", "exported_shards", "exported_splits", "document_databases"}.isdisjoint(gpu_steps)


def test_every_container_is_bounded_and_sized_by_its_profile(step_jobs):
    table = profiles.load_profile_table(environ={})
    for step, job in step_jobs.items():
        assert {"cpu", "memory"} <= set(_container(job)["resources"]["limits"]), step
    for step, name in _step_profile_names().items():
        resources, p = _container(step_jobs[step])["resources"], table.profiles[name]
        assert {k: v for k, v in resources["requests"].items() if k != "nvidia.com/gpu"} == p.resources.requests, step
        assert {k: v for k, v in resources["limits"].items() if k != "nvidia.com/gpu"} == p.resources.limits, step
    # the profile tag wins over the code server's own resources (1 CPU, 4Gi) that every pod inherits
    assert _container(step_jobs["image_dedup"])["resources"]["requests"] == {
        "cpu": "16",
        "memory": "200Gi",
        "ephemeral-storage": "1Ti",
        "nvidia.com/gpu": "1",
    }
    assert _container(step_jobs["filtered_images"])["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "12Gi"}}  # fmt: skip


def test_secrets_come_from_secret_key_refs_never_literals(step_jobs):
    for step, job in step_jobs.items():
        env = {e["name"]: e for e in _container(job)["env"]}
        for name in SECRET_ENV:
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "realsyn-secrets", "key": name}, (step, name)
            assert "value" not in env[name]
        literal = {e["name"] for e in env.values() if "value" in e}
        assert not {n for n in literal if re.search(r"SECRET|PASSWORD|TOKEN|API_KEY|ACCESS_KEY", n)}, (step, literal)
        assert env["REALSYN_ENV"]["value"] == "production"


def test_model_volume_is_mounted_read_only_where_a_model_loads(step_jobs):
    table = profiles.load_profile_table(environ={})
    claim = table.models.volume["persistentVolumeClaim"]["claimName"]
    mounted = set()
    for step, job in step_jobs.items():
        c, pod = _container(job), job["spec"]["template"]["spec"]
        mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/models"]
        if mounts:
            mounted.add(step)
            assert mounts == [{"name": "models", "mountPath": "/models", "readOnly": True}], step
            (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
            assert volume["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
    table = profiles.load_profile_table(environ={})
    assert MODEL_STEPS <= mounted == {step for step, name in EXPECTED_PROFILES.items() if table.profiles[name].models}
    # the tagger of synthetic_captions embeds its vocabulary with CLIP on the CPU
    assert {"name": "REALSYN_DEVICE", "value": "cpu"} in _container(step_jobs["synthetic_captions"])["env"]


def test_gpu_and_s3_heavy_steps_retry_with_exponential_backoff_in_production():
    table = profiles.load_profile_table(environ={})
    retried = {}
    for step, name in _step_profile_names().items():
        options = table.step_options(step, name, env="production")
        assert table.step_options(step, name, env="local").get("retry_policy") is None  # locally a failure shows at once
        if "retry_policy" in options:
            retried[step] = options["retry_policy"]
    assert set(retried) == GPU_STEPS | {"document_databases", "synthetic_captions", "sampled_splits", "exported_shards", "exported_splits"}
    assert not retried.keys() & {
        "filtered_images",
        "sentence_candidates",
        "filtered_sentences",
    }  # pure CPU on local rows: a failure is a bug
    gpu = retried["image_embeddings"]
    assert (gpu.max_retries, gpu.delay, gpu.backoff, gpu.jitter) == (3, 60, dg.Backoff.EXPONENTIAL, dg.Jitter.PLUS_MINUS)
    s3 = retried["exported_shards"]
    assert (s3.max_retries, s3.delay, s3.backoff) == (4, 15, dg.Backoff.EXPONENTIAL)


def test_gpu_steps_take_a_slot_of_the_gpu_pool():
    defs = build_definitions("production", input_uri="s3://corpus/in/", storage_root="s3://data/out/")
    pools = {
        defs.resolve_assets_def(key).op.name: defs.resolve_assets_def(key).op.pool
        for key in defs.resolve_asset_graph().executable_asset_keys
    }
    assert {s for s, p in pools.items() if p == "gpu"} == GPU_STEPS
    assert {p for s, p in pools.items() if s not in GPU_STEPS} == {None}


def test_a_deployment_chooses_images_and_profiles_without_code_changes(tmp_path):
    raw = yaml.safe_load((K8S / "step_profiles.yaml").read_text())
    raw["step_profiles"] = {"retrievals": "cpu-bigmem"}
    custom = tmp_path / "profiles.yaml"
    custom.write_text(yaml.safe_dump(raw))
    table = profiles.load_profile_table(environ={profiles.PROFILES_ENV: str(custom), "REALSYN_IMAGE_CUDA": "registry.local/cuda:7"})
    options = table.step_options("retrievals", "gpu-bigmem", env="local")
    config = options["op_tags"]["dagster-k8s/config"]
    assert options["op_tags"][profiles.PROFILE_TAG] == "cpu-bigmem" and "pool" not in options
    assert "nvidia.com/gpu" not in config["container_config"]["resources"]["limits"]
    assert table.step_options("image_embeddings", "gpu", env="local")["op_tags"]["dagster-k8s/config"]["container_config"]["image"] == (
        "registry.local/cuda:7"
    )
    # the code location loads with the deployment's file
    probe = "from assets.profiles import profile_table as t; print(t().profile_of('retrievals', 'gpu-bigmem'))"
    env = {"PATH": "/usr/bin:/bin", profiles.PROFILES_ENV: str(custom), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "cpu-bigmem"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["profiles"]["gpu"].update(image="tpu"), "image 'tpu' is not one of images"),
        (lambda r: r["profiles"]["cpu-small"]["resources"].pop("limits"), "limits"),
        (lambda r: r["profiles"]["cpu-small"]["resources"]["limits"].pop("memory"), "requests and limits for cpu and memory"),
        (lambda r: r.update(step_profiles={"retrievals": "huge"}), "step_profiles['retrievals'] = 'huge'"),
        (lambda r: r["profiles"]["gpu"].update(retry="forever"), "retry 'forever'"),
        (lambda r: r["profiles"]["gpu"].update(gpu=1), "gpu"),
    ],
)
def test_a_bad_profile_table_fails_with_its_file_and_field(tmp_path, edit, message):
    raw = yaml.safe_load((K8S / "step_profiles.yaml").read_text())
    edit(raw)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="invalid step profiles") as err:
        profiles.load_profile_table(bad, environ={})
    assert message in str(err.value) and str(bad) in str(err.value)


def test_an_unknown_profile_name_in_code_is_refused():
    table = profiles.load_profile_table(environ={})
    with pytest.raises(KeyError, match="profile 'gpu-xl' is not one of"):
        table.step_options("image_embeddings", "gpu-xl")


def test_values_objects_are_valid_kubernetes():
    values = _values()
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"][:2] == ["--module-name", "definitions"]
    run_config = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "realsyn-code-server"},
        "spec": {
            "containers": [
                {
                    "name": "realsyn",
                    "image": f"{deployment['image']['repository']}:{deployment['image']['tag']}",
                    "env": deployment["env"],
                    "resources": deployment["resources"],
                },
                {"name": "run", "image": "run", "resources": run_config["containerConfig"]["resources"]},
            ]
        },
    }
    _validate(pod)
    _validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "run"}, "spec": {**run_config["jobSpecConfig"], "template": {"spec": {**pod["spec"], "restartPolicy": "Never"}}}})  # fmt: skip


def test_readme_table_of_steps_matches_the_profiles():
    table = profiles.load_profile_table(environ={})
    rows = {}
    for line in (K8S / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 9:
            rows[cells[0].split("`")[1]] = cells[1:]
    assert set(rows) == set(EXPECTED_PROFILES)
    for step, (name, image, cpu, memory, gpus, pool, models, retry) in rows.items():
        p = table.profiles[name]
        assert name == EXPECTED_PROFILES[step], step
        assert (image, gpus, models, retry) == (p.image, str(p.gpus or "-"), "ro" if p.models else "-", p.retry or "-"), step
        assert cpu == f"{p.resources.requests['cpu']} / {p.resources.limits['cpu']}", step
        assert memory == f"{p.resources.requests['memory']} / {p.resources.limits['memory']}", step
        assert pool == p.node_selector.get("realsyn.io/node-pool", "any"), step


def test_model_volume_manifests_are_valid_and_one_claim_everywhere():
    docs = [d for d in yaml.safe_load_all((K8S / "models.yaml").read_text()) if d]
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Job"]
    for d in docs:
        _validate(d)
        assert "namespace" not in d["metadata"]  # applied with -n
    claim = docs[0]["metadata"]["name"]
    assert "ReadWriteMany" in docs[0]["spec"]["accessModes"]  # one writer, many readers on many nodes
    sync = docs[1]["spec"]["template"]["spec"]
    assert (
        sync["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
        and sync["containers"][0]["volumeMounts"][0]["mountPath"] == "/models"
    )
    assert all("valueFrom" in e for e in sync["containers"][0]["env"])
    table = profiles.load_profile_table(environ={})
    assert table.models.volume["persistentVolumeClaim"]["claimName"] == claim and table.models.mount_path == "/models"
    assert yaml.safe_load((K8S / "vllm" / "values.yaml").read_text())["modelsClaim"] == claim


def test_chart_and_images_pin_the_same_dagster_release():
    import tomllib
    from importlib.metadata import version

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"] + pyproject["project"]["optional-dependencies"]["k8s"]
    pins = {d.split("==")[0].strip(): d.split("==")[1].strip() for d in deps if "==" in d}
    # one Dagster release: the core, its libraries (0.x of the same release) and the chart
    for dist in ("dagster", "dagster-webserver", "dagster-aws", "dagster-k8s", "dagster-postgres"):
        assert pins[dist] == version(dist), dist
    release = pins["dagster"]
    assert len({pins[d] for d in ("dagster-aws", "dagster-k8s", "dagster-postgres")}) == 1
    assert f"--version {release}" in (K8S / "values.yaml").read_text()
    assert f"dagster/dagster --version {release}" in (K8S / "README.md").read_text()
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (K8S / dockerfile).read_text()
        assert '".[k8s' in text, dockerfile  # dagster-postgres and dagster-k8s at the pinned release
        assert "REALSYN_STEP_PROFILES=/opt/realsyn/k8s/step_profiles.yaml" in text and "COPY k8s/step_profiles.yaml" in text
    gpu = (K8S / "Dockerfile.gpu").read_text()
    assert (
        "faiss-gpu" in gpu
        and "ARG TORCH_CUDA=cu12" in gpu
        and "download.pytorch.org/whl/${TORCH_CUDA}" in gpu
        and "uninstall -y faiss-cpu" in gpu
    )
    assert "download.pytorch.org/whl/cpu" in (K8S / "Dockerfile").read_text()


# --- vLLM -----------------------------------------------------------------------------------------
def _render_vllm(*args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(K8S / "vllm" / "render.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_vllm_manifests_render_valid_with_the_namespace_from_values(tmp_path):
    docs = _render_vllm()
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    for d in docs:
        _validate(d)
    defaults = yaml.safe_load((K8S / "vllm" / "values.yaml").read_text())
    assert {d["metadata"]["namespace"] for d in docs} == {defaults["namespace"]}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert f"--served-model-name={defaults['servedModelName']}" in container["args"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "REALSYN_VLLM_API_KEY"
    # the URL the code location calls is this Service in this namespace
    url = {e["name"]: e.get("value") for e in _values()["dagster-user-deployments"]["deployments"][0]["env"]}["REALSYN_VLLM_URL"]
    service = next(d for d in docs if d["kind"] == "Service")
    assert url == f"http://{service['metadata']['name']}.{defaults['namespace']}.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        defaults["autoscaling"]["minReplicas"],
        defaults["autoscaling"]["maxReplicas"],
    )
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == defaults["autoscaling"]["metric"]

    # another namespace and size from a values file: nothing else changes
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump({"namespace": "team-b", "replicas": 2, "autoscaling": {"enabled": False}}))
    docs = _render_vllm("-f", str(path), "--set", "image=vllm/vllm-openai:v0.7.0")
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "PodDisruptionBudget"]
    assert {d["metadata"]["namespace"] for d in docs} == {"team-b"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert (
        deployment["spec"]["replicas"] == 2
        and deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "vllm/vllm-openai:v0.7.0"
    )
    assert not any("realsyn" == d["metadata"]["namespace"] for d in docs)
    for d in docs:
        _validate(d)
