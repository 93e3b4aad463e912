"""Fixed names, labels and annotations of a ParallelTrainingJob's children."""

from __future__ import annotations

from typing import Final

GROUP: Final = "shardwise.dev"
VERSION: Final = "v1alpha1"
KIND: Final = "ParallelTrainingJob"
PLURAL: Final = "paralleltrainingjobs"
API_VERSION: Final = f"{GROUP}/{VERSION}"

LABEL_JOB: Final = f"{GROUP}/job-name"
LABEL_NODE_RANK: Final = f"{GROUP}/node-rank"
LABEL_ATTEMPT: Final = f"{GROUP}/attempt"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "shardwise"

TRAINER_CONTAINER: Final = "trainer"
LAYOUT_MOUNT_PATH: Final = "/etc/shardwise"
LAYOUT_FILE_KEY: Final = "layout.json"
DS_CONFIG_FILE_KEY: Final = "ds_config.json"

RENDEZVOUS_PORT: Final = 29400
TRAINER_METRICS_PORT: Final = 9400

# A pod name is `<job>-node-<i>`; with up to 4 digits of node rank the job name must leave room
# for the suffix inside a 63-character DNS label (pod hostnames are DNS labels).
MAX_JOB_NAME_LENGTH: Final = 63 - len("-node-") - 4


def service_name(job: str) -> str:
    """The headless Service that gives every pod a stable DNS name for the rendezvous."""
    return job


def configmap_name(job: str) -> str:
    """The ConfigMap holding layout.json and ds_config.json."""
    return f"{job}-layout"


def pod_name(job: str, node_rank: int) -> str:
    """The pod running torchrun for one node of the job."""
    return f"{job}-node-{node_rank}"


def rendezvous_host(job: str) -> str:
    """DNS name of node 0 through the headless Service (hostname.subdomain)."""
    return f"{pod_name(job, 0)}.{service_name(job)}"


def job_labels(job: str) -> dict[str, str]:
    """Labels every child carries; the Service selects pods with them."""
    return {LABEL_JOB: job, LABEL_MANAGED_BY: MANAGED_BY}
