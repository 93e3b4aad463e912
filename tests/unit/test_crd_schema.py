"""Static checks of the ParallelTrainingJob CRD (no API server).

The API server only proves that the CRD is accepted; these tests hold the conventions that make it
readable and cheap to validate: every property documented (`kubectl explain`), every string, list,
map and number bounded (the CEL cost estimator needs the bounds), the names and the defaults the
rest of the project codes against, and the printer columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardwise.storage_spec import DATA_FORMATS, PACKING

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "paralleltrainingjobs.shardwise.dev.yaml"

# Root-level fields whose schema the API server owns (a CRD may not restrict them further).
ROOT_BUILTINS = {"apiVersion", "kind", "metadata"}

Schema = dict[str, Any]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    with CRD_PATH.open(encoding="utf-8") as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    return doc


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    versions: list[dict[str, Any]] = crd["spec"]["versions"]
    assert len(versions) == 1
    return versions[0]


@pytest.fixture(scope="module")
def schema(version: dict[str, Any]) -> Schema:
    root: Schema = version["schema"]["openAPIV3Schema"]
    return root


def walk(node: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    """Every schema node below `node` (properties, map values and list items), with its path."""
    for name, child in (node.get("properties") or {}).items():
        child_path = f"{path}.{name}"
        yield child_path, child
        yield from walk(child, child_path)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        yield f"{path}.*", extra
        yield from walk(extra, f"{path}.*")
    items = node.get("items")
    if isinstance(items, dict):
        yield f"{path}[]", items
        yield from walk(items, f"{path}[]")


def user_nodes(schema: Schema) -> list[tuple[str, Schema]]:
    return [
        (path, node)
        for path, node in walk(schema, "")
        if path.split(".")[1].split("[")[0] not in ROOT_BUILTINS or path.count(".") > 1
    ]


def get(schema: Schema, dotted: str) -> Schema:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def test_identity(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "paralleltrainingjobs.shardwise.dev"
    spec = crd["spec"]
    assert spec["group"] == "shardwise.dev"
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert names["kind"] == "ParallelTrainingJob"
    assert names["plural"] == "paralleltrainingjobs"
    assert names["singular"] == "paralleltrainingjob"
    assert names["shortNames"] == ["ptj"]
    assert names["categories"] == ["shardwise"]
    assert version["name"] == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}


def test_every_property_has_a_description(schema: Schema) -> None:
    # The API server forbids anything but `type: object` on the root metadata (it documents it).
    missing = [
        path
        for path, node in walk(schema, "")
        if path != ".metadata" and not str(node.get("description", "")).strip()
    ]
    assert not missing, f"properties without a description: {missing}"


def test_every_string_is_bounded(schema: Schema) -> None:
    unbounded = [
        path
        for path, node in user_nodes(schema)
        if (node.get("type") == "string" or node.get("x-kubernetes-int-or-string"))
        and "maxLength" not in node
        and "enum" not in node
    ]
    assert not unbounded, f"strings without maxLength or enum: {unbounded}"


def test_every_list_is_bounded(schema: Schema) -> None:
    unbounded = [
        path for path, node in user_nodes(schema) if node.get("type") == "array" and "maxItems" not in node
    ]
    assert not unbounded, f"arrays without maxItems: {unbounded}"


def test_every_map_is_bounded(schema: Schema) -> None:
    """Maps (additionalProperties) and free-form objects (preserve-unknown-fields) need maxProperties."""
    unbounded = [
        path
        for path, node in user_nodes(schema)
        if node.get("type") == "object"
        and (node.get("additionalProperties") or node.get("x-kubernetes-preserve-unknown-fields"))
        and "maxProperties" not in node
    ]
    assert not unbounded, f"maps without maxProperties: {unbounded}"


def test_every_number_is_bounded(schema: Schema) -> None:
    unbounded = [
        path
        for path, node in user_nodes(schema)
        if node.get("type") in {"integer", "number"} and ("minimum" not in node or "maximum" not in node)
    ]
    assert not unbounded, f"numbers without minimum and maximum: {unbounded}"


def test_every_rule_has_a_message(schema: Schema) -> None:
    nodes = [("", schema), *walk(schema, "")]
    rules = [(path, rule) for path, node in nodes for rule in node.get("x-kubernetes-validations") or []]
    assert len(rules) >= 25
    silent = [path for path, rule in rules if not (rule.get("message") or rule.get("messageExpression"))]
    assert not silent, f"CEL rules without message: {silent}"


def test_list_maps_have_required_keys(schema: Schema) -> None:
    for path, node in walk(schema, ""):
        if node.get("x-kubernetes-list-type") != "map":
            continue
        keys = node["x-kubernetes-list-map-keys"]
        required = set(node["items"].get("required") or [])
        assert set(keys) <= required, f"{path}: list-map keys {keys} must be required"


def test_spec_field_names_follow_job_spec(schema: Schema) -> None:
    """The names of docs/job-spec.md, which the CLI and the operator code against."""
    spec = get(schema, "spec")
    assert set(spec["properties"]) == {
        "model",
        "training",
        "parallelism",
        "resources",
        "template",
        "runPolicy",
        "monitoring",
        "data",
        "output",
        "checkpoint",
        "scheduling",
    }
    assert set(get(schema, "spec.model")["properties"]) == {
        "preset",
        "architecture",
        "parameters",
        "path",
        "trustRemoteCode",
        "volume",
    }
    assert set(get(schema, "spec.data")["properties"]) == {
        "path",
        "volume",
        "format",
        "packing",
        "validation",
        "evalEvery",
        "chatTemplate",
    }
    assert set(get(schema, "spec.output")["properties"]) == {"path", "volume"}
    assert set(get(schema, "spec.checkpoint")["properties"]) == {
        "path",
        "volume",
        "everySteps",
        "everyMinutes",
        "keep",
    }
    for role in ("model", "data", "output", "checkpoint"):
        assert set(get(schema, f"spec.{role}.volume")["properties"]) == {
            "claimName",
            "name",
            "subPath",
            "readOnly",
        }
    assert set(get(schema, "spec.model.architecture")["properties"]) == {
        "layers",
        "hiddenSize",
        "heads",
        "kvHeads",
        "ffnHiddenSize",
        "vocabSize",
        "mlp",
        "norm",
        "tiedEmbeddings",
        "dropout",
        "positionEmbedding",
        "maxSequenceLength",
        "extraParameters",
        "qkvBias",
        "family",
    }
    assert set(get(schema, "spec.training")["properties"]) == {
        "method",
        "precision",
        "sequenceLength",
        "globalBatchSize",
        "microBatchSize",
        "activationCheckpointing",
        "sequenceParallel",
        "offload",
        "loraRank",
        "loraTargets",
        "loraAlpha",
        "loraDropout",
        "trainableFraction",
        "learningRate",
    }
    assert set(get(schema, "spec.parallelism")["properties"]) == {"tensor", "pipeline", "zeroStage", "expert"}
    assert set(get(schema, "spec.resources")["properties"]) == {
        "gpus",
        "nodes",
        "gpusPerNode",
        "gpuResource",
        "gpuProduct",
        "gpuMemory",
        "nodeMemory",
        "nodeSelector",
        "tolerations",
    }
    assert set(get(schema, "spec.runPolicy")["properties"]) == {
        "maxRestarts",
        "activeDeadlineSeconds",
        "suspend",
        "ttlSecondsAfterFinished",
        "scheduleTimeoutSeconds",
        "retryableExitCodes",
        "permanentExitCodes",
        "replanOnNodeLoss",
    }
    assert set(get(schema, "spec.monitoring")["properties"]) == {
        "scrapeIntervalSeconds",
        "stragglerThreshold",
        "stragglerSignal",
        "stragglerWindows",
        "stragglerStageThreshold",
        "stragglerPolicy",
        "maxStragglerReplacements",
        "memoryImbalanceThreshold",
    }


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("spec.training.method", ["full", "lora", "qlora", "freeze", "inference"]),
        ("spec.training.precision", ["bf16", "fp16", "bf16-pure", "fp32"]),
        ("spec.training.activationCheckpointing", ["auto", "none", "selective", "full"]),
        ("spec.training.offload", ["auto", "none", "optimizer", "all"]),
        ("spec.model.architecture.mlp", ["swiglu", "gelu"]),
        ("spec.model.architecture.norm", ["rmsnorm", "layernorm"]),
        ("spec.model.architecture.positionEmbedding", ["rope", "learned"]),
        ("spec.monitoring.stragglerSignal", ["Compute", "Step"]),
    ],
)
def test_closed_sets_are_enums(schema: Schema, field: str, values: list[str]) -> None:
    assert get(schema, field)["enum"] == values


@pytest.mark.parametrize(
    ("field", "default"),
    [
        ("spec.training.method", "full"),
        ("spec.training.precision", "bf16"),
        ("spec.training.activationCheckpointing", "auto"),
        ("spec.training.offload", "auto"),
        ("spec.resources.gpuResource", "nvidia.com/gpu"),
        ("spec.runPolicy.maxRestarts", 3),
        ("spec.runPolicy.suspend", False),
        ("spec.runPolicy.scheduleTimeoutSeconds", 300),
        ("spec.runPolicy.replanOnNodeLoss", True),
        ("spec.monitoring.scrapeIntervalSeconds", 15),
        ("spec.monitoring.stragglerThreshold", 0.2),
        ("spec.monitoring.stragglerSignal", "Compute"),
        ("spec.monitoring.stragglerWindows", 3),
        ("spec.monitoring.stragglerStageThreshold", 0.5),
        ("spec.monitoring.stragglerPolicy", "Report"),
        ("spec.monitoring.maxStragglerReplacements", 1),
        ("spec.monitoring.memoryImbalanceThreshold", 0.1),
        # A parent default lets the nested defaults apply when the section is omitted. training's
        # is spelled out: the API server checks a default against the CEL rules of its own node
        # without applying the nested defaults first.
        (
            "spec.training",
            {
                "method": "full",
                "precision": "bf16",
                "activationCheckpointing": "auto",
                "offload": "auto",
            },
        ),
        ("spec.runPolicy", {}),
        ("spec.monitoring", {}),
    ],
)
def test_defaults(schema: Schema, field: str, default: object) -> None:
    assert get(schema, field)["default"] == default


def test_status_shape(schema: Schema) -> None:
    status = get(schema, "status")
    assert {
        "observedGeneration",
        "phase",
        "conditions",
        "layout",
        "restarts",
        "attempt",
        "startTime",
        "completionTime",
        "message",
    } <= set(status["properties"])
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert {
        "tensor",
        "pipeline",
        "data",
        "zeroStage",
        "microBatchSize",
        "gradientAccumulation",
        "activationCheckpointing",
        "sequenceParallel",
        "offload",
        "nodes",
        "gpusPerNode",
        "predictedGpuMemoryBytes",
        "gpuMemoryBytes",
        "summary",
    } <= set(status["properties"]["layout"]["properties"])


def test_printer_columns(version: dict[str, Any]) -> None:
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Layout"]["jsonPath"] == ".status.layout.summary"
    assert columns["Status"]["jsonPath"] == ".status.phase"
    assert columns["Planned"]["jsonPath"] == '.status.conditions[?(@.type=="Planned")].status'
    assert columns["Running"]["jsonPath"] == '.status.conditions[?(@.type=="Running")].status'
    assert columns["GPUs"]["type"] == "integer"
    assert columns["Restarts"]["jsonPath"] == ".status.restarts"
    assert columns["Age"]["type"] == "date"
    for column in version["additionalPrinterColumns"]:
        assert column["jsonPath"].startswith("."), column


def test_reserved_env_names_match_the_contract(schema: Schema) -> None:
    """The CRD rejects at least the torchrun variables the layout contract lists."""
    rule = get(schema, "spec.template.spec.containers")["items"]["properties"]["env"]["items"]["properties"][
        "name"
    ]["x-kubernetes-validations"][0]["rule"]
    contract = Path(__file__).resolve().parents[2] / "docs" / "layout-contract.md"
    text = contract.read_text(encoding="utf-8")
    torchrun_part = text[text.index("Set by torchrun") :]
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR"):
        assert f"`{name}`" in torchrun_part
        assert f"'{name}'" in rule
    for name in ("MASTER_PORT", "TORCHELASTIC_RUN_ID", "ROLE_RANK"):
        assert f"'{name}'" in rule
    assert "startsWith('SHARDWISE_')" in rule


def test_child_name_budget_matches_the_builders(schema: Schema) -> None:
    """The CRD's name limit leaves room for `-node-<index>` in a 63-character DNS label."""
    rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
    assert "size(self.metadata.name) <= 53" in rules
    assert 63 - len("-node-") - len(str(get(schema, "spec.resources.nodes")["maximum"] - 1)) == 53


