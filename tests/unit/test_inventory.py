"""Unit tests of the pure GPU inventory: eligible nodes, free GPUs, and the chosen node shape."""

from __future__ import annotations

from typing import Any

import pytest

from shardwise.inventory import (
    InventoryError,
    choose_shape,
    gpu_nodes,
    holds_devices,
    parse_quantity,
    pod_gpu_request,
)


def node(
    name: str,
    *,
    gpus: int = 8,
    product: str = "NVIDIA-H100-80GB-HBM3",
    mem_mib: int = 81559,
    ready: bool = True,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    unschedulable: bool = False,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.memory": str(mem_mib),
                "nvidia.com/gpu.count": str(gpus),
                **(labels or {}),
            },
        },
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus), "memory": "1056Gi", "cpu": "96"},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pod(
    node_name: str, gpus: int, phase: str = "Running", job: str | None = None, ns: str = "ml"
) -> dict[str, Any]:
    labels = {"shardwise.dev/job-name": job} if job else {}
    return {
        "metadata": {"name": f"p-{node_name}-{gpus}", "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}],
        },
        "status": {"phase": phase},
    }


def inv(nodes: list[dict[str, Any]], pods: list[dict[str, Any]] | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {"gpu_resource": "nvidia.com/gpu", "node_selector": {}, "tolerations": []}
    args.update(kw)
    return gpu_nodes(nodes, pods or [], **args)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8", 8),
        ("1056Gi", 1056 << 30),
        ("64G", 64 * 10**9),
        ("512Mi", 512 << 20),
        ("1.5Ki", 1536),
        ("100k", 100_000),
    ],
)
def test_parse_quantity(text: str, value: int) -> None:
    assert parse_quantity(text) == value


def test_pod_gpu_request_counts_containers_and_init_max() -> None:
    p = {
        "spec": {
            "containers": [
                {"resources": {"limits": {"nvidia.com/gpu": "2"}}},
                {"resources": {"requests": {"nvidia.com/gpu": "1"}}},
            ],
            "initContainers": [{"resources": {"limits": {"nvidia.com/gpu": "4"}}}],
        }
    }
    assert pod_gpu_request(p, "nvidia.com/gpu") == 4
    assert pod_gpu_request(p, "amd.com/gpu") == 0


@pytest.mark.parametrize(
    ("resources", "init", "holds"),
    [
        ({"limits": {"nvidia.com/gpu": "1"}}, None, True),
        ({"requests": {"amd.com/gpu": "2", "cpu": "1"}}, None, True),
        ({"requests": {"cpu": "2", "memory": "1Gi", "ephemeral-storage": "1Gi"}}, None, False),
        ({"limits": {"hugepages-2Mi": "64Mi"}}, None, False),
        ({}, {"limits": {"habana.ai/gaudi": "1"}}, True),
        ({}, None, False),
    ],
)
def test_holds_devices_means_any_extended_resource(
    resources: dict[str, Any], init: dict[str, Any] | None, holds: bool
) -> None:
    spec: dict[str, Any] = {"containers": [{"resources": resources}]}
    if init is not None:
        spec["initContainers"] = [{"resources": init}]
    assert holds_devices({"spec": spec}) is holds


def test_free_gpus_subtract_live_pods_of_other_workloads_only() -> None:
    nodes = [node("a"), node("b")]
    pods = [
        pod("a", 3),
        pod("a", 2, phase="Succeeded"),
        pod("b", 8, job="mine"),  # the job's own pods never block its own plan
        pod("b", 1, job="other"),
    ]
    result = {n.name: n.free for n in inv(nodes, pods, exclude_job="mine", exclude_namespace="ml")}
    assert result == {"a": 5, "b": 7}


