"""Where and when steps run: Kubernetes pod profiles, concurrency pools and automation, written once.

``dagster-k8s/config`` tags only take effect under ``k8s_job_executor`` (production); locally they
are inert. ``pool="gpu"`` caps GPU steps across runs (set the pool limit on the instance).
"""

import os
from collections.abc import Sequence

import dagster as dg

from assets.partitions import shard_partitions
from realsyn import layout

GPU_POOL = "gpu"

GPU_STEP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {
                "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
                "limits": {"memory": "96Gi", "nvidia.com/gpu": "1"},
            }
        },
        "pod_spec_config": {
            "node_selector": {"realsyn.io/node-pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
}

CPU_STEP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {"resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}}},
    }
}

# a global step holds an index or centroids: a big-memory node
GLOBAL_STEP_TAGS = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {
                "requests": {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "1"},
                "limits": {"memory": "240Gi", "nvidia.com/gpu": "1"},
            }
        },
        "pod_spec_config": {
            "node_selector": {"realsyn.io/node-pool": "gpu-highmem"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
}

# One pod loads a model once for many shards during a backfill.
GPU_BACKFILL = dg.BackfillPolicy.single_run()

# After new shards were prepared, the global steps and the per-shard captioning rebuild once a
# night: on_cron waits for the cron tick, then for every dependency to be updated since it. Not
# eager: a re-enabled automation sensor must never flood the GPU pool.
REBUILD_CRON = os.environ.get("REALSYN_REBUILD_CRON", "0 2 * * *")
NIGHTLY_REBUILD = dg.AutomationCondition.on_cron(REBUILD_CRON)


STEP_TAGS = {"cpu": CPU_STEP_TAGS, "gpu": GPU_STEP_TAGS, "global": GLOBAL_STEP_TAGS}


def shard_asset(key: str, *, deps: Sequence, description: str, profile: str = "cpu", rebuild_nightly: bool = False):
    """A per-shard asset: partitioned by input shard, grouped by its stage, run with a step profile.

    ``profile="gpu"`` also puts it in the GPU pool with the GPU backfill policy; ``rebuild_nightly``
    puts it under the nightly rebuild (the steps downstream of the global ones).
    """
    kwargs = {"partitions_def": shard_partitions, "op_tags": STEP_TAGS[profile]}
    if profile == "gpu":
        kwargs.update(pool=GPU_POOL, backfill_policy=GPU_BACKFILL)
    if rebuild_nightly:
        kwargs["automation_condition"] = NIGHTLY_REBUILD
    return dg.asset(name=key, deps=list(deps), description=description, group_name=layout.STAGE_OF[key], **kwargs)


def global_asset(key: str, *, deps: Sequence, description: str):
    """A global asset: one run over every registered shard, on a big-memory pod, rebuilt nightly."""
    return dg.asset(
        name=key,
        deps=list(deps),
        description=description,
        group_name=layout.STAGE_OF[key],
        op_tags=GLOBAL_STEP_TAGS,
        automation_condition=NIGHTLY_REBUILD,
    )
