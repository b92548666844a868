"""The event schema of docs/protocol.md §3, checked locally before anything reaches Redis.

The fields follow the seed's "Message Schema" (TypeScript interfaces). The gateway drops an
invalid event it receives through Redis (it can only log that, the worker never hears of
it), so the library refuses it up front with an :class:`InvalidEvent` naming the field.

Spec language, kept deliberately tiny: a field name ending in ``?`` is optional; a spec is
``"str"``, ``"num"`` (int or float, not bool), ``"obj"`` (any JSON object), ``"list[str]"``,
a ``frozenset`` of allowed strings (an enum), or a ``dict`` (a nested object, same rules).
Extra fields are allowed everywhere, as in the protocol.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Union

from .errors import InvalidEvent

NODE_STATES = frozenset({"idle", "queued", "processing", "completed", "failed"})
LORA_STATUSES = frozenset({"untrained", "training", "completed", "failed"})
AGENT_TYPES = frozenset(
    {"Producer", "Screenwriter", "Art Director", "Casting Director", "Location Scout", "First AD"}
)
FILE_CHANGE_TYPES = frozenset({"modified", "created", "deleted"})

Spec = Union[str, frozenset, dict]

_FILE: dict = {"name": "str", "path": "str", "size": "num", "asset_type": "str"}
_FILE_EVENT: dict = {"file?": _FILE, "file_path?": "str", "change_type?": FILE_CHANGE_TYPES}

SCHEMAS: dict[str, dict[str, Spec]] = {
    # project: global in the seed (EventBroadcaster.project_created): the new project's
    # data rides in "data"; updates carry "changes"
    "project.created": {"data?": "obj"},
    "project.updated": {"changes?": "obj"},
    "project.deleted": {},
    # node
    "node.state.updated": {"node_id": "str", "state": NODE_STATES, "metadata?": "obj"},
    "node.progress.updated": {
        "node_id": "str",
        "progress": "num",
        "step": "str",
        "step_info": {"current": "num", "total": "num", "description": "str"},
        "metadata?": "obj",
    },
    "node.output.ready": {"node_id": "str", "outputs": "obj", "execution_time": "num"},
    "node.error.occurred": {"node_id": "str", "error": "str", "traceback?": "str"},
    # task
    "task.queued": {"task_id": "str", "node_id": "str", "priority": "num"},
    "task.started": {"task_id": "str", "node_id": "str", "runner_id": "str"},
    "task.progress": {
        "task_id": "str",
        "node_id": "str",
        "progress": {
            "percentage": "num",
            "current_step": "num",
            "total_steps": "num",
            "step_description": "str",
        },
        "metadata?": "obj",
    },
    "task.success": {"task_id": "str", "node_id": "str", "result": "obj", "execution_time": "num"},
    "task.failed": {"task_id": "str", "node_id": "str", "error": "str", "traceback?": "str"},
    "task.cancelled": {"task_id": "str", "node_id": "str"},
    # runner
    "runner.assigned": {
        "task_id": "str",
        "runner_id": "str",
        "runner_info": {"capabilities": "list[str]", "resources": "obj"},
    },
    "runner.heartbeat": {
        "runner_id": "str",
        "status": {"active_tasks": "num", "available_memory": "num", "cpu_usage": "num"},
    },
    "runner.completed": {
        "task_id": "str",
        "runner_id": "str",
        "metrics": {"execution_time": "num", "memory_used": "num"},
    },
    # files (one FileEvent interface in the seed, every field optional)
    "file.uploaded": _FILE_EVENT,
    "file.deleted": _FILE_EVENT,
    "file.changed": _FILE_EVENT,
    # global in the seed (EventBroadcaster.workspace_changed): workspace_id and changes
    "workspace.changed": {"workspace_id": "str", "changes": "obj"},
    # creative agents
    "agent.task.assigned": {"agent_type": AGENT_TYPES, "task_id": "str", "task_description": "str"},
    "agent.task.progress": {
        "agent_type": "str",
        "task_id": "str",
        "progress": "num",
        "message": "str",
    },
    "agent.task.completed": {
        "agent_type": "str",
        "task_id": "str",
        "output": {"asset_type?": "str", "asset_ids?": "list[str]", "document_path?": "str"},
    },
    # takes
    "take.created": {
        "node_id": "str",
        "take_info": {
            "take_id": "str",
            "take_number": "num",
            "path": "str",
            "chapter": "str",
            "scene": "str",
            "shot": "str",
            "metadata": "obj",
        },
    },
    "take.selected": {"node_id": "str", "take_id": "str"},
    # characters
    "character.created": {
        "character": {"assetId": "str", "name": "str", "description": "str", "triggerWord": "str"}
    },
    "character.updated": {"char_id": "str", "updates": "obj"},
    "character.baseFace.uploaded": {"char_id": "str", "image_path": "str"},
    "character.variation.generated": {
        "char_id": "str",
        "variation_type": "str",
        "image_path": "str",
    },
    "character.lora.status": {"char_id": "str", "status": LORA_STATUSES, "progress?": "num"},
    "character.usage.updated": {"char_id": "str", "usage": "list[str]"},
}


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(path: str, value: Any, spec: Spec) -> None:
    if isinstance(spec, frozenset):
        if not isinstance(value, str) or value not in spec:
            allowed = ", ".join(sorted(spec))
            raise InvalidEvent(f"{path}: {value!r} is not one of: {allowed}")
    elif isinstance(spec, dict):
        if not isinstance(value, Mapping):
            raise InvalidEvent(f"{path}: expected an object, got {type(value).__name__}")
        check_fields(path + ".", value, spec)
    elif spec == "str":
        if not isinstance(value, str):
            raise InvalidEvent(f"{path}: expected a string, got {type(value).__name__}")
    elif spec == "num":
        if not _is_num(value):
            raise InvalidEvent(f"{path}: expected a finite number, got {value!r}")
    elif spec == "obj":
        if not isinstance(value, Mapping):
            raise InvalidEvent(f"{path}: expected an object, got {type(value).__name__}")
    elif spec == "list[str]":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InvalidEvent(f"{path}: expected a list of strings, got {value!r}")
    else:  # pragma: no cover - a typo in SCHEMAS
        raise AssertionError(f"unknown spec {spec!r}")


def check_fields(prefix: str, obj: Mapping[str, Any], fields: Mapping[str, Spec]) -> None:
    """Raise InvalidEvent unless obj has every required field with the right type."""
    for key, spec in fields.items():
        optional = key.endswith("?")
        name = key[:-1] if optional else key
        if name not in obj:
            if optional:
                continue
            raise InvalidEvent(f"{prefix}{name}: required field is missing")
        _check(prefix + name, obj[name], spec)


# Sent to every connection, not to one project: published with ``broadcast`` (the gateway
# drops them on a project channel). As the seed's EventBroadcaster sends them.
GLOBAL_TYPES = frozenset({"project.created", "workspace.changed"})


def optional_fields(kind: str) -> frozenset:
    """Top-level optional fields of a type (null there means absent and is dropped)."""
    return frozenset(k[:-1] for k in SCHEMAS.get(kind, {}) if k.endswith("?"))


def validate(event: Mapping[str, Any]) -> None:
    """Check a complete event against its type's schema (unknown types: envelope only).

    Unknown types are let through because the gateway can be configured to accept them
    (``events.allow_unknown_types``); by default it drops them.
    """
    schema = SCHEMAS.get(event["type"])
    if schema is not None:
        check_fields("", event, schema)
