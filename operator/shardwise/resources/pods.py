"""One trainer pod per node: torchrun in front of the user's command, with the env contract.

The env names and file paths are the contract of docs/layout-contract.md; the trainer side
defines them in shardwise_trainer/contract.py and a test holds this builder against it.
"""

from __future__ import annotations

import copy
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Final

from shardwise.resources.names import (
    DS_CONFIG_FILE_KEY,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_NODE_RANK,
    LAYOUT_FILE_KEY,
    LAYOUT_MOUNT_PATH,
    RENDEZVOUS_PORT,
    TRAINER_CONTAINER,
    TRAINER_METRICS_PORT,
    configmap_name,
    pod_name,
    rendezvous_host,
    service_name,
)
from shardwise.resources.owner import child_metadata
from shardwise.storage_spec import StorageSpec, VolumeRef, storage_from_spec

DEFAULT_TRAINER_COMMAND: Final = ("python", "-m", "shardwise_trainer")
#: The kubelet's default terminationMessagePath; set explicitly so the trainer is told where it is.
TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")

# Variables torchrun or the operator set; a template that sets them would silently break the
# rendezvous, so the CRD rejects them and the builder refuses them too.
RESERVED_ENV: Final = frozenset(
    {
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "ROLE_NAME",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
        "TORCHELASTIC_MAX_RESTARTS",
        "TORCHELASTIC_USE_AGENT_STORE",
    }
)
RESERVED_ENV_PREFIX: Final = "SHARDWISE_"


class TemplateError(ValueError):
    """The job's pod template cannot be turned into trainer pods (a user mistake)."""


@dataclass(frozen=True)
class PodShape:
    """The part of the plan a pod needs: how many nodes and processes, and which attempt."""

    nodes: int
    gpus_per_node: int
    attempt: int
    gpu_resource: str = "nvidia.com/gpu"
    #: Nodes the pods must not run on (status.excludedNodes: stragglers the job replaced).
    excluded_nodes: tuple[str, ...] = ()
    #: The GPU product the plan assumed (status.layout.gpuProduct): required of every pod's node.
    gpu_product: str | None = None
    #: Host memory one node's ranks need per the plan (status.layout.hostMemoryBytes): requested.
    host_memory_bytes: int = 0
    #: Node label naming each node's NVLink domain (e.g. nvidia.com/gpu.clique), when nodes carry it.
    topology_key: str | None = None


def rendezvous_id(job: dict[str, Any], attempt: int) -> str:
    """Unique per attempt, so a restarted gang never joins the previous attempt's rendezvous."""
    return f"{job['metadata']['uid']}-{attempt}"


def trainer_container(template_spec: dict[str, Any]) -> dict[str, Any]:
    """The container named `trainer`, or the only container when there is just one."""
    containers: list[dict[str, Any]] = template_spec.get("containers") or []
    for container in containers:
        if container.get("name") == TRAINER_CONTAINER:
            return container
    if len(containers) == 1:
        return containers[0]
    raise TemplateError(
        f"spec.template.spec.containers must contain a container named {TRAINER_CONTAINER!r}"
        f" (found {[c.get('name') for c in containers]})"
    )


def torchrun_target(argv: list[str]) -> list[str]:
    """Turn the user's command into what follows torchrun's options.

    `python -m mod args` -> `--module mod args`; `python script.py args` -> `script.py args`;
    anything else -> `--no-python cmd args` (torchrun then execs the binary per rank).
    """
    if not argv:
        argv = list(DEFAULT_TRAINER_COMMAND)
    if posixpath.basename(argv[0]) in {"torchrun"} or argv[:3][-2:] == ["-m", "torch.distributed.run"]:
        raise TemplateError(
            "spec.template trainer command must not call torchrun: shardwise runs torchrun itself"
        )
    if _PYTHON.match(posixpath.basename(argv[0])):
        rest = argv[1:]
        if rest[:1] == ["-m"] and len(rest) >= 2:
            return ["--module", *rest[1:]]
        if rest and not rest[0].startswith("-"):
            return rest
        raise TemplateError(f"cannot run {argv!r} under torchrun: give `python -m MODULE` or a script")
    return ["--no-python", *argv]


