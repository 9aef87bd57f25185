"""Where and when steps run: Kubernetes pod profiles, concurrency pools and automation, written once.

``dagster-k8s/config`` tags only take effect under ``k8s_job_executor`` (production); locally they
are inert. ``pool="gpu"`` (from a GPU profile) caps GPU steps across runs: concurrency.pools in k8s/values.yaml.
"""

import os
import warnings
from collections.abc import Sequence

import dagster as dg

from assets.partitions import shard_partitions
from assets.profiles import step_options
from realsyn import layout, progress
from realsyn.runtime import env_number

GPU_POOL = "gpu"


def _step_log():
    """The running step's ``context.log.info`` (None outside a step): where the core's loops report progress."""
    try:
        return dg.OpExecutionContext.get().log.info
    except dg.DagsterInvariantViolationError:
        return None


progress.use_sink_resolver(_step_log)

# Each step's pod (image, resources, node pool, model mount, retries) comes from one table of
# profiles, k8s/step_profiles.yaml (assets/profiles.py); a step only names its profile.

# Backfills of per-shard assets run N shards per run (REALSYN_SHARDS_PER_RUN, default 8): a pod loads
# its model once for N shards, a bad shard fails only its run, and the UI shows each run's shards.
# Every per-shard asset carries the same policy: Dagster runs a parent and a child in one run only
# when their policies match, and a job whose assets differ warns at every load.
SHARDS_PER_RUN_ENV = "REALSYN_SHARDS_PER_RUN"


def shards_per_run() -> int:
    return int(env_number(SHARDS_PER_RUN_ENV, 8, integer=True, minimum=1))


# backfill_policy is beta in Dagster; the warning would repeat for every per-shard asset at each load
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)
SHARD_BACKFILL = dg.BackfillPolicy.multi_run(shards_per_run())

# The nightly rebuild of the global steps and of the per-shard steps below them. A step is requested
# once per cron tick (REALSYN_REBUILD_CRON) when it is stale: an input was updated (or its code
# version changed) since the step last ran or was requested; a global step that was never built is
# stale too. It waits while any partition of any input is missing (registered but not prepared;
# unless requested in the same tick) or in progress, and while a blocking check of an input failed,
# across runs. Not eager: a re-enabled automation sensor must never flood the GPU pool.
REBUILD_CRON = os.environ.get("REALSYN_REBUILD_CRON", "0 2 * * *")
_AC = dg.AutomationCondition
_TICK = _AC.cron_tick_passed(REBUILD_CRON).since_last_handled().with_label(f"a {REBUILD_CRON} tick passed since last handled")
_INPUTS_CHANGED = (
    (_AC.any_deps_updated() | _AC.code_version_changed()).since_last_handled().with_label("inputs or code changed since last handled")
)
_INPUTS_NOT_READY = _AC.any_deps_match((_AC.missing() & ~_AC.will_be_requested()) | _AC.in_progress()).with_label(
    "any input partition missing or in progress"
)
_GATES = ~_INPUTS_NOT_READY & _AC.all_deps_blocking_checks_passed() & ~_AC.in_progress()
# per shard: refreshed when a global input changed; a new shard's partition follows its global inputs
NIGHTLY_REBUILD = (_TICK & _INPUTS_CHANGED & _GATES).with_label(f"nightly_rebuild({REBUILD_CRON})")
# global: also built when missing (a first deployment, or a graph stopped before it)
NIGHTLY_GLOBAL_REBUILD = (_TICK & (_INPUTS_CHANGED | _AC.missing()) & _GATES).with_label(f"nightly_global_rebuild({REBUILD_CRON})")


def shard_asset(key: str, *, deps: Sequence, description: str, profile: str = "cpu-small", rebuild_nightly: bool = False):
    """A per-shard asset: partitioned by input shard, grouped by its stage, run with a step profile.

    ``profile="gpu"`` also puts it in the GPU pool; every one shares ``SHARD_BACKFILL``; ``rebuild_nightly``
    puts it under the nightly rebuild (the steps downstream of the global ones).
    """
    kwargs = {"partitions_def": shard_partitions, "backfill_policy": SHARD_BACKFILL, **step_options(key, profile)}
    if rebuild_nightly:
        kwargs["automation_condition"] = NIGHTLY_REBUILD
    return dg.asset(name=key, deps=list(deps), description=description, group_name=layout.STAGE_OF[key], **kwargs)


def global_asset(key: str, *, deps: Sequence, description: str, profile: str = "cpu-bigmem"):
    """A global asset: one run over every registered shard, on a big-memory pod, rebuilt nightly."""
    return dg.asset(
        name=key,
        deps=list(deps),
        description=description,
        group_name=layout.STAGE_OF[key],
        **step_options(key, profile),
        automation_condition=NIGHTLY_GLOBAL_REBUILD,
    )
