"""The publisher on a Redis Cluster (docs/protocol.md §11), against a real 3-master,
3-replica cluster and a gateway run with REDIS_CLUSTER_NODES (conftest.py starts both)."""

from __future__ import annotations

import json
import secrets
import socket
import threading

import pytest
from redis.cluster import ClusterNode, RedisCluster
from websockets.sync.client import connect

from switchboard_publisher import FunctionRunnerEventPublisher, PublishError

PROJECT_KEYS = ("seq", "history", "state", "state:terminal")


def test_key_names_are_hash_tagged_only_on_a_cluster():
    single = FunctionRunnerEventPublisher("r", "redis://127.0.0.1:1")
    cluster = FunctionRunnerEventPublisher("r", "redis://127.0.0.1:1", cluster=True)
    assert single.cluster is False and cluster.cluster is True
    assert single.project_key("p1", "seq") == "project:p1:seq"
    assert cluster.project_key("p1", "state:terminal") == "project:{p1}:state:terminal"
    assert single.story_progress_key("s1") == "story:s1:progress"
    assert cluster.story_progress_key("s1") == "story:{s1}:progress"


def test_contradictory_settings_are_refused(redis_cluster):
    seeds = ",".join(redis_cluster.addrs)
    with pytest.raises(ValueError, match="one of"):
        FunctionRunnerEventPublisher("r", "redis://127.0.0.1:1", cluster_nodes=seeds)
    with pytest.raises(ValueError, match="cluster=False"):
        FunctionRunnerEventPublisher("r", cluster_nodes=seeds, cluster=False)
    with pytest.raises(ValueError, match="host:port"):
        FunctionRunnerEventPublisher("r", cluster_nodes=["127.0.0.1"])
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", redis_cluster.ports[0])])
    try:
        with pytest.raises(ValueError, match="cluster=False"):
            FunctionRunnerEventPublisher("r", redis_client=client, cluster=False)
    finally:
        client.close()


def test_cluster_publish_reaches_the_browser_with_seqs(
    cluster_gateway, cluster_publisher, rc, project
):
    assert cluster_publisher.cluster
    client = cluster_gateway.connect(project)
    try:
        assert client.established["seq"] == 0
        assert cluster_publisher.node_state_update(project, "n1", "processing") == 1
        seqs = cluster_publisher.publish_events(
            project,
            [
                {"type": "task.queued", "task_id": "t1", "node_id": "n1", "priority": 0},
                {"type": "task.started", "task_id": "t1", "node_id": "n1", "runner_id": "r"},
            ],
        )
        assert seqs == [2, 3]
        frames = [client.recv() for _ in range(3)]
        assert [f["seq"] for f in frames] == [1, 2, 3]
        assert [f["type"] for f in frames] == ["node.state.updated", "task.queued", "task.started"]
        assert all(f["project_id"] == project for f in frames)
        # The gateway serves the status snapshot from the tagged state key.
        client.send({"type": "status"})
        for _ in range(5):
            frame = json.loads(client.ws.recv(timeout=10))
            if frame["type"] == "status":
                break
        else:
            pytest.fail(f"no status frame, last: {frame}")
        assert frame["seq"] == 3
        assert frame["nodes"]["n1"]["state"] == "processing"
        assert frame["tasks"]["t1"]["status"] == "started"
    finally:
        client.close()
    # Tagged keys, all in the project's slot; none of the single-Redis names.
    assert rc.hget(f"project:{{{project}}}:seq", "seq") == "3"
    assert rc.xlen(f"project:{{{project}}}:history") == 3
    assert rc.exists(f"project:{{{project}}}:state") == 1
    slots = {rc.keyslot(f"project:{{{project}}}:{k}") for k in PROJECT_KEYS}
    assert slots == {rc.keyslot(project)}
    for key in PROJECT_KEYS:
        assert rc.exists(f"project:{project}:{key}") == 0, key


