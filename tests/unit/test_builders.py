"""Unit tests of the pure child builders: Service, ConfigMap and the torchrun pods."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from shardwise.resources.configmap import build_configmap
from shardwise.resources.names import LABEL_ATTEMPT, LABEL_JOB, LABEL_NODE_RANK, pod_name
from shardwise.resources.pods import (
    RESERVED_ENV,
    PodShape,
    TemplateError,
    build_pod,
    build_pods,
    torchrun_target,
)
from shardwise.resources.service import build_service
from shardwise_trainer import contract


def job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": "llama", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"preset": "llama-2-7b"},
            "resources": {"nodes": 2, "gpusPerNode": 8},
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "example/trainer:1",
                            "command": ["python", "-m", "shardwise_trainer"],
                            "args": ["--steps", "10"],
                            "env": [{"name": "DS_ACCELERATOR", "value": "cpu"}],
                        }
                    ]
                }
            },
        },
    }
    base["spec"].update(spec)
    return base


SHAPE = PodShape(nodes=2, gpus_per_node=8, attempt=3)


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_service_is_headless_and_publishes_not_ready_addresses() -> None:
    svc = build_service(job())
    assert svc["metadata"]["name"] == "llama"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {LABEL_JOB: "llama"}
    owner = svc["metadata"]["ownerReferences"][0]
    assert owner == {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "name": "llama",
        "uid": "u-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_configmap_holds_layout_and_deepspeed_config_deterministically() -> None:
    doc = {"version": 1, "layout": {"tp": 1}, "deepspeed": {"train_batch_size": 8}}
    cm = build_configmap(job(), doc)
    assert cm["metadata"]["name"] == "llama-layout"
    assert json.loads(cm["data"]["layout.json"]) == doc
    assert json.loads(cm["data"]["ds_config.json"]) == {"train_batch_size": 8}
    assert build_configmap(job(), dict(reversed(list(doc.items())))) == cm


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["python", "-m", "shardwise_trainer", "--steps", "3"],
            ["--module", "shardwise_trainer", "--steps", "3"],
        ),
        (["python3", "train.py", "--lr", "1"], ["train.py", "--lr", "1"]),
        (["/usr/bin/python3.11", "-m", "pkg.mod"], ["--module", "pkg.mod"]),
        (["/opt/bin/trainer", "--x"], ["--no-python", "/opt/bin/trainer", "--x"]),
        ([], ["--module", "shardwise_trainer"]),
    ],
)
def test_torchrun_target(argv: list[str], expected: list[str]) -> None:
    assert torchrun_target(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [["torchrun", "train.py"], ["python", "-m", "torch.distributed.run", "x.py"], ["python", "-u"]],
)
def test_torchrun_target_rejects(argv: list[str]) -> None:
    with pytest.raises(TemplateError):
        torchrun_target(argv)


@pytest.mark.parametrize("rank", [0, 1])
def test_pod_runs_torchrun_with_rendezvous_on_node_zero(rank: int) -> None:
    pod = build_pod(job(), SHAPE, rank)
    assert pod["metadata"]["name"] == pod_name("llama", rank)
    assert pod["metadata"]["labels"][LABEL_NODE_RANK] == str(rank)
    assert pod["metadata"]["labels"][LABEL_ATTEMPT] == "3"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:7] == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=8",
        f"--node-rank={rank}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=llama-node-0.llama:29400",
        "--rdzv-id=u-1-3",
    ]
    assert command[7] == f"--rdzv-conf=is_host={'true' if rank == 0 else 'false'}"
    assert command[8] == "--local-addr=$(SHARDWISE_POD_IP)"
    assert command[-4:] == ["--module", "shardwise_trainer", "--steps", "10"]
    assert "args" not in pod["spec"]["containers"][0]
    assert pod["spec"]["hostname"] == f"llama-node-{rank}"
    assert pod["spec"]["subdomain"] == "llama"
    assert pod["spec"]["restartPolicy"] == "Never"


def test_pod_requests_gpus_shm_layout_and_anti_affinity() -> None:
    pod = build_pod(job(), SHAPE, 1)
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/shardwise": "shardwise-layout", "/dev/shm": "dshm"}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["shardwise-layout"]["configMap"]["name"] == "llama-layout"
    term = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term == {
        "labelSelector": {"matchLabels": {LABEL_JOB: "llama"}},
        "topologyKey": "kubernetes.io/hostname",
    }
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_pod_env_contract_and_user_env_kept() -> None:
    env = env_of(build_pod(job(), SHAPE, 1))
    assert env["DS_ACCELERATOR"] == "cpu"
    assert env["SHARDWISE_LAYOUT_FILE"] == "/etc/shardwise/layout.json"
    assert env["SHARDWISE_DS_CONFIG_FILE"] == "/etc/shardwise/ds_config.json"
    assert env["SHARDWISE_NODE_RANK"] == "1"
    assert env["SHARDWISE_ATTEMPT"] == "3"
    assert env["SHARDWISE_JOB_NAME"] == "llama"
    assert env["SHARDWISE_NAMESPACE"] == "ml"
    assert env["SHARDWISE_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize("name", ["RANK", "MASTER_ADDR", "WORLD_SIZE", "SHARDWISE_ATTEMPT"])
def test_reserved_env_is_refused(name: str) -> None:
    spec = job()["spec"]
    spec["template"]["spec"]["containers"][0]["env"].append({"name": name, "value": "1"})
    with pytest.raises(TemplateError, match=name):
        build_pod(job(template=spec["template"]), SHAPE, 0)


def test_placement_from_resources() -> None:
    j = job(
        resources={
            "nodes": 2,
            "gpusPerNode": 8,
            "gpuResource": "example.com/gpu",
            "gpuProduct": "NVIDIA-H100-80GB-HBM3",
            "nodeSelector": {"pool": "train"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    )
    pod = build_pod(j, PodShape(nodes=2, gpus_per_node=8, attempt=0, gpu_resource="example.com/gpu"), 0)
    assert pod["spec"]["nodeSelector"] == {"pool": "train", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"example.com/gpu": "8"}


#: A node field selector takes exactly one value (the API server refuses more): one NotIn per node.
NOT_IN_BAD = [
    {"key": "metadata.name", "operator": "NotIn", "values": ["gpu-3"]},
    {"key": "metadata.name", "operator": "NotIn", "values": ["gpu-7"]},
]


@pytest.mark.parametrize(
    ("affinity", "terms"),
    [
        (None, [{"matchFields": NOT_IN_BAD}]),
        # Terms are ORed: each of the user's own terms must keep the excluded nodes out.
        (
            {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]},
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}]},
            ]}}},
            [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}],
                 "matchFields": NOT_IN_BAD},
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}],
                 "matchFields": NOT_IN_BAD},
            ],
        ),
    ],
)  # fmt: skip
def test_excluded_nodes_are_kept_off_by_node_affinity(
    affinity: dict[str, Any] | None, terms: list[dict[str, Any]]
) -> None:
    j = job()
    if affinity:
        j["spec"]["template"]["spec"]["affinity"] = affinity
    shape = PodShape(nodes=2, gpus_per_node=8, attempt=1, excluded_nodes=("gpu-7", "gpu-3"))
    pod = build_pod(j, shape, 1)
    required = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["nodeSelectorTerms"] == terms
    if affinity is None:  # nothing excluded: no node affinity of ours
        assert "nodeAffinity" not in build_pod(j, SHAPE, 1)["spec"]["affinity"]


H100 = "NVIDIA-H100-80GB-HBM3"
PRODUCT_IN = {"key": "nvidia.com/gpu.product", "operator": "In", "values": [H100]}


@pytest.mark.parametrize(
    ("template_affinity", "resources", "terms"),
    [
        (None, {}, [{"matchExpressions": [PRODUCT_IN]}]),
        # ANDed into each of the user's ORed terms
        (
            {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]},
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}]},
            ]}}},
            {},
            [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}, PRODUCT_IN]},
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["b"]}, PRODUCT_IN]},
            ],
        ),
        # spec.resources.gpuProduct pins it by nodeSelector already: no second rule
        (None, {"gpuProduct": H100}, None),
    ],
)  # fmt: skip
def test_pods_require_the_gpu_product_the_plan_assumed(
    template_affinity: dict[str, Any] | None, resources: dict[str, Any], terms: list[dict[str, Any]] | None
) -> None:
    j = job()
    j["spec"].setdefault("resources", {}).update(resources)
    if template_affinity:
        j["spec"]["template"]["spec"]["affinity"] = template_affinity
    pod = build_pod(j, PodShape(nodes=2, gpus_per_node=8, attempt=0, gpu_product=H100), 0)
    node_affinity = pod["spec"]["affinity"].get("nodeAffinity")
    if terms is None:
        assert node_affinity is None and pod["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == H100
    else:
        assert node_affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == terms


@pytest.mark.parametrize(
    ("host", "template_requests", "memory"),
    [(0, {}, None), (53922234368, {}, "53922234368"), (53922234368, {"memory": "100Gi"}, "100Gi")],
)
def test_pods_request_the_host_memory_offload_needs(
    host: int, template_requests: dict[str, str], memory: str | None
) -> None:
    j = job()
    if template_requests:
        j["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": dict(template_requests)}
    pod = build_pod(j, PodShape(nodes=2, gpus_per_node=8, attempt=0, host_memory_bytes=host), 0)
    requests = pod["spec"]["containers"][0]["resources"]["requests"]
    assert requests.get("memory") == memory
    assert requests["nvidia.com/gpu"] == "8"


def test_builders_do_not_mutate_the_job_and_render_identically() -> None:
    j = job()
    snapshot = json.dumps(j, sort_keys=True)
    first = build_pods(j, SHAPE)
    assert build_pods(j, SHAPE) == first
    assert json.dumps(j, sort_keys=True) == snapshot
    assert [p["metadata"]["name"] for p in first] == ["llama-node-0", "llama-node-1"]


def test_trainer_container_must_be_identifiable() -> None:
    spec = job()["spec"]
    spec["template"]["spec"]["containers"] = [{"name": "a"}, {"name": "b"}]
    with pytest.raises(TemplateError, match="trainer"):
        build_pod(job(template=spec["template"]), SHAPE, 0)


def test_reserved_env_names_match_the_crd_rule() -> None:
    crd = (
        Path(__file__).resolve().parents[2] / "crds" / "paralleltrainingjobs.shardwise.dev.yaml"
    ).read_text()
    rule = re.search(r"!\(self in \[([^\]]*)\]", crd)
    assert rule is not None
    assert set(re.findall(r"'([A-Z_]+)'", rule.group(1))) == set(RESERVED_ENV)


def trainer_of(pod: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


def storage_job(template_volumes: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    doc = job(**spec)
    if template_volumes is not None:
        doc["spec"]["template"]["spec"]["volumes"] = template_volumes
    return doc


def test_storage_fields_mount_their_volumes_and_fill_the_contract_env() -> None:
    doc = storage_job(
        [{"name": "models", "hostPath": {"path": "/srv/models"}}],
        model={
            "preset": "llama-2-7b",
            "path": "/llama",
            "trustRemoteCode": True,
            "volume": {"name": "models"},
        },
        data={
            "path": "/chat/train.jsonl",
            "volume": {"claimName": "datasets", "subPath": "v2"},
            "format": "messages",
            "packing": "pad",
            "validation": {"path": "/chat/val.jsonl"},
            "evalEvery": 5,
            "chatTemplate": "/chat/template.jinja",
        },
        output={"path": "/runs/adapter", "volume": {"claimName": "results"}},
        checkpoint={
            "path": "/ckpt",
            "volume": {"claimName": "results"},
            "everySteps": 50,
            "everyMinutes": 7.5,
            "keep": 3,
        },
    )
    pod = build_pod(doc, SHAPE, 0)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["models"] == {"name": "models", "hostPath": {"path": "/srv/models"}}
    assert volumes["shardwise-data"]["persistentVolumeClaim"] == {"claimName": "datasets"}
    # output and checkpoint share one claim: one pod volume, mounted twice.
    assert volumes["shardwise-output"]["persistentVolumeClaim"] == {"claimName": "results"}
    assert "shardwise-checkpoint" not in volumes
    mounts = {m["mountPath"]: m for m in trainer_of(pod)["volumeMounts"]}
    assert mounts["/shardwise/model"] == {"name": "models", "mountPath": "/shardwise/model", "readOnly": True}
    assert mounts["/shardwise/data"] == {
        "name": "shardwise-data",
        "mountPath": "/shardwise/data",
        "readOnly": True,
        "subPath": "v2",
    }
    assert mounts["/shardwise/output"] == {
        "name": "shardwise-output",
        "mountPath": "/shardwise/output",
        "readOnly": False,
    }
    assert mounts["/shardwise/checkpoint"]["name"] == "shardwise-output"
    env = env_of(pod)
    assert env["SHARDWISE_HF_MODEL"] == "/shardwise/model/llama"
    assert env["SHARDWISE_TRUST_REMOTE_CODE"] == "true"
    assert env["SHARDWISE_DATA"] == "/shardwise/data/chat/train.jsonl"
    assert env["SHARDWISE_DATA_FORMAT"] == "messages"
    assert env["SHARDWISE_PACKING"] == "pad"
    assert env["SHARDWISE_VALIDATION_DATA"] == "/shardwise/data/chat/val.jsonl"
    assert env["SHARDWISE_VALIDATION_FRACTION"] == "0"
    assert env["SHARDWISE_EVAL_EVERY"] == "5"
    assert env["SHARDWISE_CHAT_TEMPLATE"] == "/shardwise/data/chat/template.jinja"
    assert env["SHARDWISE_OUTPUT_DIR"] == "/shardwise/output/runs/adapter"
    assert env["SHARDWISE_CHECKPOINT_DIR"] == "/shardwise/checkpoint/ckpt"
    assert env["SHARDWISE_CHECKPOINT_EVERY"] == "50"
    assert env["SHARDWISE_CHECKPOINT_EVERY_MINUTES"] == "7.5"
    assert env["SHARDWISE_CHECKPOINT_KEEP"] == "3"


def test_unset_storage_fields_leave_the_contract_defaults() -> None:
    env = env_of(build_pod(job(), SHAPE, 1))
    for name in (
        contract.ENV_HF_MODEL,
        contract.ENV_TRUST_REMOTE_CODE,
        contract.ENV_OUTPUT_DIR,
        contract.ENV_DATA_FILE,
        contract.ENV_DATA_FORMAT,
        contract.ENV_PACKING,
        contract.ENV_VALIDATION_DATA,
        contract.ENV_VALIDATION_FRACTION,
        contract.ENV_EVAL_EVERY,
        contract.ENV_CHAT_TEMPLATE,
        contract.ENV_CHECKPOINT_DIR,
        contract.ENV_CHECKPOINT_EVERY,
        contract.ENV_CHECKPOINT_EVERY_MINUTES,
        contract.ENV_CHECKPOINT_KEEP,
    ):
        assert env[name] == contract.ENV_DEFAULTS[name], name
    assert not any(
        m["mountPath"].startswith("/shardwise/")
        for m in trainer_of(build_pod(job(), SHAPE, 1))["volumeMounts"]
    )


def test_a_path_without_a_volume_is_the_container_path() -> None:
    doc = job(model={"preset": "llama-2-7b", "path": "/opt/models/llama"}, output={"path": "/tmp/out"})
    env = env_of(build_pod(doc, SHAPE, 0))
    assert env["SHARDWISE_HF_MODEL"] == "/opt/models/llama"
    assert env["SHARDWISE_OUTPUT_DIR"] == "/tmp/out"
    assert env["SHARDWISE_DATA_FORMAT"] == "auto"


def test_validation_fraction_and_path_at_the_volume_root() -> None:
    doc = job(data={"path": "/", "volume": {"claimName": "d"}, "validation": {"fraction": 0.1}})
    env = env_of(build_pod(doc, SHAPE, 0))
    assert env["SHARDWISE_DATA"] == "/shardwise/data"
    assert env["SHARDWISE_VALIDATION_FRACTION"] == "0.1"


@pytest.mark.parametrize(
    ("template_volumes", "spec", "message"),
    [
        (None, {"output": {"path": "/o", "volume": {"name": "nope"}}}, "spec.output.volume.name nope"),
        (
            [{"name": "x", "emptyDir": {}}],
            {"data": {"path": "/d.jsonl", "volume": {"name": "x"}}, "checkpoint": {"path": "c"}},
            "spec.checkpoint.path must be an absolute path",
        ),
    ],
)
def test_storage_mistakes_are_template_errors(
    template_volumes: list[dict[str, Any]] | None, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)):
        build_pod(storage_job(template_volumes, **spec), SHAPE, 0)


def test_a_template_mount_on_a_shardwise_mount_path_is_refused() -> None:
    doc = job(output={"path": "/o", "volume": {"claimName": "r"}})
    doc["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "mine", "mountPath": "/shardwise/output"}
    ]
    with pytest.raises(TemplateError, match="mounts /shardwise/output"):
        build_pod(doc, SHAPE, 0)


@pytest.mark.parametrize(
    ("gpus_per_node", "template_requests", "cpu"),
    [(8, {}, "8"), (2, {}, "2"), (8, {"cpu": "500m"}, "500m")],
)
def test_pods_request_a_cpu_per_local_rank(
    gpus_per_node: int, template_requests: dict[str, str], cpu: str
) -> None:
    j = job()
    if template_requests:
        j["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": dict(template_requests)}
    pod = build_pod(j, PodShape(nodes=2, gpus_per_node=gpus_per_node, attempt=0), 0)
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["requests"]["cpu"] == cpu
    assert "cpu" not in resources["limits"]  # a limit would throttle the workers: none is set


@pytest.mark.parametrize("key", [None, "nvidia.com/gpu.clique", "example.com/nvlink-domain"])
def test_pods_prefer_one_nvlink_domain_when_nodes_name_it(key: str | None) -> None:
    pod = build_pod(job(), PodShape(nodes=4, gpus_per_node=8, attempt=0, topology_key=key), 1)
    affinity = pod["spec"]["affinity"]
    if key is None:
        assert "podAffinity" not in affinity
        return
    assert affinity["podAffinity"] == {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {
                "weight": 100,
                "podAffinityTerm": {
                    "labelSelector": {
                        "matchLabels": {
                            "shardwise.dev/job-name": pod["metadata"]["labels"]["shardwise.dev/job-name"]
                        }
                    },
                    "topologyKey": key,
                },
            }
        ]
    }
    # One pod per node still holds.
    assert affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0][
        "topologyKey"
    ] == ("kubernetes.io/hostname")
