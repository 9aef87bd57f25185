"""Where and when steps run: Kubernetes pod profiles, concurrency pools and automation, written once.

``dagster-k8s/config`` tags only take effect under ``k8s_job_executor`` (production); locally they
are inert. ``pool="gpu"`` caps GPU steps across runs (set the pool limit on the instance).
"""

import os

import dagster as dg

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
