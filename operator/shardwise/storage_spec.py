"""spec.model.path / data / output / checkpoint -> typed mounts and contract env values; pure, no I/O."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from shardwise.planner.errors import PlanInputError

#: Where each role's volume is mounted in the trainer container (docs/crd.md "Volumes and paths").
MOUNT_ROOT: Final = "/shardwise"
ROLES: Final = ("model", "data", "output", "checkpoint")
#: Formats and packing policies the trainer accepts (shardwise_trainer/data/source.py, packing.py).
DATA_FORMATS: Final = ("auto", "alpaca", "sharegpt", "messages", "text", "tokens")
PACKING: Final = ("pack", "pad")
DEFAULT_KEEP: Final = 2

_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DOTDOT = re.compile(r"(^|/)\.\.(/|$)")


class StorageSpecError(PlanInputError):
    """A model / data / output / checkpoint value is invalid; the message names the field."""


@dataclass(frozen=True)
class VolumeRef:
    """A role's volume: a PVC by claim name, or a volume of the pod template by name."""

    role: str
    claim_name: str | None
    template_name: str | None
    read_only: bool
    sub_path: str | None

    @property
    def mount_path(self) -> str:
        """The deterministic mount path of the role's volume in the trainer container."""
        return f"{MOUNT_ROOT}/{self.role}"


@dataclass(frozen=True)
class Located:
    """A path of the spec and, when it lives on a volume, that volume."""

    path: str
    volume: VolumeRef | None

    @property
    def container_path(self) -> str:
        """What the trainer sees: ``<mountPath><path>`` on a volume, else the path itself."""
        if self.volume is None:
            return self.path
        return posixpath.normpath(self.volume.mount_path + "/" + self.path.lstrip("/"))


@dataclass(frozen=True)
class DataSpec:
    """spec.data."""

    file: Located
    format: str = "auto"
    packing: str = "pack"
    validation_file: Located | None = None
    validation_fraction: float = 0.0
    eval_every: int = 0
    chat_template: Located | None = None


@dataclass(frozen=True)
class CheckpointSpec:
    """spec.checkpoint."""

    dir: Located
    every_steps: int = 0
    every_minutes: float = 0.0
    keep: int = DEFAULT_KEEP


@dataclass(frozen=True)
class StorageSpec:
    """Everything of the spec that names files the trainer reads or writes."""

    model: Located | None = None
    trust_remote_code: bool = False
    data: DataSpec | None = None
    output: Located | None = None
    checkpoint: CheckpointSpec | None = None

    def volumes(self) -> tuple[VolumeRef, ...]:
        """Each role's volume, in ROLES order."""
        located: list[Located | None] = [
            self.model,
            self.data.file if self.data else None,
            self.output,
            self.checkpoint.dir if self.checkpoint else None,
        ]
        return tuple(loc.volume for loc in located if loc is not None and loc.volume is not None)

    def env(self) -> dict[str, str]:
        """The contract variables these fields fill; unset fields give the contract default."""
        data, ckpt = self.data, self.checkpoint
        return {
            "SHARDWISE_HF_MODEL": self.model.container_path if self.model else "",
            "SHARDWISE_TRUST_REMOTE_CODE": "true" if self.trust_remote_code else "false",
            "SHARDWISE_DATA": data.file.container_path if data else "",
            "SHARDWISE_DATA_FORMAT": data.format if data else "auto",
            "SHARDWISE_PACKING": data.packing if data else "pack",
            "SHARDWISE_VALIDATION_DATA": (
                data.validation_file.container_path if data and data.validation_file else ""
            ),
            "SHARDWISE_VALIDATION_FRACTION": _number(data.validation_fraction if data else 0.0),
            "SHARDWISE_EVAL_EVERY": str(data.eval_every if data else 0),
            "SHARDWISE_CHAT_TEMPLATE": (
                data.chat_template.container_path if data and data.chat_template else ""
            ),
            "SHARDWISE_OUTPUT_DIR": self.output.container_path if self.output else "",
            "SHARDWISE_CHECKPOINT_DIR": ckpt.dir.container_path if ckpt else "",
            "SHARDWISE_CHECKPOINT_EVERY": str(ckpt.every_steps if ckpt else 0),
            "SHARDWISE_CHECKPOINT_EVERY_MINUTES": _number(ckpt.every_minutes if ckpt else 0.0),
            "SHARDWISE_CHECKPOINT_KEEP": str(ckpt.keep if ckpt else DEFAULT_KEEP),
        }


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise StorageSpecError(f"{where}: expected a mapping, got {value!r}")
    return cast(Mapping[str, Any], value)