def torchrun_command(job: dict[str, Any], shape: PodShape, node_rank: int, user_argv: list[str]) -> list[str]:
    """The full container command: torchrun with a c10d rendezvous on node 0, then the trainer."""
    name = job["metadata"]["name"]
    return [
        "torchrun",
        f"--nnodes={shape.nodes}",
        f"--nproc-per-node={shape.gpus_per_node}",
        f"--node-rank={node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rendezvous_host(name)}:{RENDEZVOUS_PORT}",
        f"--rdzv-id={rendezvous_id(job, shape.attempt)}",
        # Node 0 hosts the rendezvous store. Said explicitly rather than guessed from hostnames,
        # which fails wherever every address looks local (several pods on one machine).
        f"--rdzv-conf=is_host={'true' if node_rank == 0 else 'false'}",
        # Advertise the pod IP (the kubelet expands $(VAR) from the env below), not a hostname
        # that other pods may not resolve.
        "--local-addr=$(SHARDWISE_POD_IP)",
        # The operator restarts the whole gang as a new attempt; torchrun must not restart
        # workers in place behind its back.
        "--max-restarts=0",
        *torchrun_target(user_argv),
    ]


def contract_env(
    job: dict[str, Any], shape: PodShape, node_rank: int, termination_path: str = TERMINATION_MESSAGE_PATH
) -> list[dict[str, Any]]:
    """The SHARDWISE_* variables of the layout contract, set on the trainer container.

    spec.model.path / data / output / checkpoint fill their variables; unset ones keep the
    contract default, so every pod carries the same names.
    """
    meta = job["metadata"]
    storage = _storage(job)

    def field(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    env: list[dict[str, Any]] = [
        {"name": "SHARDWISE_LAYOUT_FILE", "value": f"{LAYOUT_MOUNT_PATH}/{LAYOUT_FILE_KEY}"},
        {"name": "SHARDWISE_DS_CONFIG_FILE", "value": f"{LAYOUT_MOUNT_PATH}/{DS_CONFIG_FILE_KEY}"},
        {"name": "SHARDWISE_JOB_NAME", "value": meta["name"]},
        {"name": "SHARDWISE_NAMESPACE", "value": meta["namespace"]},
        {"name": "SHARDWISE_POD_NAME", "valueFrom": field("metadata.name")},
        {"name": "SHARDWISE_NODE_NAME", "valueFrom": field("spec.nodeName")},
        {"name": "SHARDWISE_POD_IP", "valueFrom": field("status.podIP")},
        {"name": "SHARDWISE_NODE_RANK", "value": str(node_rank)},
        {"name": "SHARDWISE_ATTEMPT", "value": str(shape.attempt)},
        {"name": "SHARDWISE_METRICS_PORT", "value": str(TRAINER_METRICS_PORT)},
        {"name": "SHARDWISE_TERMINATION_LOG", "value": termination_path},
        *({"name": name, "value": value} for name, value in storage.env().items()),
    ]
    return env


def _storage(job: dict[str, Any]) -> StorageSpec:
    try:
        return storage_from_spec(job["spec"])
    except ValueError as exc:  # admission (CEL, jobspec) refuses these first; a clear error anyway
        raise TemplateError(str(exc)) from None


def _claim_volume_name(ref: VolumeRef, storage: StorageSpec) -> str:
    # One pod volume per claim: the first role naming it gives the volume its name.
    first = next(v for v in storage.volumes() if v.claim_name == ref.claim_name)
    return f"shardwise-{first.role}"


def _storage_mounts(job: dict[str, Any], pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    """Mount the volumes of spec.model / data / output / checkpoint at /shardwise/<role>."""
    storage = _storage(job)
    volumes = pod_spec.setdefault("volumes", [])
    existing = {v.get("name") for v in volumes}
    taken = {m.get("mountPath") for m in container.get("volumeMounts") or []}
    for ref in storage.volumes():
        if ref.mount_path in taken:
            raise TemplateError(
                f"spec.template mounts {ref.mount_path}, where shardwise mounts spec.{ref.role}.volume"
            )
        if ref.claim_name is not None:
            name = _claim_volume_name(ref, storage)
            if name not in existing:
                volumes.append({"name": name, "persistentVolumeClaim": {"claimName": ref.claim_name}})
                existing.add(name)
        else:
            name = str(ref.template_name)
            if name not in existing:
                raise TemplateError(
                    f"spec.{ref.role}.volume.name {name} is not a volume of spec.template.spec.volumes"
                )
        mount: dict[str, Any] = {"name": name, "mountPath": ref.mount_path, "readOnly": ref.read_only}
        if ref.sub_path:
            mount["subPath"] = ref.sub_path
        container.setdefault("volumeMounts", []).append(mount)


def _check_user_env(container: dict[str, Any]) -> None:
    for item in container.get("env") or []:
        var = str(item.get("name", ""))
        if var in RESERVED_ENV or var.startswith(RESERVED_ENV_PREFIX):
            raise TemplateError(
                f"spec.template env {var!r} is reserved: torchrun or shardwise sets it for every rank"
            )


_RESTRICTED_CONTAINER: Final[dict[str, Any]] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def build_pod(job: dict[str, Any], shape: PodShape, node_rank: int) -> dict[str, Any]:
    """The pod `<job>-node-<i>`: the user's template with torchrun, env, GPUs, shm and placement."""
    if not 0 <= node_rank < shape.nodes:
        raise ValueError(f"node rank {node_rank} outside 0..{shape.nodes - 1}")
    name = job["metadata"]["name"]
    spec = job["spec"]
    resources_spec: dict[str, Any] = spec.get("resources") or {}
    template: dict[str, Any] = copy.deepcopy(spec.get("template") or {})
    pod_spec: dict[str, Any] = template.get("spec") or {}
    pod_spec.setdefault("containers", [{"name": TRAINER_CONTAINER}])
    container = trainer_container(pod_spec)
    _check_user_env(container)

    user_argv = [*(container.get("command") or []), *(container.get("args") or [])]
    container["command"] = torchrun_command(job, shape, node_rank, user_argv)
    container.pop("args", None)
    # The trainer writes its exit code and failure reason there (lifecycle.trainer_reason).
    termination_path = str(container.setdefault("terminationMessagePath", TERMINATION_MESSAGE_PATH))
    container["env"] = [
        *(container.get("env") or []),
        *contract_env(job, shape, node_rank, termination_path),
    ]

    res = container.setdefault("resources", {})
    gpus = str(shape.gpus_per_node)
    # Extended resources must have requests == limits; GPUs cannot be overcommitted.
    res.setdefault("limits", {})[shape.gpu_resource] = gpus
    res.setdefault("requests", {})[shape.gpu_resource] = gpus
    if shape.host_memory_bytes > 0 and "memory" not in res["requests"]:
        # Offloaded optimizer states / parameters live in host memory: without a request the pod
        # is BestEffort and lands on a node that cannot hold them (the template's own request wins).
        res["requests"]["memory"] = str(shape.host_memory_bytes)
    if "cpu" not in res["requests"]:
        # torchrun runs one worker process per GPU, each busy on a core: without a request the
        # scheduler may pack the gang onto nodes whose CPUs are taken (the template's own wins).
        res["requests"]["cpu"] = gpus

    ports = container.setdefault("ports", [])
    known = {p.get("containerPort") for p in ports}
    if TRAINER_METRICS_PORT not in known:
        ports.append({"name": "metrics", "containerPort": TRAINER_METRICS_PORT})
    if node_rank == 0 and RENDEZVOUS_PORT not in known:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT})

    _storage_mounts(job, pod_spec, container)
    mounts = container.setdefault("volumeMounts", [])
    mounts.append({"name": "shardwise-layout", "mountPath": LAYOUT_MOUNT_PATH, "readOnly": True})
    # NCCL and DataLoader workers use /dev/shm; the container runtime's 64 MiB default breaks them.
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    volumes = pod_spec.setdefault("volumes", [])
    volumes.append({"name": "shardwise-layout", "configMap": {"name": configmap_name(name)}})
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})

    if "securityContext" not in container:
        container["securityContext"] = copy.deepcopy(_RESTRICTED_CONTAINER)

    pod_spec["hostname"] = pod_name(name, node_rank)
    pod_spec["subdomain"] = service_name(name)
    pod_spec["restartPolicy"] = "Never"
    pod_spec.setdefault("enableServiceLinks", False)

    node_selector = dict(pod_spec.get("nodeSelector") or {})
    node_selector.update(resources_spec.get("nodeSelector") or {})
    if resources_spec.get("gpuProduct"):
        node_selector["nvidia.com/gpu.product"] = resources_spec["gpuProduct"]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = [*(pod_spec.get("tolerations") or []), *(resources_spec.get("tolerations") or [])]
    if tolerations:
        pod_spec["tolerations"] = tolerations

    # Two pods of one job on one node would fight over its GPUs and break node-rank accounting.
    affinity = pod_spec.setdefault("affinity", {})
    anti = affinity.setdefault("podAntiAffinity", {})
    anti.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(
        {
            "labelSelector": {"matchLabels": {LABEL_JOB: name}},
            "topologyKey": "kubernetes.io/hostname",
        }
    )

    if shape.topology_key:
        # Traffic between nodes is cheapest inside one NVLink domain (a multi-node NVLink rack):
        # the gang packs into one domain when the scheduler can, and spreads over several only
        # when it must. Tensor parallelism never leaves a node in any plan.
        affinity.setdefault("podAffinity", {}).setdefault(
            "preferredDuringSchedulingIgnoredDuringExecution", []
        ).append(
            {
                "weight": 100,
                "podAffinityTerm": {
                    "labelSelector": {"matchLabels": {LABEL_JOB: name}},
                    "topologyKey": shape.topology_key,
                },
            }
        )
    if shape.excluded_nodes:
        _avoid_nodes(affinity, shape.excluded_nodes)
    if shape.gpu_product and "nvidia.com/gpu.product" not in node_selector:
        # In a mixed cluster a plan for 80 GB cards must not land on 40 GB ones.
        _require_on_every_term(
            affinity, {"key": "nvidia.com/gpu.product", "operator": "In", "values": [shape.gpu_product]}
        )

    template_meta: dict[str, Any] = template.get("metadata") or {}
    meta = child_metadata(
        job,
        pod_name(name, node_rank),
        "trainer",
        {LABEL_NODE_RANK: str(node_rank), LABEL_ATTEMPT: str(shape.attempt)},
    )
    meta["labels"] = {**(template_meta.get("labels") or {}), **meta["labels"]}
    if template_meta.get("annotations"):
        meta["annotations"] = dict(template_meta["annotations"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def _terms(affinity: dict[str, Any]) -> list[dict[str, Any]]:
    """The required node-selector terms (ORed), one empty term when the template has none."""
    required = affinity.setdefault("nodeAffinity", {}).setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", {}
    )
    terms: list[dict[str, Any]] = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    return terms


def _avoid_nodes(affinity: dict[str, Any], names: tuple[str, ...]) -> None:
    """Keep the pod off ``names``: node-selector terms are ORed, so every term of the template's own
    required node affinity gets the exclusion (one term with only it when there is none)."""
    # A node field selector takes exactly one value per requirement (the API server refuses more):
    # one NotIn per node, ANDed inside the term.
    for term in _terms(affinity):
        term.setdefault("matchFields", []).extend(
            {"key": "metadata.name", "operator": "NotIn", "values": [name]} for name in sorted(names)
        )


def _require_on_every_term(affinity: dict[str, Any], expression: dict[str, Any]) -> None:
    """AND a label requirement into every required node-selector term."""
    for term in _terms(affinity):
        term.setdefault("matchExpressions", []).append(copy.deepcopy(expression))


def build_pods(job: dict[str, Any], shape: PodShape) -> list[dict[str, Any]]:
    """All pods of one attempt, node rank 0 first."""
    return [build_pod(job, shape, rank) for rank in range(shape.nodes)]
