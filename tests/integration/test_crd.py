"""The ParallelTrainingJob CRD against a real kube-apiserver.

Installs crds/paralleltrainingjobs.shardwise.dev.yaml, then holds the API server's admission to
the CRD's promises: malformed jobs are rejected with a readable message (schema bounds, enums and
the CEL rules), valid ones are accepted and defaulted, immutable fields stay immutable on update,
`kubectl explain` prints the descriptions and `kubectl get ptj` the printer columns.

Rejections use `kubectl create --dry-run=server`: the request runs through the whole admission
chain (defaulting, schema, CEL) without being stored, so the table needs no clean-up.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster import ClusterError, LocalCluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "paralleltrainingjobs.shardwise.dev.yaml"
CRD_NAME = "paralleltrainingjobs.shardwise.dev"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

Manifest = dict[str, Any]
Mutation = Callable[[Manifest], None]


def base_job(name: str = "tiny") -> Manifest:
    """The smallest realistic job: a 4-layer GQA model on 2 nodes × 2 GPUs."""
    return {
        "apiVersion": "shardwise.dev/v1alpha1",
        "kind": "ParallelTrainingJob",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "architecture": {"layers": 4, "hiddenSize": 256, "heads": 8, "kvHeads": 4, "vocabSize": 1000}
            },
            "training": {"sequenceLength": 128, "globalBatchSize": 8},
            "resources": {"gpus": 4, "gpusPerNode": 2},
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "python:3.12-slim",
                            "command": ["python", "-m", "tinytrain"],
                            "env": [{"name": "HF_HOME", "value": "/cache"}],
                        }
                    ]
                }
            },
        },
    }


# -- helpers ------------------------------------------------------------------------------------


def _set(path: str, value: Any) -> Mutation:
    """A mutation setting a dotted path (creating parents); `value=DELETE` removes the key."""

    def mutate(job: Manifest) -> None:
        node = job
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)

    return mutate


def _all(*mutations: Mutation) -> Mutation:
    def mutate(job: Manifest) -> None:
        for mutation in mutations:
            mutation(job)

    return mutate


def _env(*names: str, container: int = 0) -> Mutation:
    def mutate(job: Manifest) -> None:
        env = job["spec"]["template"]["spec"]["containers"][container].setdefault("env", [])
        env.extend({"name": n, "value": "x"} for n in names)

    return mutate


def _containers(*containers: dict[str, Any]) -> Mutation:
    return _set("spec.template.spec.containers", list(containers))


DELETE = object()
ARCH = "spec.model.architecture"


def create(cluster: LocalCluster, namespace: str, job: Manifest, *, dry_run: bool) -> str:
    args = ["create", "-n", namespace, "-f", "-"]
    if dry_run:
        args.append("--dry-run=server")
    return cluster.kubectl(*args, input=json.dumps(job))


def rejection(cluster: LocalCluster, namespace: str, job: Manifest, *, dry_run: bool = True) -> str:
    """The API server's error for `job`; fails the test if it is accepted."""
    try:
        create(cluster, namespace, job, dry_run=dry_run)
    except ClusterError as err:
        return str(err)
    pytest.fail(f"the API server accepted an invalid job:\n{yaml.safe_dump(job['spec'])}")