def test_defaults_are_documented(schema: Schema) -> None:
    """`kubectl explain` does not print defaults, so each description states its own."""

    def shown(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    undocumented = [
        path
        for path, node in walk(schema, "")
        if "default" in node
        and not isinstance(node["default"], dict)
        and f"Default: {shown(node['default'])}." not in node["description"]
    ]
    assert not undocumented, f"defaults not stated in the description: {undocumented}"


def test_every_field_of_job_spec_md_is_in_the_crd(schema: Schema) -> None:
    """docs/job-spec.md is what the CLI and the operator code against; the CRD must know its names."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "job-spec.md").read_text(encoding="utf-8")
    block = text[text.index("```yaml") + len("```yaml") : text.index("```", text.index("```yaml") + 7)]
    doc = yaml.safe_load(block)

    def check(value: object, node: Schema, path: str) -> list[str]:
        if isinstance(value, list):
            return [err for item in value for err in check(item, node.get("items") or {}, f"{path}[]")]
        if not isinstance(value, dict) or "additionalProperties" in node:
            return []
        missing = []
        for key, child in value.items():
            props = node.get("properties") or {}
            if key not in props:
                missing.append(f"{path}.{key}")
            else:
                missing.extend(check(child, props[key], f"{path}.{key}"))
        return missing

    assert check(doc, schema, "") == []


def test_data_formats_and_packing_are_the_trainers(schema: Schema) -> None:
    """The enums the API server checks are the ones the operator's parser (and the trainer) accept."""
    assert tuple(get(schema, "spec.data.format")["enum"]) == DATA_FORMATS
    assert tuple(get(schema, "spec.data.packing")["enum"]) == PACKING
    assert get(schema, "spec.checkpoint.keep")["default"] == 2
    assert get(schema, "spec.checkpoint.keep")["minimum"] == 1
    assert get(schema, "spec.data.evalEvery")["minimum"] == 1
