"""Pure GPU inventory: which nodes can host a job, how many GPUs are free, and the job's node shape.

Input is plain Node and Pod dicts (as the API server returns them); nothing here does I/O.
GPU product and memory come from NVIDIA GPU Feature Discovery labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

LABEL_GPU_PRODUCT: Final = "nvidia.com/gpu.product"
LABEL_GPU_MEMORY_MIB: Final = "nvidia.com/gpu.memory"
LABEL_GPU_COUNT: Final = "nvidia.com/gpu.count"
MIB: Final = 1 << 20
_QUANTITY_SUFFIX: Final = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
}


def parse_quantity(value: str) -> int:
    """A Kubernetes resource quantity (`1056Mi`, `64G`, `1000`) in whole units."""
    text = value.strip()
    for suffix in sorted(_QUANTITY_SUFFIX, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * _QUANTITY_SUFFIX[suffix])
    return int(float(text))


@dataclass(frozen=True)
class NodeGpus:
    """One eligible node's GPUs."""

    name: str
    allocatable: int
    free: int
    product: str
    gpu_memory_bytes: int | None
    host_memory_bytes: int | None


@dataclass(frozen=True)
class Shape:
    """The node shape a job will run on, and the GPU it gets."""

    nodes: int
    gpus_per_node: int
    product: str
    gpu_memory_bytes: int | None
    host_memory_bytes: int | None
    node_names: tuple[str, ...] = field(default=())

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Claim:
    """GPUs held that no bound pod shows yet: a planned job's pods not created or not bound, or a
    created-but-unbound pod of another workload. `pods` pods of `gpus_per_node` GPUs each, one per
    node, on nodes in `nodes` (None: any node) but not in `avoid` (where the holder already runs)."""

    pods: int
    gpus_per_node: int
    nodes: frozenset[str] | None = None
    avoid: frozenset[str] = frozenset()


def reserve(free: dict[str, int], claims: Iterable[Claim]) -> dict[str, int]:
    """Free GPUs per node after setting the claims aside, each pod where the scheduler could put
    it (the roomiest allowed node first). A pod that fits nowhere whole still takes what is left
    on the roomiest allowed nodes: over-counting a claim only delays a job, under-counting it
    double-books GPUs."""
    left = dict(free)
    for claim in sorted(claims, key=lambda c: (-c.gpus_per_node, -c.pods)):
        allowed = [n for n in left if (claim.nodes is None or n in claim.nodes) and n not in claim.avoid]
        used: set[str] = set()
        for _ in range(claim.pods):
            spots = sorted((n for n in allowed if n not in used), key=lambda n: (-left[n], n))
            if not spots:
                break
            fit = next((n for n in spots if left[n] >= claim.gpus_per_node), None)
            if fit is not None:
                left[fit] -= claim.gpus_per_node
                used.add(fit)
                continue
            need = claim.gpus_per_node
            for n in spots:
                take = min(need, left[n])
                left[n] -= take
                need -= take
                if not need:
                    break
            used.add(spots[0])
    return left


def unbound_pod_claims(
    pods: Iterable[Mapping[str, Any]],
    nodes: Iterable[Mapping[str, Any]],
    *,
    gpu_resource: str,
    skip_label: str,
) -> list[Claim]:
    """Claims of live, not yet bound pods that request GPUs, except those labelled skip_label
    (shardwise's own pods, which their job's plan claims already). A pod with a nodeSelector
    claims only among the nodes it selects: one that can never be placed holds no GPUs."""
    labels_of = {
        str((n.get("metadata") or {}).get("name")): (n.get("metadata") or {}).get("labels") or {}
        for n in nodes
    }
    claims: list[Claim] = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        if spec.get("nodeName") or (pod.get("status") or {}).get("phase") in {"Succeeded", "Failed"}:
            continue
        if skip_label in (meta.get("labels") or {}):
            continue
        gpus = pod_gpu_request(pod, gpu_resource)
        if gpus <= 0:
            continue
        selector = spec.get("nodeSelector") or {}
        allowed = (
            frozenset(
                n for n, labels in labels_of.items() if all(labels.get(k) == v for k, v in selector.items())
            )
            if selector
            else None
        )
        claims.append(Claim(pods=1, gpus_per_node=gpus, nodes=allowed))
    return claims