def patch_rejection(cluster: LocalCluster, namespace: str, name: str, patch: Manifest) -> str:
    try:
        cluster.kubectl("patch", "ptj", name, "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    except ClusterError as err:
        return str(err)
    pytest.fail(f"the API server accepted the update {patch}")


def patch(cluster: LocalCluster, namespace: str, name: str, body: Manifest, *, status: bool = False) -> None:
    sub = ["--subresource=status"] if status else []
    cluster.kubectl("patch", "ptj", name, "-n", namespace, *sub, "--type=merge", "-p", json.dumps(body))


def get_job(cluster: LocalCluster, namespace: str, name: str) -> Manifest:
    job: Manifest = cluster.kubectl_json("get", "ptj", name, "-n", namespace)
    return job


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd(cluster: LocalCluster) -> str:
    """The CRD installed (server-side apply, idempotent) and Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_PATH))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    return CRD_NAME


@pytest.fixture(scope="module")
def ns(cluster: LocalCluster, crd: str) -> Iterator[str]:
    """One namespace for this module (the table uses dry-run, so it stays nearly empty)."""
    name = f"crd-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# -- installation -------------------------------------------------------------------------------


def test_crd_is_established_with_its_names(cluster: LocalCluster, crd: str) -> None:
    got = cluster.kubectl_json("get", "crd", crd)
    conditions = {c["type"]: c["status"] for c in got["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert got["status"]["acceptedNames"]["shortNames"] == ["ptj"]
    assert got["status"]["acceptedNames"]["categories"] == ["shardwise"]


# -- malformed manifests ------------------------------------------------------------------------

BAD: list[tuple[str, Mutation, str]] = [
    # sizes: schema bounds
    ("zero-gpus", _set("spec.resources.gpus", 0), "should be greater than or equal to 1"),
    ("negative-gpus", _set("spec.resources.gpus", -8), "should be greater than or equal to 1"),
    ("zero-nodes", _set("spec.resources.nodes", 0), "spec.resources.nodes: Invalid value"),
    ("zero-layers", _set(f"{ARCH}.layers", 0), "spec.model.architecture.layers: Invalid value"),
    ("zero-tensor", _set("spec.parallelism.tensor", 0), "spec.parallelism.tensor: Invalid value"),
    ("zero-pipeline", _set("spec.parallelism.pipeline", 0), "spec.parallelism.pipeline: Invalid value"),
    ("zero-stage-4", _set("spec.parallelism.zeroStage", 4), "should be less than or equal to 3"),
    ("zero-stragglers", _set("spec.monitoring.stragglerThreshold", 0), "should be greater than 0"),
    # closed sets: enums
    ("method-sft", _set("spec.training.method", "sft"), 'Unsupported value: "sft"'),
    ("precision-int8", _set("spec.training.precision", "int8"), 'Unsupported value: "int8"'),
    (
        "checkpointing-some",
        _set("spec.training.activationCheckpointing", "some"),
        'Unsupported value: "some"',
    ),
    ("offload-nvme", _set("spec.training.offload", "nvme"), 'Unsupported value: "nvme"'),
    (
        "lora-target-qkv",
        _all(_set("spec.training.method", "lora"), _set("spec.training.loraTargets", ["qkv"])),
        'Unsupported value: "qkv"',
    ),
    ("mlp-relu", _set(f"{ARCH}.mlp", "relu"), 'Unsupported value: "relu"'),
    ("typo-field", _set("spec.training.loraRnk", 8), 'unknown field "spec.training.loraRnk"'),
    # the model
    ("no-model-source", _set("spec.model", {}), "spec.model needs one of preset, architecture or parameters"),
    (
        "two-model-sources",
        _set("spec.model.preset", "llama-2-7b"),
        "preset, architecture or parameters; they are mutually exclusive",
    ),
    ("parameters-words", _set("spec.model", {"parameters": "seven billion"}), "spec.model.parameters"),
    ("parameters-zero", _set("spec.model", {"parameters": 0}), "must be a positive count"),
    ("parameters-zero-b", _set("spec.model", {"parameters": "0B"}), "must be a positive count"),
    (
        "kv-heads-not-dividing",
        _set(f"{ARCH}.kvHeads", 3),
        "architecture.kvHeads (3) must divide architecture.heads",
    ),
    ("hidden-not-multiple", _set(f"{ARCH}.hiddenSize", 250), "hiddenSize (250) must be a multiple of"),
    # parallelism against the model and the GPUs
    (
        "tensor-not-dividing-heads",
        _all(
            _set(f"{ARCH}.heads", 12),
            _set(f"{ARCH}.hiddenSize", 384),
            _set(f"{ARCH}.kvHeads", 12),
            _set("spec.resources", {"gpus": 8, "gpusPerNode": 8}),
            _set("spec.parallelism.tensor", 8),
        ),
        "parallelism.tensor (8) must divide model.architecture.heads (12)",
    ),
    (
        "tensor-not-dividing-kv-heads",
        _all(
            _set(f"{ARCH}.kvHeads", 2),
            _set("spec.resources", {"gpus": 4, "gpusPerNode": 4}),
            _set("spec.parallelism.tensor", 4),
        ),
        "parallelism.tensor (4) must divide model.architecture.kvHeads (2)",
    ),
    (
        "gpus-not-divisible-by-tp-pp",
        _all(
            _set("spec.resources", {"gpus": 12, "gpusPerNode": 4}),
            _set("spec.parallelism", {"tensor": 2, "pipeline": 4}),
        ),
        "the GPU count (12) must be a multiple of tensor × pipeline (8)",
    ),
    (
        "tensor-across-nodes",
        _all(_set("spec.resources", {"gpus": 8, "gpusPerNode": 2}), _set("spec.parallelism.tensor", 4)),
        "must divide the GPUs per node (2)",
    ),
    (
        "tensor-not-dividing-ffn",
        _all(
            _set(f"{ARCH}.ffnHiddenSize", 690),
            _set("spec.resources", {"gpus": 4, "gpusPerNode": 4}),
            _set("spec.parallelism.tensor", 4),
        ),
        "parallelism.tensor (4) must divide model.architecture.ffnHiddenSize (690)",
    ),
    (
        "pipeline-beyond-layers",
        _all(_set("spec.resources", {"gpus": 8, "nodes": 1}), _set("spec.parallelism.pipeline", 8)),
        "parallelism.pipeline (8) must not exceed model.architecture.layers (4)",
    ),
    (
        "zero3-with-pipeline",
        _set("spec.parallelism", {"pipeline": 2, "zeroStage": 3}),
        "zeroStage 3 cannot be combined with pipeline parallelism",
    ),
    (
        "sequence-parallel-without-tp",
        _all(_set("spec.training.sequenceParallel", True), _set("spec.parallelism.tensor", 1)),
        "needs parallelism.tensor > 1",
    ),
    # resources
    (
        "gpus-disagree-with-nodes",
        _set("spec.resources", {"gpus": 8, "nodes": 2, "gpusPerNode": 2}),
        "spec.resources.gpus (8) must equal nodes × gpusPerNode (2 × 2 = 4)",
    ),
    ("no-sizing", _set("spec.resources", {"nodes": 2}), "spec.resources needs gpus"),
    (
        "gpus-uneven-over-nodes",
        _set("spec.resources", {"gpus": 6, "nodes": 4}),
        "must be a multiple of nodes (4)",
    ),
    (
        "gpu-memory-zero",
        _set("spec.resources.gpuMemory", "0GiB"),
        "spec.resources.gpuMemory must be positive",
    ),
    (
        "node-memory-zero-bytes",
        _set("spec.resources.nodeMemory", 0),
        "spec.resources.nodeMemory must be positive",
    ),
    ("gpu-memory-words", _set("spec.resources.gpuMemory", "80 gigs"), "spec.resources.gpuMemory"),
    # training method combinations
    (
        "lora-rank-with-full",
        _set("spec.training.loraRank", 16),
        "loraRank applies to method lora or qlora only",
    ),
    (
        "lora-targets-with-freeze",
        _all(_set("spec.training.method", "freeze"), _set("spec.training.loraTargets", ["q", "v"])),
        "loraTargets applies to method lora or qlora only, not freeze",
    ),
    (
        "fraction-with-lora",
        _all(_set("spec.training.method", "lora"), _set("spec.training.trainableFraction", 0.5)),
        "trainableFraction applies to method freeze only, not lora",
    ),
    (
        "inference-with-checkpointing",
        _all(
            _set("spec.training.method", "inference"), _set("spec.training.activationCheckpointing", "full")
        ),
        "which inference does not run",
    ),
    (
        "inference-with-optimizer-offload",
        _all(_set("spec.training.method", "inference"), _set("spec.training.offload", "optimizer")),
        "inference has none",
    ),
    (
        "inference-with-zero2",
        _all(_set("spec.training.method", "inference"), _set("spec.parallelism.zeroStage", 2)),
        "which inference does not have",
    ),
    (
        "micro-batch-over-global",
        _set("spec.training.microBatchSize", 16),
        "microBatchSize (16) must not exceed training.globalBatchSize (8)",
    ),
    (
        "learned-positions-too-short",
        _all(_set(f"{ARCH}.positionEmbedding", "learned"), _set(f"{ARCH}.maxSequenceLength", 64)),
        "training.sequenceLength (128) exceeds model.architecture.maxSequenceLength (64)",
    ),
    # names of the children
    ("name-too-long", _set("metadata.name", "j" * 54), "metadata.name is 54 characters long; at most 53"),
    ("name-starts-with-digit", _set("metadata.name", "7b-run"), "metadata.name must be a DNS-1035 label"),
    # the pod template
    ("env-rank", _env("RANK"), "env RANK is reserved: torchrun sets it"),
    ("env-master-addr", _env("MASTER_ADDR"), "env MASTER_ADDR is reserved"),
    ("env-shardwise", _env("SHARDWISE_X"), "env SHARDWISE_X is reserved: the shardwise operator sets"),
    (
        "env-in-sidecar",
        _all(
            _containers(
                {"name": "trainer", "image": "img"},
                {"name": "sidecar", "image": "img", "env": [{"name": "WORLD_SIZE", "value": "1"}]},
            )
        ),
        "env WORLD_SIZE is reserved",
    ),
    (
        "no-trainer-container",
        _containers({"name": "main", "image": "img"}, {"name": "sidecar", "image": "img"}),
        "must hold a container named trainer",
    ),
    (
        "duplicate-containers",
        _containers({"name": "trainer", "image": "a"}, {"name": "trainer", "image": "b"}),
        "Duplicate value",
    ),
    ("no-image", _containers({"name": "trainer"}), "spec.template.spec.containers[0].image: Required value"),
    ("no-template", _set("spec.template", DELETE), "spec.template: Required value"),
    # run policy
    (
        "exit-code-in-both-lists",
        _all(
            _set("spec.runPolicy.retryableExitCodes", [137, 139]),
            _set("spec.runPolicy.permanentExitCodes", [1, 137]),
        ),
        "must not share a code",
    ),
    (
        "toleration-seconds-without-no-execute",
        _set("spec.resources.tolerations", [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 60}]),
        "tolerationSeconds applies to effect NoExecute only",
    ),
    (
        "toleration-exists-with-value",
        _set("spec.resources.tolerations", [{"key": "gpu", "operator": "Exists", "value": "yes"}]),
        "operator Exists must not have a value",
    ),
    # model / data / output / checkpoint (docs/crd.md "Model, data, output and checkpoint")
    (
        "model-path-relative",
        _set("spec.model.path", "models/llama"),
        "spec.model.path must be an absolute path",
    ),
    ("model-path-dotdot", _set("spec.model.path", "/models/../etc"), "without .. segments"),
    (
        "model-volume-without-path",
        _set("spec.model.volume", {"claimName": "models"}),
        "spec.model.volume needs spec.model.path",
    ),
    (
        "volume-claim-and-name",
        _set("spec.output", {"path": "/o", "volume": {"claimName": "a", "name": "b"}}),
        "spec.output.volume takes exactly one of claimName or name",
    ),
    (
        "volume-neither-claim-nor-name",
        _set("spec.data", {"path": "/d.jsonl", "volume": {"subPath": "x"}}),
        "spec.data.volume takes exactly one of claimName or name",
    ),
    (
        "volume-name-not-in-template",
        _set("spec.data", {"path": "/d.jsonl", "volume": {"name": "datasets"}}),
        "spec.data.volume.name datasets is not a volume of spec.template.spec.volumes",
    ),
    (
        "volume-subpath-absolute",
        _set("spec.checkpoint", {"path": "/c", "volume": {"claimName": "c", "subPath": "/abs"}}),
        "subPath must be a relative path",
    ),
    (
        "output-volume-read-only",
        _set("spec.output", {"path": "/o", "volume": {"claimName": "r", "readOnly": True}}),
        "spec.output.volume.readOnly must be false",
    ),
    (
        "data-format-unknown",
        _set("spec.data", {"path": "/d", "format": "csv"}),
        "spec.data.format: Unsupported value",
    ),
    ("data-packing-unknown", _set("spec.data", {"path": "/d", "packing": "squash"}), "spec.data.packing"),
    ("data-without-path", _set("spec.data", {"format": "messages"}), "spec.data.path: Required value"),
    (
        "validation-path-and-fraction",
        _set("spec.data", {"path": "/d", "validation": {"path": "/v", "fraction": 0.1}}),
        "spec.data.validation takes exactly one of path or fraction",
    ),
    ("validation-fraction-one", _set("spec.data", {"path": "/d", "validation": {"fraction": 1}}), "fraction"),
    (
        "validation-fraction-zero",
        _set("spec.data", {"path": "/d", "validation": {"fraction": 0}}),
        "fraction",
    ),
    (
        "eval-every-without-validation",
        _set("spec.data", {"path": "/d", "evalEvery": 10}),
        "spec.data.evalEvery needs spec.data.validation",
    ),
    (
        "eval-every-zero",
        _set("spec.data", {"path": "/d", "validation": {"fraction": 0.1}, "evalEvery": 0}),
        "spec.data.evalEvery",
    ),
    ("checkpoint-keep-zero", _set("spec.checkpoint", {"path": "/c", "keep": 0}), "spec.checkpoint.keep"),
    (
        "checkpoint-relative",
        _set("spec.checkpoint", {"path": "ckpt"}),
        "spec.checkpoint.path must be an absolute",
    ),
    (
        "output-without-path",
        _set("spec.output", {"volume": {"claimName": "r"}}),
        "spec.output.path: Required value",
    ),
]


@pytest.mark.parametrize(("mutation", "fragment"), [pytest.param(m, f, id=i) for i, m, f in BAD])
def test_malformed_job_is_rejected(
    cluster: LocalCluster, ns: str, mutation: Mutation, fragment: str, request: pytest.FixtureRequest
) -> None:
    job = base_job(f"bad-{request.node.callspec.id}")
    mutation(job)
    error = rejection(cluster, ns, job)
    assert fragment in error, f"expected {fragment!r} in:\n{error}"


def test_the_table_is_large_and_distinct() -> None:
    assert len(BAD) >= 25
    assert len({case_id for case_id, _, _ in BAD}) == len(BAD)


# -- valid manifests ----------------------------------------------------------------------------

GOOD: list[tuple[str, Mutation]] = [
    ("tiny", lambda job: None),
    (
        "preset-lora",
        _all(
            _set("spec.model", {"preset": "llama-2-7b"}),
            _set(
                "spec.training",
                {"method": "lora", "loraRank": 16, "loraTargets": ["q", "k", "v", "o"], "precision": "bf16"},
            ),
            _set("spec.resources", {"gpus": 1}),
        ),
    ),
    (
        "parameters-inference-zero3",
        _all(
            _set("spec.model", {"parameters": "70B"}),
            _set("spec.training", {"method": "inference", "offload": "all"}),
            _set("spec.parallelism", {"zeroStage": 3}),
            _set("spec.resources", {"nodes": 2, "gpusPerNode": 8, "gpus": 16}),
        ),
    ),
    (
        "pinned-tp-pp-zero1",
        _all(
            _set("spec.parallelism", {"tensor": 2, "pipeline": 2, "zeroStage": 1}),
            _set("spec.resources", {"nodes": 2, "gpusPerNode": 4}),
            _set("spec.training.sequenceParallel", True),
        ),
    ),
    (
        "freeze-fraction-int-parameters",
        _all(
            _set("spec.model", {"parameters": 6738415616}),
            _set("spec.training", {"method": "freeze", "trainableFraction": 0.25}),
        ),
    ),
    (
        "qlora-with-sidecar-and-scheduling",
        _all(
            _set("spec.training", {"method": "qlora", "loraRank": 64, "offload": "optimizer"}),
            _containers(
                {"name": "logger", "image": "busybox", "env": [{"name": "LOG_LEVEL", "value": "info"}]},
                {"name": "trainer", "image": "img", "args": ["--epochs", "1"]},
            ),
            _set(
                "spec.resources",
                {
                    "gpus": 16,
                    "nodes": 2,
                    "gpuProduct": "NVIDIA-H100-80GB-HBM3",
                    "gpuMemory": "80GiB",
                    "nodeMemory": "1TiB",
                    "nodeSelector": {"pool": "gpu"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
            ),
            _set(
                "spec.runPolicy",
                {
                    "maxRestarts": 5,
                    "retryableExitCodes": [137],
                    "permanentExitCodes": [1, 2],
                    "suspend": True,
                },
            ),
        ),
    ),
    ("name-at-the-limit", _set("metadata.name", "j" * 53)),
    (
        "byte-counts-and-g-suffix",
        _all(
            _set("spec.model", {"parameters": "7g"}),
            _set("spec.resources", {"gpus": 8, "gpuMemory": 25769803776, "nodeMemory": "512gb"}),
        ),
    ),
    (
        "single-container-not-named-trainer",
        _containers({"name": "main", "image": "img", "env": [{"name": "RANKING", "value": "1"}]}),
    ),
    (
        "model-data-output-checkpoint-on-volumes",
        _all(
            _set("spec.model.path", "/llama"),
            _set("spec.model.trustRemoteCode", True),
            _set("spec.model.volume", {"name": "models", "subPath": "hf"}),
            _set("spec.template.spec.volumes", [{"name": "models", "hostPath": {"path": "/srv/models"}}]),
            _set(
                "spec.data",
                {
                    "path": "/chat.jsonl",
                    "volume": {"claimName": "datasets"},
                    "format": "messages",
                    "packing": "pad",
                    "validation": {"fraction": 0.05},
                    "evalEvery": 20,
                    "chatTemplate": "/template.jinja",
                },
            ),
            _set("spec.output", {"path": "/adapter", "volume": {"claimName": "results"}}),
            _set(
                "spec.checkpoint",
                {"path": "/ckpt", "volume": {"claimName": "results"}, "everySteps": 100, "everyMinutes": 30},
            ),
        ),
    ),
    (
        "paths-in-the-image",
        _all(_set("spec.model.path", "/opt/model"), _set("spec.output", {"path": "/tmp/out"})),
    ),
]


@pytest.mark.parametrize("mutation", [pytest.param(m, id=i) for i, m in GOOD])
def test_valid_job_is_accepted(cluster: LocalCluster, ns: str, mutation: Mutation) -> None:
    job = base_job("good")
    mutation(job)
    if job["metadata"]["name"] == "good":
        job["metadata"]["name"] = f"good-{uuid.uuid4().hex[:6]}"
    create(cluster, ns, job, dry_run=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_accepted(cluster: LocalCluster, ns: str, path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if doc and doc.get("kind") == "ParallelTrainingJob":
            doc["metadata"].pop("namespace", None)
            create(cluster, ns, doc, dry_run=True)


def test_generated_names_are_checked_too(cluster: LocalCluster, ns: str) -> None:
    """The name rules see the generated name (generateName + 5 random characters)."""
    job = base_job()
    del job["metadata"]["name"]
    job["metadata"]["generateName"] = "gen-"
    assert "gen-" in create(cluster, ns, job, dry_run=True)
    job["metadata"]["generateName"] = "g" * 49 + "-"
    error = rejection(cluster, ns, job)
    assert "metadata.name is 55 characters long; at most 53" in error


def test_defaults_are_applied(cluster: LocalCluster, ns: str) -> None:
    create(cluster, ns, base_job("defaults"), dry_run=False)
    spec = get_job(cluster, ns, "defaults")["spec"]
    assert spec["training"]["method"] == "full"
    assert spec["training"]["precision"] == "bf16"
    assert spec["training"]["activationCheckpointing"] == "auto"
    assert spec["training"]["offload"] == "auto"
    assert "sequenceParallel" not in spec["training"]  # unset = planned
    assert spec["resources"]["gpuResource"] == "nvidia.com/gpu"
    assert spec["runPolicy"] == {
        "maxRestarts": 3,
        "suspend": False,
        "scheduleTimeoutSeconds": 300,
        "replanOnNodeLoss": True,
    }
    assert spec["monitoring"] == {
        "scrapeIntervalSeconds": 15,
        "stragglerThreshold": 0.2,
        "stragglerSignal": "Compute",
        "stragglerPolicy": "Report",
        "maxStragglerReplacements": 1,
        "stragglerWindows": 3,
        "stragglerStageThreshold": 0.5,
        "memoryImbalanceThreshold": 0.1,
    }
    # Unknown fields inside the pod spec are kept (it is a free-form PodSpec).
    job = base_job("preserved")
    job["spec"]["template"]["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    job["spec"]["template"]["spec"]["containers"][0]["workingDir"] = "/work"
    create(cluster, ns, job, dry_run=False)
    pod_spec = get_job(cluster, ns, "preserved")["spec"]["template"]["spec"]
    assert pod_spec["volumes"] == [{"name": "data", "emptyDir": {}}]
    assert pod_spec["containers"][0]["workingDir"] == "/work"


# -- updates ------------------------------------------------------------------------------------


def test_always_immutable_fields(cluster: LocalCluster, ns: str) -> None:
    job = base_job("immutable")
    job["spec"]["training"].update({"method": "lora", "loraRank": 8, "precision": "bf16"})
    create(cluster, ns, job, dry_run=False)

    error = patch_rejection(cluster, ns, "immutable", {"spec": {"model": {"architecture": {"layers": 8}}}})
    assert "spec.model is immutable" in error
    error = patch_rejection(cluster, ns, "immutable", {"spec": {"training": {"method": "qlora"}}})
    assert "training.method and training.precision are immutable" in error
    error = patch_rejection(cluster, ns, "immutable", {"spec": {"training": {"precision": "fp16"}}})
    assert "training.method and training.precision are immutable" in error
    error = patch_rejection(cluster, ns, "immutable", {"spec": {"training": {"loraRank": 16}}})
    assert "training.loraRank, training.loraTargets and training.trainableFraction are immutable" in error
    error = patch_rejection(cluster, ns, "immutable", {"spec": {"training": {"loraTargets": ["q"]}}})
    assert "are immutable" in error

    # Before the job starts, sizes and pins may change (the way out of Planned=False) ...
    patch(cluster, ns, "immutable", {"spec": {"resources": {"gpus": 8}, "parallelism": {"tensor": 2}}})
    # ... and the rest of training, the template, the run policy and monitoring always may.
    patch(
        cluster,
        ns,
        "immutable",
        {
            "spec": {
                "training": {"globalBatchSize": 16, "offload": "none"},
                "runPolicy": {"maxRestarts": 1},
                "monitoring": {"stragglerThreshold": 0.5},
            }
        },
    )
    assert get_job(cluster, ns, "immutable")["spec"]["resources"]["gpus"] == 8


def test_sizes_and_pins_are_immutable_once_started(cluster: LocalCluster, ns: str) -> None:
    job = base_job("started")
    job["spec"]["parallelism"] = {"tensor": 2}
    create(cluster, ns, job, dry_run=False)
    # What the operator writes when it creates the first attempt's pods.
    patch(
        cluster, ns, "started", {"status": {"startTime": "2026-01-01T00:00:00Z", "attempt": 0}}, status=True
    )

    error = patch_rejection(cluster, ns, "started", {"spec": {"resources": {"gpus": 8}}})
    assert "spec.resources is immutable once the job has started" in error
    error = patch_rejection(cluster, ns, "started", {"spec": {"parallelism": {"tensor": 1}}})
    assert "spec.parallelism is immutable once the job has started" in error
    error = patch_rejection(cluster, ns, "started", {"spec": {"parallelism": None}})
    assert "spec.parallelism is immutable once the job has started" in error

    # Suspending and changing the image stay possible while running.
    patch(cluster, ns, "started", {"spec": {"runPolicy": {"suspend": True}}})
    patch(
        cluster,
        ns,
        "started",
        {"spec": {"template": {"spec": {"containers": [{"name": "trainer", "image": "python:3.13-slim"}]}}}},
    )
    # Once the operator reports the gang suspended, sizes and pins may change for the resume.
    suspended = {
        "type": "Suspended",
        "status": "True",
        "reason": "JobSuspended",
        "message": "pods deleted",
        "lastTransitionTime": "2026-01-01T01:00:00Z",
    }
    patch(cluster, ns, "started", {"status": {"conditions": [suspended]}}, status=True)
    patch(
        cluster,
        ns,
        "started",
        {"spec": {"resources": {"gpus": 8}, "parallelism": {"tensor": 2, "pipeline": 2}}},
    )
    spec = get_job(cluster, ns, "started")["spec"]
    assert spec["resources"]["gpus"] == 8
    assert spec["parallelism"] == {"tensor": 2, "pipeline": 2}


def test_cel_rules_also_hold_on_update(cluster: LocalCluster, ns: str) -> None:
    create(cluster, ns, base_job("update-rules"), dry_run=False)
    error = patch_rejection(cluster, ns, "update-rules", {"spec": {"parallelism": {"tensor": 4}}})
    assert "must divide the GPUs per node (2)" in error
    error = patch_rejection(
        cluster,
        ns,
        "update-rules",
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [{"name": "trainer", "image": "img", "env": [{"name": "MASTER_PORT"}]}]
                    }
                }
            }
        },
    )
    assert "env MASTER_PORT is reserved" in error


# -- what a person sees -------------------------------------------------------------------------


def test_kubectl_explain_prints_the_descriptions(cluster: LocalCluster, crd: str) -> None:
    # The OpenAPI document is rebuilt asynchronously after a CRD change.
    deadline = time.monotonic() + 60
    while True:
        try:
            out = cluster.kubectl("explain", "ptj.spec.training")
            break
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert "KIND:" in out
    assert "ParallelTrainingJob" in out
    assert "How the model is trained" in out
    for field in (
        "method",
        "precision",
        "activationCheckpointing",
        "offload",
        "loraRank",
        "trainableFraction",
    ):
        assert field in out, field
    method = cluster.kubectl("explain", "ptj.spec.training.method")
    assert "low-rank adapters" in method
    assert "inference" in method
    tensor = cluster.kubectl("explain", "ptj.spec.parallelism.tensor")
    assert "must divide the GPUs per node" in tensor


def test_kubectl_get_shows_the_printer_columns(cluster: LocalCluster, ns: str) -> None:
    create(cluster, ns, base_job("columns"), dry_run=False)
    status = {
        "status": {
            "observedGeneration": 1,
            "phase": "Running",
            "restarts": 2,
            "attempt": 2,
            "layout": {
                "tensor": 2,
                "pipeline": 1,
                "data": 2,
                "zeroStage": 1,
                "microBatchSize": 1,
                "gradientAccumulation": 4,
                "activationCheckpointing": "selective",
                "sequenceParallel": False,
                "offload": "none",
                "nodes": 2,
                "gpusPerNode": 2,
                "gpus": 4,
                "predictedGpuMemoryBytes": 21474836480,
                "gpuMemoryBytes": 85899345920,
                "summary": "TP2×PP1×DP2 Z1",
            },
            "conditions": [
                {"type": "Planned", "status": "True", "reason": "LayoutPlanned", "message": "fits"},
                {"type": "Running", "status": "True", "reason": "AllPodsRunning", "message": "2/2 pods"},
            ],
            "progress": {
                "step": 40,
                "totalSteps": 100,
                "percent": 40,
                "summary": "40% (40/100)",
                "remaining": "3m20s",
                "remainingSeconds": 200,
                "eta": "2026-01-01T00:03:20Z",
                "tokensPerSecond": 2048.5,
                "mfu": 0.31,
                "plannedMfu": 0.4,
                "mfuGpu": "H100-80GB-SXM",
                "predictedStepSeconds": 2.5,
                "measuredStepSeconds": 3.1,
                "loss": 2.25,
                "smoothedLoss": 2.5,
                "lastUpdateTime": "2026-01-01T00:00:00Z",
            },
        }
    }
    patch(cluster, ns, "columns", status, status=True)

    lines = cluster.kubectl("get", "ptj", "columns", "-n", ns).splitlines()
    header, row = lines[0].split(), lines[1].split()
    assert header == [
        "NAME",
        "STATUS",
        "LAYOUT",
        "GPUS",
        "PLANNED",
        "RUNNING",
        "RESTARTS",
        "PROGRESS",
        "ETA",
        "AGE",
    ]
    # The summaries hold a space, so each splits into two words here.
    assert row[:11] == [
        "columns",
        "Running",
        "TP2×PP1×DP2",
        "Z1",
        "4",
        "True",
        "True",
        "2",
        "40%",
        "(40/100)",
        "3m20s",
    ]
    assert "TP2×PP1×DP2 Z1" in lines[1]

    wide = cluster.kubectl("get", "ptj", "columns", "-n", ns, "-o", "wide").splitlines()
    assert wide[0].split()[-6:] == ["REASON", "SUCCEEDED", "REQUESTED", "METHOD", "TOKENS/S", "MFU"]
    assert "LayoutPlanned" in wide[1]
    assert wide[1].split()[-3:] == ["full", "2048.5", "0.31"]

    # kubectl describe prints a custom resource's fields sorted by name: the units in the names
    # (Seconds, Per Second) are what keeps it readable.
    described = cluster.kubectl("describe", "ptj", "columns", "-n", ns)
    assert re.search(r"\n  Progress:\n", described)
    assert re.search(r"Measured Step Seconds:\s+3.1\n", described)
    assert re.search(r"Remaining:\s+3m20s\n", described)
    assert re.search(r"Tokens Per Second:\s+2048.5\n", described)

    # The category lists jobs too.
    assert "columns" in cluster.kubectl("get", "shardwise", "-n", ns)


def test_status_is_validated(cluster: LocalCluster, ns: str) -> None:
    create(cluster, ns, base_job("bad-status"), dry_run=False)
    for body, fragment in [
        ({"status": {"conditions": [{"type": "Planned", "status": "Maybe"}]}}, 'Unsupported value: "Maybe"'),
        ({"status": {"layout": {"zeroStage": 5}}}, "should be less than or equal to 3"),
        ({"status": {"restarts": -1}}, "should be greater than or equal to 0"),
        ({"status": {"progress": {"percent": 101}}}, "should be less than or equal to 100"),
    ]:
        with pytest.raises(ClusterError) as err:
            patch(cluster, ns, "bad-status", body, status=True)
        assert fragment in str(err.value)
