"""The operator's rendered pods against the trainer's contract module (shardwise_trainer.contract).

The two packages share no code: this test is what keeps them agreeing on env names, file paths,
the ConfigMap keys, the stats port and the variables reserved for torchrun.
"""

from __future__ import annotations

from typing import Any

from shardwise.resources.configmap import build_configmap
from shardwise.resources.names import TRAINER_METRICS_PORT
from shardwise.resources.pods import RESERVED_ENV, RESERVED_ENV_PREFIX, PodShape, build_pod
from shardwise_trainer import contract

JOB: dict[str, Any] = {
    "metadata": {"name": "j", "namespace": "ns", "uid": "u"},
    "spec": {"template": {"spec": {"containers": [{"name": "trainer", "image": "t"}]}}},
}


def pod_env() -> dict[str, Any]:
    pod = build_pod(JOB, PodShape(nodes=2, gpus_per_node=2, attempt=1), 1)
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_the_pod_sets_exactly_the_contract_variables() -> None:
    env = pod_env()
    ours = {name for name in env if name.startswith(RESERVED_ENV_PREFIX)}
    assert ours == set(contract.OPERATOR_ENV)


def test_paths_keys_and_port_agree() -> None:
    env = pod_env()
    assert env[contract.ENV_LAYOUT_FILE] == contract.ENV_DEFAULTS[contract.ENV_LAYOUT_FILE]
    assert env[contract.ENV_DS_CONFIG_FILE] == f"{contract.CONFIG_DIR}/{contract.DS_CONFIG_FILE_NAME}"
    assert env[contract.ENV_NODE_RANK] == "1"
    assert env[contract.ENV_ATTEMPT] == "1"
    assert int(env[contract.ENV_METRICS_PORT]) == TRAINER_METRICS_PORT
    assert env[contract.ENV_POD_IP] == {"fieldRef": {"fieldPath": "status.podIP"}}
    cm = build_configmap(JOB, {"version": contract.LAYOUT_VERSION, "deepspeed": {}})
    assert set(cm["data"]) == {contract.LAYOUT_FILE_NAME, contract.DS_CONFIG_FILE_NAME}


def test_torchrun_variables_are_reserved_on_both_sides() -> None:
    assert set(contract.TORCHRUN_ENV) == set(RESERVED_ENV)