def _path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or _DOTDOT.search(value) or len(value) > 4096:
        raise StorageSpecError(
            f"{where} must be an absolute path (starting with /) without .. segments, got {value!r}"
        )
    return value


def _volume(value: Any, role: str, template_volumes: frozenset[str]) -> VolumeRef | None:
    if value is None:
        return None
    where = f"spec.{role}.volume"
    vol = _mapping(value, where)
    claim, name = vol.get("claimName"), vol.get("name")
    if (claim is None) == (name is None):
        raise StorageSpecError(f"{where} takes exactly one of claimName or name")
    if claim is not None and (not isinstance(claim, str) or len(claim) > 253 or not _CLAIM.match(claim)):
        raise StorageSpecError(f"{where}.claimName: expected a PersistentVolumeClaim name, got {claim!r}")
    if name is not None:
        if not isinstance(name, str) or len(name) > 63 or not _LABEL.match(name):
            raise StorageSpecError(f"{where}.name: expected a volume name, got {name!r}")
        if name not in template_volumes:
            raise StorageSpecError(
                f"{where}.name {name} is not a volume of spec.template.spec.volumes"
                " (give it there, or use claimName)"
            )
    sub = vol.get("subPath")
    if sub is not None and (
        not isinstance(sub, str) or not sub or sub.startswith("/") or _DOTDOT.search(sub)
    ):
        raise StorageSpecError(f"{where}.subPath must be a relative path without .. segments, got {sub!r}")
    writable = role in ("output", "checkpoint")
    read_only = vol.get("readOnly")
    if read_only is not None and not isinstance(read_only, bool):
        raise StorageSpecError(f"{where}.readOnly: expected true or false, got {read_only!r}")
    if writable and read_only:
        raise StorageSpecError(f"{where}.readOnly must be false: the trainer writes to it")
    return VolumeRef(
        role=role,
        claim_name=claim,
        template_name=name,
        read_only=(not writable) if read_only is None else read_only,
        sub_path=sub,
    )


def _int(section: Mapping[str, Any], key: str, where: str, minimum: int, maximum: int) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise StorageSpecError(f"{where}.{key}: expected an integer in [{minimum}, {maximum}], got {value!r}")
    return value


def _data(data: Mapping[str, Any], template_volumes: frozenset[str]) -> DataSpec:
    where = "spec.data"
    volume = _volume(data.get("volume"), "data", template_volumes)
    if data.get("path") is None:
        raise StorageSpecError(f"{where}.path: required (the data file)")
    fmt = data.get("format", "auto")
    if fmt not in DATA_FORMATS:
        raise StorageSpecError(f"{where}.format: expected one of {', '.join(DATA_FORMATS)}, got {fmt!r}")
    packing = data.get("packing", "pack")
    if packing not in PACKING:
        raise StorageSpecError(f"{where}.packing: expected one of {', '.join(PACKING)}, got {packing!r}")
    validation_file, fraction = None, 0.0
    if data.get("validation") is not None:
        val = _mapping(data["validation"], f"{where}.validation")
        if (val.get("path") is None) == (val.get("fraction") is None):
            raise StorageSpecError(f"{where}.validation takes exactly one of path or fraction")
        if val.get("path") is not None:
            validation_file = Located(_path(val["path"], f"{where}.validation.path"), volume)
        else:
            value = val["fraction"]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
                raise StorageSpecError(
                    f"{where}.validation.fraction: expected 0 < fraction < 1, got {value!r}"
                )
            fraction = float(value)
    eval_every = _int(data, "evalEvery", where, 1, 1_000_000_000)
    if eval_every is not None and data.get("validation") is None:
        raise StorageSpecError(f"{where}.evalEvery needs {where}.validation (there is nothing to evaluate)")
    template = data.get("chatTemplate")
    return DataSpec(
        file=Located(_path(data["path"], f"{where}.path"), volume),
        format=cast(str, fmt),
        packing=cast(str, packing),
        validation_file=validation_file,
        validation_fraction=fraction,
        eval_every=eval_every or 0,
        chat_template=None if template is None else Located(_path(template, f"{where}.chatTemplate"), volume),
    )


