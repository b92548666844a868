"""FunctionRunnerEventPublisher: the seed's worker-side publisher, done through the gateway's
publish script so every event gets a seq, lands in history and updates the status state.

The seed's version PUBLISHed raw JSON to ``project:{id}:events``. Such events reach live
clients but have no ``seq``, so a reconnecting browser can neither replay nor detect them as
missed. Here every publish runs ``publish.lua`` (the one script the gateway itself uses,
shipped inside this package) which atomically assigns the seq, appends to the history
stream, updates ``project:{id}:state`` and PUBLISHes.

On a Redis Cluster (the gateway run with ``REDIS_CLUSTER_NODES``, docs/protocol.md §11) the
keys are hash-tagged per project (``project:{<id>}:seq``, ...) so the script's keys share a
slot, and the live channel ``project:{<id>}:events`` is a sharded one (the script SPUBLISHes
it). Pass a ``redis.cluster.RedisCluster`` client, ``cluster_nodes=[...]`` or ``cluster=True``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from . import schema
from .errors import InvalidEvent, PublishError

log = logging.getLogger(__name__)

_PROJECT_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")

# What a Redis failure can raise: RedisClusterException (no reachable seed node, keys in
# several slots) is not a RedisError.
_REDIS_ERRORS = (RedisError, RedisClusterException)

#: The statuses of seed 003's story progress messages.
STORY_STATUSES = ("analyzing", "generating", "synthesizing", "complete", "failed")


def load_script() -> bytes:
    """The bytes of the packaged ``publish.lua`` (identical to the gateway's copy)."""
    return resources.files(__package__).joinpath("publish.lua").read_bytes()


def now_rfc3339() -> str:
    """Current UTC time as RFC 3339 with millisecond precision and ``Z`` (docs/protocol.md §3)."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _check_project_id(project_id: str) -> None:
    # Same rule as the gateway's URL check: an event for another id can never be received.
    if not isinstance(project_id, str) or not _PROJECT_ID.fullmatch(project_id):
        raise InvalidEvent(f"project_id {project_id!r} must match [A-Za-z0-9_.-]{{1,128}}")
    if project_id == "user":
        raise InvalidEvent("project_id 'user' is reserved (it names the /ws/user stream)")


def _checked_json(event: dict[str, Any], kind: str, where: str) -> bytes:
    """The event checked against the protocol's schema, as compact UTF-8 JSON; raises
    InvalidEvent (prefixed with ``where`` and the type) naming what is wrong."""
    try:
        schema.validate(event)
    except InvalidEvent as e:
        raise InvalidEvent(f"{where}{kind}: {e}") from None
    try:
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:  # unserialisable value, NaN, lone surrogate
        raise InvalidEvent(f"{where}{kind}: not JSON-serialisable: {e}") from e
    return text.encode("utf-8")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cluster_nodes(nodes: str | Iterable[str | tuple[str, int]]) -> list[ClusterNode]:
    """Seed nodes as ``"host:port,host:port"`` (``REDIS_CLUSTER_NODES``' form), or a list of
    ``"host:port"`` strings or ``(host, port)`` pairs."""
    if isinstance(nodes, str):
        nodes = [n for n in nodes.split(",") if n.strip()]
    out = []
    for node in nodes:
        if isinstance(node, str):
            host, sep, port = node.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"cluster node {node!r} must be host:port")
            out.append(ClusterNode(host.strip("[]"), int(port)))
        else:
            host, port = node
            out.append(ClusterNode(host, int(port)))
    if not out:
        raise ValueError("cluster_nodes is empty")
    return out


class FunctionRunnerEventPublisher:
    """Publishes a function runner's events to Switchboard through Redis.

    Every method validates locally (raising :class:`InvalidEvent` before anything is sent),
    then publishes with one atomic script call and returns the seq (or seqs) assigned.
    Redis failures raise :class:`PublishError` with the ``redis`` exception chained.

    The object is thread-safe as long as the Redis client is (the default one is).

    Where Redis is, one of:

    - ``redis_url`` (default ``redis://localhost:6379``): one Redis server;
    - ``redis_client``: a client of your own; a ``redis.cluster.RedisCluster`` means a
      cluster (detected), anything else one server;
    - ``cluster_nodes``: a Redis Cluster's seed nodes, ``"host:port,host:port"`` (the
      gateway's ``REDIS_CLUSTER_NODES``) or a list of ``"host:port"`` / ``(host, port)``;
    - ``redis_url`` with ``cluster=True``: a cluster reached through that one seed node.

    ``cluster=True`` also forces cluster key names with a plain client (a proxy presenting a
    cluster as one server). A cluster client built here connects at the first call, so a
    cluster that is down raises :class:`PublishError` then, not here.
    """

    def __init__(
        self,
        runner_id: str,
        redis_url: str | None = None,
        *,
        redis_client: redis.Redis | RedisCluster | None = None,
        cluster: bool | None = None,
        cluster_nodes: str | Iterable[str | tuple[str, int]] | None = None,
        history_max_len: int = 10000,
        history_ttl_secs: int = 86400,
        terminal_task_ttl_secs: int = 3600,
        broadcast_channel: str = "websocket:broadcast",
    ) -> None:
        if not isinstance(runner_id, str) or not runner_id:
            raise ValueError("runner_id must be a non-empty string")
        self.runner_id = runner_id
        # Bounded timeouts: a worker must get an error, not hang, when Redis is unreachable.
        timeouts = {"socket_connect_timeout": 5.0, "socket_timeout": 10.0}
        self._client: redis.Redis | RedisCluster | None = None
        self._connect: Callable[[], Any] | None = None
        self._connect_lock = threading.Lock()
        if cluster_nodes is not None:
            if redis_client is not None or redis_url is not None:
                raise ValueError("give one of redis_url, redis_client and cluster_nodes")
            if cluster is False:
                raise ValueError("cluster_nodes names a cluster: cluster=False contradicts it")
            seeds = _cluster_nodes(cluster_nodes)
            self._connect = lambda: RedisCluster(startup_nodes=seeds, **timeouts)
            cluster = True
        elif redis_client is not None:
            detected = isinstance(redis_client, RedisCluster)
            if cluster is False and detected:
                raise ValueError(
                    "a RedisCluster client needs cluster key names: cluster=False contradicts it"
                )
            self._client = redis_client
            cluster = detected if cluster is None else cluster
        else:
            url = "redis://localhost:6379" if redis_url is None else redis_url
            if cluster:
                # RedisCluster connects (reads the slot map) when built: at the first call.
                self._connect = lambda: RedisCluster.from_url(url, **timeouts)
            else:
                self._client = redis.Redis.from_url(url, **timeouts)
                cluster = False
        #: Whether key names are hash-tagged for a Redis Cluster (docs/protocol.md §11).
        self.cluster: bool = bool(cluster)
        # These must match the gateway's [history] settings, or publishers and gateway
        # would trim history and age out finished tasks differently.
        self.history_max_len = int(history_max_len)
        self.history_ttl_secs = int(history_ttl_secs)
        self.terminal_task_ttl_ms = int(terminal_task_ttl_secs) * 1000
        # The gateway's global channel (its REDIS_CHANNEL, as in the seed).
        self.broadcast_channel = broadcast_channel
        self._script = load_script()
        self._sha: str | None = None
        self._story_script = resources.files(__package__).joinpath("story.lua").read_bytes()
        self._story_sha: str | None = None

    @property
    def _redis(self) -> Any:
        """The Redis client; a cluster client is built (and connects) at its first use."""
        client = self._client
        if client is None:
            with self._connect_lock:
                if self._client is None:
                    assert self._connect is not None
                    self._client = self._connect()
                client = self._client
        return client

    def close(self) -> None:
        """Close the Redis client's connections (also one passed as ``redis_client``)."""
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------------ key names

    def project_key(self, project_id: str, suffix: str) -> str:
        """A project's key or channel: ``project:<id>:<suffix>``, or on a cluster
        ``project:{<id>}:<suffix>`` (hash-tagged, so one project's keys share a slot)."""
        if self.cluster:
            return f"project:{{{project_id}}}:{suffix}"
        return f"project:{project_id}:{suffix}"

    def story_progress_key(self, story_id: str) -> str:
        """Where a story's latest progress is kept: ``story:<id>:progress``, or on a cluster
        ``story:{<id>}:progress``."""
        if self.cluster:
            return f"story:{{{story_id}}}:progress"
        return f"story:{story_id}:progress"

    # ------------------------------------------------------------------ core publishing

    def publish_event(self, project_id: str, event: Mapping[str, Any]) -> int:
        """Publish one event to ``project_id`` and return its seq.

        ``event`` needs a ``type``; ``project_id``, ``timestamp`` (now, unless given) and
        ``runner_id`` (this runner, unless given) are filled in. The caller's dict is not
        modified. Events of a known type are checked against the protocol's schema.
        """
        return self.publish_events(project_id, [event])[0]

    def publish_events(self, project_id: str, events: Sequence[Mapping[str, Any]]) -> list[int]:
        """Publish several events in one script call: all get consecutive seqs, or none is
        published (every event is validated before Redis sees any of them)."""
        _check_project_id(project_id)
        if isinstance(events, Mapping):
            raise InvalidEvent("publish_events takes a list of events, not one event")
        batch = len(events) > 1
        payloads = [
            self._encode(project_id, ev, f"event {i}: " if batch else "")
            for i, ev in enumerate(events)
        ]
        if not payloads:
            return []
        _, seqs, _ = self._run(project_id, payloads)
        return [int(s) for s in seqs]

    def _encode(self, project_id: str, event: Mapping[str, Any], where: str) -> bytes:
        if not isinstance(event, Mapping):
            raise InvalidEvent(f"{where}an event must be a dict, got {type(event).__name__}")
        kind = event.get("type")
        if not isinstance(kind, str) or not kind:
            raise InvalidEvent(f"{where}type: required non-empty string")
        if "seq" in event:
            raise InvalidEvent(f"{where}seq: assigned by the publish script, do not set it")
        if kind in schema.GLOBAL_TYPES:
            raise InvalidEvent(
                f"{where}type: {kind} is a global event (it goes to every connection):"
                " publish it with broadcast()"
            )
        if event.get("project_id", project_id) != project_id:
            # The gateway routes by channel and drops events naming another project.
            raise InvalidEvent(
                f"{where}project_id: the event says {event['project_id']!r}"
                f" but is published to {project_id!r}"
            )
        optional = schema.optional_fields(kind)
        # type first, envelope next, then the payload: readable in redis-cli and logs.
        out: dict[str, Any] = {"type": kind, "project_id": project_id}
        out.update((k, v) for k, v in event.items() if not (v is None and k in optional))
        if out.get("timestamp") is None:
            out["timestamp"] = now_rfc3339()
        if out.get("runner_id") is None:
            out["runner_id"] = self.runner_id
        for field in ("timestamp", "runner_id"):
            if not isinstance(out[field], str):
                raise InvalidEvent(f"{where}{field}: expected a string")
        return _checked_json(out, kind, where)

    def _run(self, project_id: str, payloads: list[bytes]) -> tuple[str, list[int], int]:
        # On a cluster all five are hash-tagged (one slot), and the tagged events channel
        # makes the script SPUBLISH (sharded pub/sub, where the gateway listens).
        keys = [
            self.project_key(project_id, "seq"),
            self.project_key(project_id, "history"),
            self.project_key(project_id, "events"),
            self.project_key(project_id, "state"),
            self.project_key(project_id, "state:terminal"),
        ]
        args: list[Any] = [
            secrets.token_hex(8),  # epoch, used only if the project has none yet
            self.history_max_len,
            self.history_ttl_secs,
            int(time.time() * 1000),
            self.terminal_task_ttl_ms,
            *payloads,
        ]
        try:
            if self._sha is None:
                self._sha = _text(self._redis.script_load(self._script))
            try:
                reply = self._redis.evalsha(self._sha, len(keys), *keys, *args)
            except NoScriptError:
                # Redis restarted or SCRIPT FLUSH (on a cluster also: a replica promoted, a
                # node added): load again, retry once. Safe, because a NOSCRIPT reply means
                # nothing ran. A cluster client loads on every primary.
                self._sha = _text(self._redis.script_load(self._script))
                reply = self._redis.evalsha(self._sha, len(keys), *keys, *args)
        except _REDIS_ERRORS as e:
            raise PublishError(f"publishing to project {project_id!r} failed: {e}") from e
        epoch, seqs, last = reply
        return _text(epoch), [int(s) for s in seqs], int(last)

    # ------------------------------------------------------------------ story progress

    def story_progress(
        self,
        story_id: str,
        status: str,
        progress_percent: float,
        current_step: str,
        *,
        updated_at: str | None = None,
        progress_ttl_secs: int = 86400,
    ) -> int:
        """Publish a Code Story progress update (docs/protocol.md §9) and return how many
        gateway instances received it.

        The message is seed 003's own object (``story_id``, ``status``,
        ``progress_percent``, ``current_step``, ``updated_at``), stored as the story's latest
        progress (``story:<id>:progress``, on a cluster ``story:{<id>}:progress``, so a
        socket that connects later starts from it) and PUBLISHed on ``story:<id>`` in one
        atomic script call (``story.lua``, the gateway's own). ``progress_ttl_secs`` must
        match the gateway's ``stories.progress_ttl_secs``. On a cluster the count is of the
        gateway instances subscribed through the node that ran the script (a classic PUBLISH
        reaches every node, but each node counts only its own subscribers).
        """
        if not isinstance(story_id, str) or not _PROJECT_ID.fullmatch(story_id):
            raise InvalidEvent(f"story_id {story_id!r} must match [A-Za-z0-9_.-]{{1,128}}")
        if status not in STORY_STATUSES:
            raise InvalidEvent(f"status {status!r} must be one of {', '.join(STORY_STATUSES)}")
        if (
            isinstance(progress_percent, bool)
            or not isinstance(progress_percent, (int, float))
            or not 0 <= progress_percent <= 100
        ):
            raise InvalidEvent(f"progress_percent {progress_percent!r} must be a number from 0 to 100")
        if not isinstance(current_step, str):
            raise InvalidEvent("current_step must be a string")
        message = {
            "story_id": story_id,
            "status": status,
            "progress_percent": progress_percent,
            "current_step": current_step,
            "updated_at": updated_at or datetime.now(timezone.utc).isoformat(),
        }
        payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        # One key; the channel is ARGV[5]: on a cluster it is in another slot than the key,
        # and a classic PUBLISH needs no key.
        keys = [self.story_progress_key(story_id)]
        args = [payload, int(progress_ttl_secs), "publish", "", f"story:{story_id}"]
        try:
            if self._story_sha is None:
                self._story_sha = _text(self._redis.script_load(self._story_script))
            try:
                reply = self._redis.evalsha(self._story_sha, len(keys), *keys, *args)
            except NoScriptError:
                self._story_sha = _text(self._redis.script_load(self._story_script))
                reply = self._redis.evalsha(self._story_sha, len(keys), *keys, *args)
        except _REDIS_ERRORS as e:
            raise PublishError(f"publishing progress of story {story_id!r} failed: {e}") from e
        return int(reply)

    # ------------------------------------------------------------------ commands

    def commands(self, project_id: str, timeout: float | None = None) -> Iterator[dict]:
        """Commands the gateway relays from browsers for this project, as dicts
        (``{"type": "execute_node" | "cancel_task", ...}``, docs/protocol.md §4).

        The subscription is active when this method returns (not at the first ``next``), so
        a command sent right after it is not lost and the sender's ``delivered_to`` counts
        this worker. Pub/sub has no history: commands sent while no worker listens are gone.
        The generator ends after ``timeout`` seconds without a command (None: never); close
        it (or let it end) to drop the subscription.

        It subscribes the classic channel ``project:<id>:commands`` (never hash-tagged), also
        on a cluster: there the gateway PUBLISHes every command on it too (besides the
        sharded ``project:{<id>}:commands``), and a classic PUBLISH reaches every node. A
        ``RedisCluster`` client subscribes through the primary of the project's slot, where
        the gateway's command script runs, so the sender's ``delivered_to`` counts this
        worker (a node counts only its own subscribers); after the slot moves commands still
        arrive, but are no longer counted.
        """
        _check_project_id(project_id)
        channel = f"project:{project_id}:commands"
        try:
            client = self._redis
            if isinstance(client, RedisCluster):
                node = client.get_node_from_key(self.project_key(project_id, "commands"))
                pubsub = client.pubsub(node=node)
            else:
                pubsub = client.pubsub()
        except _REDIS_ERRORS as e:  # a cluster client connecting now
            raise PublishError(f"subscribing to {channel} failed: {e}") from e
        try:
            pubsub.subscribe(channel)
            deadline = time.monotonic() + 10.0
            while True:  # wait for Redis to confirm the subscription
                msg = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if msg is not None and msg["type"] in ("subscribe", b"subscribe"):
                    break
                if time.monotonic() >= deadline:
                    raise PublishError(f"no confirmation subscribing to {channel}")
        except _REDIS_ERRORS as e:
            pubsub.close()
            raise PublishError(f"subscribing to {channel} failed: {e}") from e
        except BaseException:
            pubsub.close()
            raise
        return self._command_stream(pubsub, channel, timeout)

    @staticmethod
    def _command_stream(pubsub: Any, channel: str, timeout: float | None) -> Iterator[dict]:
        try:
            idle_since = time.monotonic()
            while True:
                wait = 1.0
                if timeout is not None:
                    left = idle_since + timeout - time.monotonic()
                    if left <= 0:
                        return
                    wait = min(wait, left)
                try:
                    msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                except _REDIS_ERRORS as e:
                    raise PublishError(f"reading commands from {channel} failed: {e}") from e
                if msg is None or _text(msg["type"]) != "message":
                    continue
                try:
                    command = json.loads(msg["data"])
                except ValueError:
                    log.warning("ignoring a non-JSON message on %s", channel)
                    continue
                if not isinstance(command, dict):
                    log.warning("ignoring a non-object message on %s", channel)
                    continue
                idle_since = time.monotonic()
                yield command
        finally:
            pubsub.close()

    # ------------------------------------------------------------------ project events

    def broadcast(self, event: Mapping[str, Any]) -> int:
        """Publish a global event on the gateway's global channel, as the seed's
        ``EventBroadcaster`` does; returns how many gateway instances received it.

        Global types (``project.created``, ``workspace.changed``) reach every connection;
        another type naming a ``project_id`` reaches that project's connections only, and
        without one every connection. Global events have no seq and are not replayed.
        On a cluster it is a classic PUBLISH too (it reaches every node); the count is then of
        the instances subscribed through the node that received it.
        """
        if not isinstance(event, Mapping):
            raise InvalidEvent(f"an event must be a dict, got {type(event).__name__}")
        kind = event.get("type")
        if not isinstance(kind, str) or not kind:
            raise InvalidEvent("type: required non-empty string")
        if "seq" in event:
            raise InvalidEvent("seq: global events have no seq")
        project_id = event.get("project_id")
        if project_id is not None:
            _check_project_id(project_id)
        optional = schema.optional_fields(kind)
        out: dict[str, Any] = {"type": kind}
        out.update((k, v) for k, v in event.items() if not (v is None and k in optional))
        if out.get("project_id") is None:
            out.pop("project_id", None)
        if out.get("timestamp") is None:
            out["timestamp"] = now_rfc3339()
        payload = _checked_json(out, kind, "")
        try:
            return int(self._redis.publish(self.broadcast_channel, payload))
        except _REDIS_ERRORS as e:
            raise PublishError(f"broadcast of {kind} failed: {e}") from e

    def project_created(self, project_id: str, project_data: dict | None = None) -> int:
        """A project was created: a global event (every connection hears of it, as in the
        seed), ``data`` carrying the project; returns the gateway instances reached."""
        _check_project_id(project_id)
        return self.broadcast(
            {"type": "project.created", "project_id": project_id, "data": project_data}
        )

    def project_updated(self, project_id: str, changes: dict | None = None) -> int:
        """A project's settings changed; ``changes`` carries what changed."""
        return self.publish_event(project_id, {"type": "project.updated", "changes": changes})

    def project_deleted(self, project_id: str) -> int:
        """A project was deleted (its clients may want to leave)."""
        return self.publish_event(project_id, {"type": "project.deleted"})

    # ------------------------------------------------------------------ node events

    def node_state_update(
        self, project_id: str, node_id: str, state: str, metadata: dict | None = None
    ) -> int:
        """A node changed state (idle, queued, processing, completed, failed)."""
        return self.publish_event(
            project_id,
            {
                "type": "node.state.updated",
                "node_id": node_id,
                "state": state,
                "metadata": metadata,
            },
        )

    def node_progress_update(
        self,
        project_id: str,
        node_id: str,
        progress: float,
        step: str,
        current_step: int,
        total_steps: int,
        metadata: dict | None = None,
    ) -> int:
        """A node's execution progressed; ``step`` also becomes ``step_info.description``."""
        return self.publish_event(
            project_id,
            {
                "type": "node.progress.updated",
                "node_id": node_id,
                "progress": progress,
                "step": step,
                "step_info": {"current": current_step, "total": total_steps, "description": step},
                "metadata": metadata,
            },
        )

    def node_output_ready(
        self, project_id: str, node_id: str, outputs: dict, execution_time: float
    ) -> int:
        """A node's outputs are ready."""
        return self.publish_event(
            project_id,
            {
                "type": "node.output.ready",
                "node_id": node_id,
                "outputs": outputs,
                "execution_time": execution_time,
            },
        )

    def node_error(
        self, project_id: str, node_id: str, error: str, traceback: str | None = None
    ) -> int:
        """A node failed (``node.error.occurred``)."""
        return self.publish_event(
            project_id,
            {
                "type": "node.error.occurred",
                "node_id": node_id,
                "error": error,
                "traceback": traceback,
            },
        )

    # ------------------------------------------------------------------ task events

    def task_queued(self, project_id: str, task_id: str, node_id: str, priority: int = 0) -> int:
        """A task was queued for a node."""
        return self.publish_event(
            project_id,
            {"type": "task.queued", "task_id": task_id, "node_id": node_id, "priority": priority},
        )

    def task_started(self, project_id: str, task_id: str, node_id: str, runner_id: str) -> int:
        """A runner (usually ``self.runner_id``) started a task."""
        return self.publish_event(
            project_id,
            {
                "type": "task.started",
                "task_id": task_id,
                "node_id": node_id,
                "runner_id": runner_id,
            },
        )

    def task_progress(
        self,
        project_id: str,
        task_id: str,
        node_id: str,
        progress: float,
        step: str,
        current_step: int,
        total_steps: int,
        metadata: dict | None = None,
    ) -> int:
        """Granular task progress: ``progress`` is the percentage, ``step`` the description."""
        return self.publish_event(
            project_id,
            {
                "type": "task.progress",
                "task_id": task_id,
                "node_id": node_id,
                "progress": {
                    "percentage": progress,
                    "current_step": current_step,
                    "total_steps": total_steps,
                    "step_description": step,
                },
                "metadata": metadata,
            },
        )

    def task_success(
        self, project_id: str, task_id: str, node_id: str, result: dict, execution_time: float
    ) -> int:
        """A task finished successfully."""
        return self.publish_event(
            project_id,
            {
                "type": "task.success",
                "task_id": task_id,
                "node_id": node_id,
                "result": result,
                "execution_time": execution_time,
            },
        )

    def task_failed(
        self,
        project_id: str,
        task_id: str,
        node_id: str,
        error: str,
        traceback: str | None = None,
    ) -> int:
        """A task failed; ``traceback`` is omitted from the event when None."""
        return self.publish_event(
            project_id,
            {
                "type": "task.failed",
                "task_id": task_id,
                "node_id": node_id,
                "error": error,
                "traceback": traceback,
            },
        )

    def task_cancelled(self, project_id: str, task_id: str, node_id: str) -> int:
        """A task was cancelled (e.g. after a ``cancel_task`` command)."""
        return self.publish_event(
            project_id, {"type": "task.cancelled", "task_id": task_id, "node_id": node_id}
        )

    # ------------------------------------------------------------------ runner events

    def runner_assigned(
        self, project_id: str, task_id: str, runner_id: str, runner_info: dict
    ) -> int:
        """A runner was assigned a task.

        ``runner_info`` = ``{"capabilities": [str, ...], "resources": {...}}``.
        """
        return self.publish_event(
            project_id,
            {
                "type": "runner.assigned",
                "task_id": task_id,
                "runner_id": runner_id,
                "runner_info": runner_info,
            },
        )

    def runner_heartbeat(self, project_id: str, runner_id: str, status: dict) -> int:
        """A runner's liveness and load, for one project's clients (the seed broadcast it
        globally; global events go through the gateway's ``/v1/broadcast`` instead).
        ``status`` = ``{active_tasks, available_memory, cpu_usage}``."""
        return self.publish_event(
            project_id, {"type": "runner.heartbeat", "runner_id": runner_id, "status": status}
        )

    def runner_completed(self, project_id: str, task_id: str, runner_id: str, metrics: dict) -> int:
        """A runner finished a task; ``metrics`` needs ``execution_time`` and ``memory_used``."""
        return self.publish_event(
            project_id,
            {
                "type": "runner.completed",
                "task_id": task_id,
                "runner_id": runner_id,
                "metrics": metrics,
            },
        )

    # ------------------------------------------------------------------ file events

    def file_uploaded(self, project_id: str, file_info: dict) -> int:
        """A file was uploaded; ``file_info`` = ``{name, path, size, asset_type}``."""
        return self.publish_event(project_id, {"type": "file.uploaded", "file": file_info})

    def file_deleted(
        self, project_id: str, file_path: str | None = None, *, file_info: dict | None = None
    ) -> int:
        """A file was deleted, named by ``file_path``, ``file_info`` or both."""
        if file_path is None and file_info is None:
            raise InvalidEvent("file.deleted: give file_path or file_info")
        return self.publish_event(
            project_id, {"type": "file.deleted", "file_path": file_path, "file": file_info}
        )

    def file_changed(self, project_id: str, file_path: str, change_type: str) -> int:
        """A file in the workspace changed (``change_type``: modified, created, deleted)."""
        if file_path is None or change_type is None:
            raise InvalidEvent("file.changed: file_path and change_type are required")
        return self.publish_event(
            project_id, {"type": "file.changed", "file_path": file_path, "change_type": change_type}
        )

    def workspace_changed(self, workspace_id: str, changes: dict) -> int:
        """A workspace changed: a global event, as in the seed; ``changes`` maps a kind of
        change to paths. Returns the gateway instances reached."""
        return self.broadcast(
            {"type": "workspace.changed", "workspace_id": workspace_id, "changes": changes}
        )

    # ------------------------------------------------------------------ agent events

    def agent_task_assigned(
        self, project_id: str, agent_type: str, task_id: str, task_description: str
    ) -> int:
        """A creative agent (Producer, Screenwriter, Art Director, ...) got a task."""
        return self.publish_event(
            project_id,
            {
                "type": "agent.task.assigned",
                "agent_type": agent_type,
                "task_id": task_id,
                "task_description": task_description,
            },
        )

    def agent_task_progress(
        self, project_id: str, agent_type: str, task_id: str, progress: float, message: str
    ) -> int:
        """A creative agent's progress on a task."""
        return self.publish_event(
            project_id,
            {
                "type": "agent.task.progress",
                "agent_type": agent_type,
                "task_id": task_id,
                "progress": progress,
                "message": message,
            },
        )

    def agent_task_completed(
        self, project_id: str, agent_type: str, task_id: str, output: dict
    ) -> int:
        """A creative agent finished; ``output`` may name ``asset_type``, ``asset_ids``,
        ``document_path``."""
        return self.publish_event(
            project_id,
            {
                "type": "agent.task.completed",
                "agent_type": agent_type,
                "task_id": task_id,
                "output": output,
            },
        )

    # ------------------------------------------------------------------ take events

    def take_created(self, project_id: str, node_id: str, take_info: dict) -> int:
        """A new take; ``take_info`` = ``{take_id, take_number, path, chapter, scene, shot,
        metadata}``."""
        return self.publish_event(
            project_id, {"type": "take.created", "node_id": node_id, "take_info": take_info}
        )

    def take_selected(self, project_id: str, node_id: str, take_id: str) -> int:
        """A take became the node's active one."""
        return self.publish_event(
            project_id, {"type": "take.selected", "node_id": node_id, "take_id": take_id}
        )

    # ------------------------------------------------------------------ character events

    def character_created(self, project_id: str, character_data: dict) -> int:
        """A character was created; ``character_data`` = ``{assetId, name, description,
        triggerWord}``."""
        return self.publish_event(
            project_id, {"type": "character.created", "character": character_data}
        )

    def character_updated(self, project_id: str, char_id: str, updates: dict) -> int:
        """A character's fields changed."""
        return self.publish_event(
            project_id, {"type": "character.updated", "char_id": char_id, "updates": updates}
        )

    def character_base_face_uploaded(self, project_id: str, char_id: str, image_path: str) -> int:
        """A character's base face image was uploaded (``character.baseFace.uploaded``)."""
        return self.publish_event(
            project_id,
            {"type": "character.baseFace.uploaded", "char_id": char_id, "image_path": image_path},
        )

    def character_variation_generated(
        self, project_id: str, char_id: str, variation_type: str, image_path: str
    ) -> int:
        """A variation image of a character was generated."""
        return self.publish_event(
            project_id,
            {
                "type": "character.variation.generated",
                "char_id": char_id,
                "variation_type": variation_type,
                "image_path": image_path,
            },
        )

    def character_lora_status(
        self, project_id: str, char_id: str, status: str, progress: float | None = None
    ) -> int:
        """LoRA training status (untrained, training, completed, failed), with progress."""
        return self.publish_event(
            project_id,
            {
                "type": "character.lora.status",
                "char_id": char_id,
                "status": status,
                "progress": progress,
            },
        )

    def character_usage_updated(self, project_id: str, char_id: str, usage: list[str]) -> int:
        """Where a character is used (list of ids/paths)."""
        return self.publish_event(
            project_id, {"type": "character.usage.updated", "char_id": char_id, "usage": usage}
        )
