"""The `<job>-layout` ConfigMap: the planned layout.json and the DeepSpeed config the trainer reads."""

from __future__ import annotations

import json
from typing import Any

from shardwise.resources.names import DS_CONFIG_FILE_KEY, LAYOUT_FILE_KEY, configmap_name
from shardwise.resources.owner import child_metadata


def build_configmap(job: dict[str, Any], layout_document: dict[str, Any]) -> dict[str, Any]:
    """ConfigMap with layout.json and ds_config.json (the latter is layout_document["deepspeed"]).

    Keys are sorted so that the same plan always renders byte-identical data, which keeps
    create-or-patch a no-op when nothing changed.
    """
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(job, configmap_name(job["metadata"]["name"]), "layout"),
        "data": {
            LAYOUT_FILE_KEY: json.dumps(layout_document, indent=2, sort_keys=True) + "\n",
            DS_CONFIG_FILE_KEY: json.dumps(layout_document["deepspeed"], indent=2, sort_keys=True) + "\n",
        },
    }