class InventoryError(Exception):
    """The cluster cannot host the job's GPU request now; reason is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def pod_gpu_request(pod: Mapping[str, Any], resource: str) -> int:
    """GPUs a pod holds: the sum over containers, or the largest init container if larger."""
    spec = pod.get("spec") or {}

    def amount(container: Mapping[str, Any]) -> int:
        res = container.get("resources") or {}
        value = (res.get("limits") or {}).get(resource) or (res.get("requests") or {}).get(resource)
        return parse_quantity(str(value)) if value is not None else 0

    main = sum(amount(c) for c in spec.get("containers") or [])
    init = max((amount(c) for c in spec.get("initContainers") or []), default=0)
    return max(main, init)


_STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage", "pods")


def holds_devices(pod: Mapping[str, Any]) -> bool:
    """The pod asks for an extended resource (a GPU of any vendor, say), not only CPU and memory."""
    spec = pod.get("spec") or {}
    for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        res = container.get("resources") or {}
        for name in [*(res.get("limits") or {}), *(res.get("requests") or {})]:
            if name not in _STANDARD_RESOURCES and not name.startswith("hugepages-"):
                return True
    return False


def _ready(node: Mapping[str, Any]) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def _tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol.get("effect") != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists":
            if not tol.get("key") or tol.get("key") == taint.get("key"):
                return True
        elif tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def _eligible(
    node: Mapping[str, Any], selector: Mapping[str, str], tolerations: list[Mapping[str, Any]]
) -> bool:
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in {"NoSchedule", "NoExecute"} and not _tolerates(tolerations, taint):
            return False
    return _ready(node)


def gpu_nodes(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    *,
    gpu_resource: str,
    node_selector: Mapping[str, str],
    tolerations: list[Mapping[str, Any]],
    exclude_job: str | None = None,
    exclude_namespace: str | None = None,
    claims: Iterable[Claim] = (),
) -> list[NodeGpus]:
    """Eligible nodes with their free GPUs: allocatable minus non-terminal bound pods of other
    workloads, minus the claims (see `reserve`), which are placed over every GPU node first so
    that a claim lands where its holder could run, not only among this job's nodes."""
    used: dict[str, int] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        if (pod.get("status") or {}).get("phase") in {"Succeeded", "Failed"}:
            continue
        if (
            exclude_job is not None
            and (meta.get("labels") or {}).get("shardwise.dev/job-name") == exclude_job
            and meta.get("namespace") == exclude_namespace
        ):
            continue
        node_name = (pod.get("spec") or {}).get("nodeName")
        if node_name:
            used[node_name] = used.get(node_name, 0) + pod_gpu_request(pod, gpu_resource)

    offering: list[tuple[str, Mapping[str, Any], int]] = []
    for node in nodes:
        allocatable_raw = ((node.get("status") or {}).get("allocatable") or {}).get(gpu_resource)
        allocatable = parse_quantity(str(allocatable_raw)) if allocatable_raw else 0
        if allocatable > 0 and _ready(node):
            offering.append((str((node.get("metadata") or {}).get("name")), node, allocatable))
    free = reserve({name: max(0, a - used.get(name, 0)) for name, _, a in offering}, claims)

    result: list[NodeGpus] = []
    for name, node, allocatable in offering:
        if not _eligible(node, node_selector, tolerations):
            continue
        meta = node.get("metadata") or {}
        labels = meta.get("labels") or {}
        mem_label = labels.get(LABEL_GPU_MEMORY_MIB)
        host_raw = ((node.get("status") or {}).get("allocatable") or {}).get("memory")
        result.append(
            NodeGpus(
                name=name,
                allocatable=allocatable,
                free=free[name],
                product=str(labels.get(LABEL_GPU_PRODUCT, "unknown")),
                gpu_memory_bytes=int(mem_label) * MIB if mem_label and str(mem_label).isdigit() else None,
                host_memory_bytes=parse_quantity(str(host_raw)) if host_raw else None,
            )
        )
    return sorted(result, key=lambda n: (-n.free, n.name))