def test_a_redis_cluster_client_is_detected_and_scripts_reload_after_a_flush(
    cluster_gateway, redis_cluster, rc, project
):
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", redis_cluster.ports[-1])])
    pub = FunctionRunnerEventPublisher("runner-py", redis_client=client)
    try:
        assert pub.cluster
        ws = cluster_gateway.connect(project)
        try:
            assert pub.task_queued(project, "t1", "n1") == 1
            rc.script_flush()  # every primary: the next evalsha gets NOSCRIPT
            assert pub.task_queued(project, "t2", "n1") == 2
            assert [ws.recv()["seq"], ws.recv()["seq"]] == [1, 2]
        finally:
            ws.close()
        assert rc.xlen(f"project:{{{project}}}:history") == 2
    finally:
        pub.close()


def test_cluster_true_with_one_seed_url(cluster_gateway, redis_cluster, rc, project):
    pub = FunctionRunnerEventPublisher(
        "runner-py", f"redis://{redis_cluster.addrs[2]}", cluster=True
    )
    try:
        assert pub.task_queued(project, "t1", "n1") == 1
        assert rc.exists(f"project:{{{project}}}:seq") == 1
    finally:
        pub.close()


def test_cluster_story_progress_is_stored_tagged_and_reaches_a_story_socket(
    cluster_gateway, cluster_publisher, rc
):
    story = "story-" + secrets.token_hex(4)
    # Published before anyone connects: stored, so a socket starts from it.
    assert cluster_publisher.story_progress(story, "generating", 40, "Writing chapter 2") == 0
    stored = json.loads(rc.get(f"story:{{{story}}}:progress"))
    assert stored["status"] == "generating" and stored["progress_percent"] == 40
    assert 0 < rc.ttl(f"story:{{{story}}}:progress") <= 86400
    assert rc.exists(f"story:{story}:progress") == 0
    token = cluster_gateway.token("*")
    url = f"ws://127.0.0.1:{cluster_gateway.port}/ws/stories/{story}/progress?token={token}"
    with connect(url, open_timeout=10, close_timeout=2) as ws:
        first = json.loads(ws.recv(timeout=10))
        assert first == stored, "the stored progress, read from the tagged key"
        # A classic PUBLISH reaches every node; the count is only the running node's.
        assert cluster_publisher.story_progress(story, "complete", 100, "Done") in (0, 1)
        live = json.loads(ws.recv(timeout=10))
        assert (live["status"], live["progress_percent"], live["current_step"]) == (
            "complete",
            100,
            "Done",
        )
    assert json.loads(rc.get(f"story:{{{story}}}:progress"))["status"] == "complete"


def test_cluster_commands_receive_node_execute_from_a_browser(
    cluster_gateway, cluster_publisher, project
):
    commands = cluster_publisher.commands(project, timeout=10)
    received: list[dict] = []
    worker = threading.Thread(target=lambda: received.append(next(commands, None)), daemon=True)
    worker.start()
    client = cluster_gateway.connect(project)
    try:
        client.send({"type": "node.execute", "node_id": "n1", "request_id": "r1"})
        reply = client.recv()
        assert reply["type"] == "command.accepted", reply
        assert reply["command"] == "node.execute"
        # Subscribed through the project slot's primary, where the command script runs.
        assert reply["delivered_to"] >= 1
        worker.join(timeout=15)
        assert not worker.is_alive()
        command = received[0]
        assert command is not None, "no command within the timeout"
        assert command["type"] == "execute_node"
        assert command["node_id"] == "n1"
        assert command["project_id"] == project
        assert command["request_id"] == "r1"
    finally:
        client.close()
        commands.close()


def test_cluster_broadcast_reaches_every_connection(cluster_gateway, cluster_publisher, project):
    a, b = cluster_gateway.connect(project), cluster_gateway.connect(project + "-other")
    try:
        assert cluster_publisher.project_created(project + "-new", {"name": "P"}) >= 0
        for client in (a, b):
            created = client.recv()
            assert created["type"] == "project.created", created
            assert created["project_id"] == project + "-new"
    finally:
        a.close()
        b.close()


def test_an_unreachable_cluster_raises_publish_error_at_the_first_call(project):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    pub = FunctionRunnerEventPublisher("r", cluster_nodes=[("127.0.0.1", port)])  # no I/O yet
    with pytest.raises(PublishError):
        pub.node_state_update(project, "n1", "idle")
    with pytest.raises(PublishError):
        pub.commands(project, timeout=0.1)
