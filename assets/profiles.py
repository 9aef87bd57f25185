"""Step pod profiles: one table (k8s/step_profiles.yaml) gives every step its image, resources,
node pool, retry policy and model mount; an asset only names its profile.

The table is read when the code location loads, from ``REALSYN_STEP_PROFILES`` (a deployment's own
copy, e.g. a ConfigMap) or the file shipped in ``k8s/``; ``REALSYN_IMAGE_<NAME>`` overrides one image
(the release tag). The result is the ``dagster-k8s/config`` op tag that ``k8s_job_executor`` turns
into the step's Job, plus the concurrency pool and the RetryPolicy. Retries apply only when
``REALSYN_ENV=production``: they guard preemptible nodes and S3 throttling; locally a failure shows
at once.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROFILES_ENV = "REALSYN_STEP_PROFILES"
IMAGE_ENV_PREFIX = "REALSYN_IMAGE_"
DEFAULT_PROFILES_FILE = Path(__file__).resolve().parents[1] / "k8s" / "step_profiles.yaml"
PROFILE_TAG = "realsyn/profile"
K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
DEVICE_ENV = "REALSYN_DEVICE"

_BACKOFF = {"linear": dg.Backoff.LINEAR, "exponential": dg.Backoff.EXPONENTIAL}
_JITTER = {"full": dg.Jitter.FULL, "plus_minus": dg.Jitter.PLUS_MINUS}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RetrySpec(_Strict):
    max_retries: int = Field(ge=1)
    delay_s: float = Field(ge=0)
    backoff: Literal["linear", "exponential"] = "exponential"
    jitter: Literal["full", "plus_minus"] | None = "plus_minus"

    def policy(self) -> dg.RetryPolicy:
        return dg.RetryPolicy(
            max_retries=self.max_retries,
            delay=self.delay_s,
            backoff=_BACKOFF[self.backoff],
            jitter=_JITTER[self.jitter] if self.jitter else None,
        )


class ModelVolume(_Strict):
    mount_path: str = Field(alias="mountPath")
    volume: dict[str, Any]

    @model_validator(mode="after")
    def _named(self) -> ModelVolume:
        if not self.volume.get("name"):
            raise ValueError("models.volume needs a name")
        return self


class Resources(_Strict):
    requests: dict[str, str]
    limits: dict[str, str]

    @model_validator(mode="after")
    def _bounded(self) -> Resources:
        # every container is bounded: the scheduler packs by requests, the kernel kills past limits
        for key in ("cpu", "memory"):
            if key not in self.requests or key not in self.limits:
                raise ValueError(f"resources need requests and limits for cpu and memory, got {self.requests} / {self.limits}")
        return self


class Profile(_Strict):
    image: str = Field(description="A key of images.")
    resources: Resources
    gpus: int = Field(default=0, ge=0)
    pool: str | None = None
    models: bool = False
    device: Literal["cpu", "cuda"] | None = None
    retry: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class ProfileTable(_Strict):
    images: dict[str, str]
    models: ModelVolume
    retry_policies: dict[str, RetrySpec] = Field(default_factory=dict)
    profiles: dict[str, Profile]
    step_profiles: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references_resolve(self) -> ProfileTable:
        for name, p in self.profiles.items():
            if p.image not in self.images:
                raise ValueError(f"profile {name!r}: image {p.image!r} is not one of images {sorted(self.images)}")
            if p.retry is not None and p.retry not in self.retry_policies:
                raise ValueError(f"profile {name!r}: retry {p.retry!r} is not one of retry_policies {sorted(self.retry_policies)}")
        for step, name in self.step_profiles.items():
            if name not in self.profiles:
                raise ValueError(f"step_profiles[{step!r}] = {name!r} is not one of profiles {sorted(self.profiles)}")
        return self

    def profile_of(self, step: str, default: str) -> str:
        """The step's profile: the deployment's choice (step_profiles) over the one named in the code."""
        name = self.step_profiles.get(step, default)
        if name not in self.profiles:
            raise KeyError(f"step {step!r}: profile {name!r} is not one of {sorted(self.profiles)} (from {PROFILES_ENV} or k8s/)")
        return name

    def k8s_config(self, name: str) -> dict[str, Any]:
        """The ``dagster-k8s/config`` of a profile: container image, resources, env and mounts; pod node pool and volumes."""
        p = self.profiles[name]
        requests, limits = dict(p.resources.requests), dict(p.resources.limits)
        if p.gpus:
            requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(p.gpus)
        container: dict[str, Any] = {"image": self.images[p.image], "resources": {"requests": requests, "limits": limits}}
        pod: dict[str, Any] = {}
        if p.device:
            container["env"] = [{"name": DEVICE_ENV, "value": p.device}]
        if p.models:
            container["volume_mounts"] = [{"name": self.models.volume["name"], "mountPath": self.models.mount_path, "readOnly": True}]
            pod["volumes"] = [self.models.volume]
        if p.node_selector:
            pod["node_selector"] = dict(p.node_selector)
        if p.tolerations:
            pod["tolerations"] = [dict(t) for t in p.tolerations]
        config: dict[str, Any] = {"container_config": container}
        if pod:
            config["pod_spec_config"] = pod
        return config

    def step_options(self, step: str, default: str, *, env: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``dg.asset``/``dg.multi_asset``: op_tags, and pool / retry_policy where the profile sets them."""
        name = self.profile_of(step, default)
        p = self.profiles[name]
        options: dict[str, Any] = {"op_tags": {K8S_CONFIG_TAG: self.k8s_config(name), PROFILE_TAG: name}}
        if p.pool:
            options["pool"] = p.pool
        if p.retry and (env or os.environ.get("REALSYN_ENV", "local")) == "production":
            options["retry_policy"] = self.retry_policies[p.retry].policy()
        return options


def load_profile_table(path: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> ProfileTable:
    """The table from ``path``, else ``$REALSYN_STEP_PROFILES``, else k8s/step_profiles.yaml; REALSYN_IMAGE_<NAME> overrides images."""
    environ = os.environ if environ is None else environ
    source = Path(path or environ.get(PROFILES_ENV) or DEFAULT_PROFILES_FILE)
    if not source.is_file():
        raise FileNotFoundError(f"step profiles not found at {source} (set {PROFILES_ENV} to the deployment's step_profiles.yaml)")
    try:
        table = ProfileTable.model_validate(yaml.safe_load(source.read_text()))
    except ValueError as exc:
        raise ValueError(f"invalid step profiles {source}: {exc}") from exc
    for key in table.images:
        override = environ.get(IMAGE_ENV_PREFIX + key.upper())
        if override:
            table.images[key] = override
    return table


@functools.cache
def profile_table() -> ProfileTable:
    """The table of this process, read once."""
    return load_profile_table()


def step_options(step: str, profile: str) -> dict[str, Any]:
    """``dg.asset`` keyword arguments for step ``step`` (its op name) running with ``profile`` unless the deployment chose another."""
    return profile_table().step_options(step, profile)