def _checkpoint(ckpt: Mapping[str, Any], template_volumes: frozenset[str]) -> CheckpointSpec:
    where = "spec.checkpoint"
    volume = _volume(ckpt.get("volume"), "checkpoint", template_volumes)
    if ckpt.get("path") is None:
        raise StorageSpecError(f"{where}.path: required (the checkpoint directory)")
    minutes = ckpt.get("everyMinutes")
    if minutes is not None and (
        isinstance(minutes, bool) or not isinstance(minutes, int | float) or not 0 < minutes <= 1_000_000
    ):
        raise StorageSpecError(f"{where}.everyMinutes: expected a number in (0, 1000000], got {minutes!r}")
    return CheckpointSpec(
        dir=Located(_path(ckpt["path"], f"{where}.path"), volume),
        every_steps=_int(ckpt, "everySteps", where, 1, 1_000_000_000) or 0,
        every_minutes=float(minutes or 0.0),
        keep=_int(ckpt, "keep", where, 1, 1000) or DEFAULT_KEEP,
    )


def template_volume_names(spec: Mapping[str, Any]) -> frozenset[str]:
    """Names of the volumes in spec.template.spec.volumes."""
    template = spec.get("template") or {}
    pod_spec = template.get("spec") or {} if isinstance(template, Mapping) else {}
    volumes = pod_spec.get("volumes") or [] if isinstance(pod_spec, Mapping) else []
    return frozenset(str(v.get("name")) for v in volumes if isinstance(v, Mapping) and v.get("name"))


def storage_from_spec(spec: Mapping[str, Any]) -> StorageSpec:
    """Parse spec.model.path / trustRemoteCode / volume, spec.data, spec.output and spec.checkpoint.

    The same rules as the CRD's schema and CEL, so `shardwise plan` and the API server agree.
    """
    names = template_volume_names(spec)
    model = spec.get("model") or {}
    model = _mapping(model, "spec.model")
    model_volume = _volume(model.get("volume"), "model", names)
    if model_volume is not None and model.get("path") is None:
        raise StorageSpecError("spec.model.volume needs spec.model.path (the model directory inside it)")
    trust = model.get("trustRemoteCode", False)
    if not isinstance(trust, bool):
        raise StorageSpecError(f"spec.model.trustRemoteCode: expected true or false, got {trust!r}")
    output = None
    if spec.get("output") is not None:
        out = _mapping(spec["output"], "spec.output")
        out_volume = _volume(out.get("volume"), "output", names)
        if out.get("path") is None:
            raise StorageSpecError("spec.output.path: required (the output directory)")
        output = Located(_path(out["path"], "spec.output.path"), out_volume)
    return StorageSpec(
        model=None
        if model.get("path") is None
        else Located(_path(model["path"], "spec.model.path"), model_volume),
        trust_remote_code=trust,
        data=None if spec.get("data") is None else _data(_mapping(spec["data"], "spec.data"), names),
        output=output,
        checkpoint=None
        if spec.get("checkpoint") is None
        else _checkpoint(_mapping(spec["checkpoint"], "spec.checkpoint"), names),
    )