def _describe(nodes: list[NodeGpus]) -> str:
    if not nodes:
        return "none"
    shown = ", ".join(f"{n.name} {n.free}/{n.allocatable}" for n in nodes[:8])
    return shown + (f" and {len(nodes) - 8} more" if len(nodes) > 8 else "")


def describe_request(gpus: int | None, node_count: int | None, gpus_per_node: int | None) -> str:
    """What a job asks for, as its messages say it: `2 nodes × 8 GPUs`, `16 GPUs`, `2 nodes`."""
    if node_count and gpus_per_node:
        return f"{node_count} nodes × {gpus_per_node} GPUs"
    return f"{gpus} GPUs" if gpus else f"{node_count} nodes"


def choose_shape(
    nodes: list[NodeGpus],
    *,
    gpus: int | None,
    node_count: int | None,
    gpus_per_node: int | None,
    gpu_resource: str = "nvidia.com/gpu",
) -> Shape:
    """Pick nodes × GPUs-per-node for the request from the free inventory.

    With only a total, the fewest nodes win (the largest per-node share that divides the total):
    tensor parallelism must stay inside a node and inter-node links are the slow ones.
    Nodes are grouped by GPU product and memory so one job never mixes GPU kinds.
    """
    if not nodes:
        raise InventoryError(
            "NoGpuNodes",
            f"no Ready, schedulable node offers {gpu_resource} and matches the job's nodeSelector"
            " and tolerations",
        )
    groups: dict[tuple[str, int | None], list[NodeGpus]] = {}
    for node in nodes:
        groups.setdefault((node.product, node.gpu_memory_bytes), []).append(node)
    # Largest GPU memory first: among equally possible shapes the roomier GPU plans better.
    ordered = sorted(groups.items(), key=lambda kv: (-(kv[0][1] or 0), kv[0][0]))

    for (product, memory), members in ordered:
        frees = sorted((n.free for n in members), reverse=True)
        candidates: list[tuple[int, int]] = []
        if gpus_per_node is not None:
            count = node_count if node_count is not None else (gpus or 0) // gpus_per_node
            candidates = [(count, gpus_per_node)]
        elif node_count is not None:
            per = (gpus // node_count) if gpus else (frees[node_count - 1] if len(frees) >= node_count else 0)
            candidates = [(node_count, per)] if per > 0 else []
        elif gpus is not None:
            candidates = [(gpus // g, g) for g in range(min(gpus, frees[0]), 0, -1) if gpus % g == 0]
        for count, per in candidates:
            fitting = [n for n in members if n.free >= per]
            if count > 0 and len(fitting) >= count:
                chosen = fitting[:count]
                host = [n.host_memory_bytes for n in chosen if n.host_memory_bytes is not None]
                return Shape(
                    nodes=count,
                    gpus_per_node=per,
                    product=product,
                    gpu_memory_bytes=memory,
                    host_memory_bytes=min(host) if host else None,
                    node_names=tuple(n.name for n in chosen),
                )

    want = describe_request(gpus, node_count, gpus_per_node)
    total_free = sum(n.free for n in nodes)
    raise InventoryError(
        "InsufficientGpus",
        f"the job needs {want} but the matching nodes have {total_free} free {gpu_resource}"
        f" (free/allocatable per node: {_describe(nodes)})",
    )