@pytest.mark.parametrize(
    ("extra", "kw", "eligible"),
    [
        ({"ready": False}, {}, False),
        ({"unschedulable": True}, {}, False),
        ({"labels": {"pool": "x"}}, {"node_selector": {"pool": "y"}}, False),
        ({"labels": {"pool": "y"}}, {"node_selector": {"pool": "y"}}, True),
        ({"taints": [{"key": "gpu", "effect": "NoSchedule"}]}, {}, False),
        (
            {"taints": [{"key": "gpu", "effect": "NoSchedule"}]},
            {"tolerations": [{"key": "gpu", "operator": "Exists"}]},
            True,
        ),
        ({"taints": [{"key": "gpu", "effect": "PreferNoSchedule"}]}, {}, True),
        ({"gpus": 0}, {}, False),
    ],
)
def test_node_eligibility(extra: dict[str, Any], kw: dict[str, Any], eligible: bool) -> None:
    assert bool(inv([node("a", **extra)], **kw)) is eligible


def test_gpu_memory_from_gfd_label() -> None:
    (n,) = inv([node("a", mem_mib=24564, product="NVIDIA-GeForce-RTX-4090")])
    assert n.gpu_memory_bytes == 24564 << 20
    assert n.product == "NVIDIA-GeForce-RTX-4090"
    assert n.host_memory_bytes == 1056 << 30


@pytest.mark.parametrize(
    ("frees", "want", "expected"),
    [
        ([8, 8], {"gpus": 16}, (2, 8)),
        ([8, 8], {"gpus": 8}, (1, 8)),
        ([8, 8], {"gpus": 4}, (1, 4)),
        ([4, 4, 4, 4], {"gpus": 16}, (4, 4)),
        ([8, 8], {"node_count": 2, "gpus_per_node": 4}, (2, 4)),
        ([8, 8], {"node_count": 2}, (2, 8)),
        ([8, 6], {"gpus": 12}, (2, 6)),
    ],
)
def test_choose_shape(frees: list[int], want: dict[str, Any], expected: tuple[int, int]) -> None:
    nodes = inv(
        [node(f"n{i}", gpus=8) for i in range(len(frees))],
        [pod(f"n{i}", 8 - f) for i, f in enumerate(frees) if f < 8],
    )
    args: dict[str, Any] = {"gpus": None, "node_count": None, "gpus_per_node": None}
    args.update(want)
    shape = choose_shape(nodes, **args)
    assert (shape.nodes, shape.gpus_per_node) == expected
    assert shape.gpu_memory_bytes == 81559 << 20


def test_choose_shape_prefers_the_larger_gpu_and_never_mixes_products() -> None:
    nodes = inv([node("small", product="NVIDIA-A100-SXM4-40GB", mem_mib=40960), node("big")])
    shape = choose_shape(nodes, gpus=8, node_count=None, gpus_per_node=None)
    assert shape.product == "NVIDIA-H100-80GB-HBM3"
    assert shape.node_names == ("big",)
    with pytest.raises(InventoryError) as err:
        choose_shape(nodes, gpus=16, node_count=None, gpus_per_node=None)
    assert err.value.reason == "InsufficientGpus"


@pytest.mark.parametrize(
    ("nodes", "want", "reason", "fragment"),
    [
        ([], {"gpus": 8}, "NoGpuNodes", "no Ready"),
        ([node("a")], {"gpus": 16}, "InsufficientGpus", "16 GPUs"),
        (
            [node("a"), node("b")],
            {"node_count": 3, "gpus_per_node": 8},
            "InsufficientGpus",
            "3 nodes × 8 GPUs",
        ),
    ],
)
def test_choose_shape_errors(
    nodes: list[dict[str, Any]], want: dict[str, Any], reason: str, fragment: str
) -> None:
    args: dict[str, Any] = {"gpus": None, "node_count": None, "gpus_per_node": None}
    args.update(want)
    with pytest.raises(InventoryError) as err:
        choose_shape(inv(nodes), **args)
    assert err.value.reason == reason
    assert fragment in err.value.message
