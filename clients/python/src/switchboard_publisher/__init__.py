"""Switchboard publisher: publish events from Python workers to Switchboard through Redis.

Every event goes through the gateway's own ``publish.lua`` (shipped in this package), so it
gets a per-project ``seq``, lands in the replayable history and updates the status snapshot.
On one Redis, behind Sentinel or on a Redis Cluster (``cluster_nodes=``, ``cluster=True`` or a
``redis.cluster.RedisCluster`` client: hash-tagged keys, docs/protocol.md §11).
"""

from .errors import InvalidEvent, PublishError, SwitchboardError
from .publisher import FunctionRunnerEventPublisher, load_script, now_rfc3339
from .schema import AGENT_TYPES, FILE_CHANGE_TYPES, LORA_STATUSES, NODE_STATES

__all__ = [
    "FunctionRunnerEventPublisher",
    "PublishError",
    "InvalidEvent",
    "SwitchboardError",
    "load_script",
    "now_rfc3339",
    "NODE_STATES",
    "LORA_STATUSES",
    "AGENT_TYPES",
    "FILE_CHANGE_TYPES",
]
