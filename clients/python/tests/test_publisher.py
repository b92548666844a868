"""The publisher against a real gateway and a real Redis."""

from __future__ import annotations

import json
import re
import secrets
import threading
from pathlib import Path

import pytest
import redis
from websockets.sync.client import connect

from switchboard_publisher import (
    FunctionRunnerEventPublisher,
    InvalidEvent,
    PublishError,
    load_script,
)

REPO = Path(__file__).resolve().parents[3]

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

FILE = {"name": "a.png", "path": "/p/a.png", "size": 123, "asset_type": "image"}
TAKE = {
    "take_id": "t1",
    "take_number": 1,
    "path": "/takes/1.png",
    "chapter": "c1",
    "scene": "s1",
    "shot": "sh1",
    "metadata": {"seed": 7},
}
CHARACTER = {"assetId": "a1", "name": "Ada", "description": "lead", "triggerWord": "ada"}

# (method, args after project_id, kwargs, expected type, fields the frame must carry)
EVERY_METHOD = [
    (
        "project_updated",
        [],
        {"changes": {"name": "Q"}},
        "project.updated",
        {"changes": {"name": "Q"}},
    ),
    ("project_deleted", [], {}, "project.deleted", {}),
    (
        "node_state_update",
        ["n1", "processing"],
        {"metadata": {"k": 1}},
        "node.state.updated",
        {"node_id": "n1", "state": "processing", "metadata": {"k": 1}},
    ),
    (
        "node_progress_update",
        ["n1", 50.0, "Loading", 1, 4],
        {},
        "node.progress.updated",
        {
            "node_id": "n1",
            "progress": 50.0,
            "step": "Loading",
            "step_info": {"current": 1, "total": 4, "description": "Loading"},
        },
    ),
    (
        "node_output_ready",
        ["n1", {"image": "/o.png"}, 1.5],
        {},
        "node.output.ready",
        {"node_id": "n1", "outputs": {"image": "/o.png"}, "execution_time": 1.5},
    ),
    (
        "node_error",
        ["n1", "boom"],
        {"traceback": "tb"},
        "node.error.occurred",
        {"node_id": "n1", "error": "boom", "traceback": "tb"},
    ),
    (
        "task_queued",
        ["t1", "n1"],
        {"priority": 2},
        "task.queued",
        {"task_id": "t1", "node_id": "n1", "priority": 2},
    ),
    (
        "task_started",
        ["t1", "n1", "runner-py"],
        {},
        "task.started",
        {"task_id": "t1", "node_id": "n1", "runner_id": "runner-py"},
    ),
    (
        "task_progress",
        ["t1", "n1", 25.0, "Generating", 2, 4],
        {},
        "task.progress",
        {
            "task_id": "t1",
            "node_id": "n1",
            "progress": {
                "percentage": 25.0,
                "current_step": 2,
                "total_steps": 4,
                "step_description": "Generating",
            },
        },
    ),
    (
        "task_success",
        ["t1", "n1", {"image_path": "/o.png"}, 4.5],
        {},
        "task.success",
        {
            "task_id": "t1",
            "node_id": "n1",
            "result": {"image_path": "/o.png"},
            "execution_time": 4.5,
        },
    ),
    (
        "task_failed",
        ["t2", "n1", "oom"],
        {},
        "task.failed",
        {"task_id": "t2", "node_id": "n1", "error": "oom"},
    ),
    ("task_cancelled", ["t3", "n1"], {}, "task.cancelled", {"task_id": "t3", "node_id": "n1"}),
    (
        "agent_task_assigned",
        ["Art Director", "a1", "Moodboard"],
        {},
        "agent.task.assigned",
        {"agent_type": "Art Director", "task_id": "a1", "task_description": "Moodboard"},
    ),
    (
        "agent_task_progress",
        ["Art Director", "a1", 40.0, "halfway"],
        {},
        "agent.task.progress",
        {"agent_type": "Art Director", "task_id": "a1", "progress": 40.0, "message": "halfway"},
    ),
    (
        "agent_task_completed",
        ["Art Director", "a1", {"asset_ids": ["x"]}],
        {},
        "agent.task.completed",
        {"agent_type": "Art Director", "task_id": "a1", "output": {"asset_ids": ["x"]}},
    ),
    ("take_created", ["n1", TAKE], {}, "take.created", {"node_id": "n1", "take_info": TAKE}),
    ("take_selected", ["n1", "t1"], {}, "take.selected", {"node_id": "n1", "take_id": "t1"}),
    ("file_uploaded", [FILE], {}, "file.uploaded", {"file": FILE}),
    ("file_deleted", ["/p/a.png"], {}, "file.deleted", {"file_path": "/p/a.png"}),
    (
        "file_changed",
        ["/p/b.png", "modified"],
        {},
        "file.changed",
        {"file_path": "/p/b.png", "change_type": "modified"},
    ),
    (
        "runner_assigned",
        ["t1", "runner-py", {"capabilities": ["gpu"], "resources": {"gpu": 1}}],
        {},
        "runner.assigned",
        {
            "task_id": "t1",
            "runner_id": "runner-py",
            "runner_info": {"capabilities": ["gpu"], "resources": {"gpu": 1}},
        },
    ),
    (
        "runner_heartbeat",
        ["runner-py", {"active_tasks": 1, "available_memory": 1024, "cpu_usage": 0.5}],
        {},
        "runner.heartbeat",
        {
            "runner_id": "runner-py",
            "status": {"active_tasks": 1, "available_memory": 1024, "cpu_usage": 0.5},
        },
    ),
    (
        "runner_completed",
        ["t1", "runner-py", {"execution_time": 4.5, "memory_used": 512}],
        {},
        "runner.completed",
        {
            "task_id": "t1",
            "runner_id": "runner-py",
            "metrics": {"execution_time": 4.5, "memory_used": 512},
        },
    ),
    ("character_created", [CHARACTER], {}, "character.created", {"character": CHARACTER}),
    (
        "character_updated",
        ["c1", {"name": "Bea"}],
        {},
        "character.updated",
        {"char_id": "c1", "updates": {"name": "Bea"}},
    ),
    (
        "character_base_face_uploaded",
        ["c1", "/f.png"],
        {},
        "character.baseFace.uploaded",
        {"char_id": "c1", "image_path": "/f.png"},
    ),
    (
        "character_variation_generated",
        ["c1", "smile", "/v.png"],
        {},
        "character.variation.generated",
        {"char_id": "c1", "variation_type": "smile", "image_path": "/v.png"},
    ),
    (
        "character_lora_status",
        ["c1", "training"],
        {"progress": 30.0},
        "character.lora.status",
        {"char_id": "c1", "status": "training", "progress": 30.0},
    ),
    (
        "character_usage_updated",
        ["c1", ["scene-1", "scene-2"]],
        {},
        "character.usage.updated",
        {"char_id": "c1", "usage": ["scene-1", "scene-2"]},
    ),
]


def test_every_method_reaches_the_browser_with_consecutive_seq(gateway, publisher, project):
    client = gateway.connect(project)
    try:
        base = client.established["seq"]
        for i, (method, args, kwargs, kind, fields) in enumerate(EVERY_METHOD, start=1):
            seq = getattr(publisher, method)(project, *args, **kwargs)
            assert seq == base + i, method
            frame = client.recv()
            assert frame["type"] == kind, (method, frame)
            assert frame["seq"] == seq
            assert frame["project_id"] == project
            assert frame["runner_id"] == "runner-py"
            assert TIMESTAMP.match(frame["timestamp"]), frame["timestamp"]
            for key, value in fields.items():
                assert frame[key] == value, (method, key, frame)
            # optional fields left as None are absent, never null
            assert None not in frame.values(), (method, frame)
    finally:
        client.close()


def test_the_seeds_global_events_reach_every_connection(gateway, publisher, project):
    """project.created and workspace.changed are global, as the seed's EventBroadcaster
    sends them: every connection hears them, with the seed's field names."""
    other = project + "-other"
    a, b = gateway.connect(project), gateway.connect(other)
    try:
        new_project = project + "-new"
        assert publisher.project_created(new_project, {"name": "P"}) >= 1
        assert publisher.workspace_changed("w1", {"added": ["a"]}) >= 1
        for client in (a, b):
            created, changed = client.recv(), client.recv()
            assert created["type"] == "project.created", created
            assert created["project_id"] == new_project, "the new project, not the follower's"
            assert created["data"] == {"name": "P"}
            assert "seq" not in created
            assert TIMESTAMP.match(created["timestamp"]) or created["timestamp"], created
            assert changed["type"] == "workspace.changed", changed
            assert changed["workspace_id"] == "w1"
            assert changed["changes"] == {"added": ["a"]}
    finally:
        a.close()
        b.close()
    # Not through a project's channel: the gateway would drop it there.
    with pytest.raises(InvalidEvent, match="global event"):
        publisher.publish_event(project, {"type": "project.created", "data": {}})
    with pytest.raises(InvalidEvent, match="changes"):
        publisher.workspace_changed("w1", None)


def test_optional_none_is_omitted(gateway, publisher, project):
    client = gateway.connect(project)
    try:
        publisher.task_failed(project, "t1", "n1", "boom")
        publisher.character_lora_status(project, "c1", "untrained")
        publisher.node_state_update(project, "n1", "idle")
        failed, lora, node = client.recv(), client.recv(), client.recv()
        assert "traceback" not in failed
        assert "progress" not in lora
        assert "metadata" not in node
    finally:
        client.close()


def test_publish_events_is_one_atomic_batch(gateway, publisher, r, project):
    client = gateway.connect(project)
    try:
        publisher.node_state_update(project, "n0", "idle")
        events = [
            {"type": "node.state.updated", "node_id": f"n{i}", "state": "queued"}
            for i in range(1, 4)
        ]
        seqs = publisher.publish_events(project, events)
        assert seqs == [2, 3, 4]
        frames = [client.recv() for _ in range(4)]
        assert [f["seq"] for f in frames] == [1, 2, 3, 4]

        # one invalid event in a batch: nothing of it is published
        bad = events[:2] + [{"type": "node.state.updated", "node_id": "n9", "state": "running"}]
        with pytest.raises(InvalidEvent, match="event 2"):
            publisher.publish_events(project, bad)
        assert r.hget(f"project:{project}:seq", "seq") == "4"
        assert r.xlen(f"project:{project}:history") == 4
    finally:
        client.close()


def test_events_land_in_history_with_their_seq(publisher, r, project):
    seqs = [
        publisher.task_queued(project, "t1", "n1"),
        publisher.task_started(project, "t1", "n1", "runner-py"),
    ]
    assert seqs == [1, 2]
    entries = r.xrange(f"project:{project}:history")
    assert [entry_id for entry_id, _ in entries] == ["1-0", "2-0"]
    bodies = [json.loads(fields["event"]) for _, fields in entries]
    assert [b["seq"] for b in bodies] == [1, 2]
    assert [b["type"] for b in bodies] == ["task.queued", "task.started"]
    assert all(b["project_id"] == project for b in bodies)
    # the seq goes last, appended by the script to the compact JSON the library produced
    assert entries[0][1]["event"].endswith(',"seq":1}')
    assert ": " not in entries[0][1]["event"] and ", " not in entries[0][1]["event"]
    epoch = r.hget(f"project:{project}:seq", "epoch")
    assert re.fullmatch(r"[0-9a-f]{16}", epoch)
    assert r.ttl(f"project:{project}:history") > 0


def test_state_reflects_node_state_and_task_progress(publisher, r, project):
    publisher.node_state_update(project, "n1", "processing")
    publisher.task_progress(project, "t1", "n1", 50.0, "Generating", 2, 4)
    state = r.hgetall(f"project:{project}:state")
    node = json.loads(state["node:n1"])
    task = json.loads(state["task:t1"])
    assert node["state"] == "processing"
    assert task["status"] == "running"
    assert task["progress"] == {
        "percentage": 50.0,
        "current_step": 2,
        "total_steps": 4,
        "step_description": "Generating",
    }


def test_status_snapshot_shows_published_state(gateway, publisher, project):
    """Cross-check with the gateway: the state the script keeps is what `status` serves."""
    publisher.node_state_update(project, "n1", "processing")
    publisher.task_progress(project, "t1", "n1", 50.0, "Generating", 2, 4)
    client = gateway.connect(project)
    try:
        client.send({"type": "status"})
        for _ in range(5):
            frame = json.loads(client.ws.recv(timeout=10))
            if frame["type"] == "status":
                break
            if frame["type"] == "error" and frame.get("code") == "unsupported":
                pytest.skip(f"gateway does not serve status snapshots yet: {frame['message']}")
        else:
            pytest.fail(f"no status frame, last: {frame}")
        assert frame["nodes"]["n1"]["state"] == "processing"
        assert frame["tasks"]["t1"]["status"] == "running"
        assert frame["tasks"]["t1"]["progress"]["current_step"] == 2
    finally:
        client.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda p, pid: p.node_state_update(pid, "n1", "running"),
        lambda p, pid: p.character_lora_status(pid, "c1", "done"),
        lambda p, pid: p.agent_task_assigned(pid, "Director", "a1", "x"),
        lambda p, pid: p.file_changed(pid, "/f", "renamed"),
        lambda p, pid: p.task_progress(pid, "t1", "n1", "50%", "s", 1, 2),
        lambda p, pid: p.take_created(pid, "n1", {"take_id": "t1"}),
        lambda p, pid: p.publish_event(
            pid, {"type": "task.queued", "task_id": "t", "node_id": "n", "priority": float("nan")}
        ),
        lambda p, pid: p.publish_event(
            pid,
            {
                "type": "task.queued",
                "project_id": "other",
                "task_id": "t",
                "node_id": "n",
                "priority": 0,
            },
        ),
        lambda p, pid: p.publish_event(
            pid, {"type": "node.state.updated", "node_id": "n", "state": "idle", "seq": 9}
        ),
        lambda p, pid: p.publish_event(pid, {"node_id": "n"}),
    ],
)
def test_invalid_events_raise_before_anything_is_published(publisher, r, project, call):
    with pytest.raises(InvalidEvent) as info:
        call(publisher, project)
    assert isinstance(info.value, ValueError)
    assert r.exists(f"project:{project}:seq", f"project:{project}:history") == 0


def test_enum_error_names_the_allowed_values(publisher, project):
    with pytest.raises(ValueError, match="state: 'running' is not one of: completed, failed, idle"):
        publisher.node_state_update(project, "n1", "running")


def test_caller_timestamp_is_kept(gateway, publisher, project):
    client = gateway.connect(project)
    try:
        given = "2020-01-02T03:04:05.678+01:00"
        publisher.publish_event(
            project,
            {"type": "node.state.updated", "node_id": "n1", "state": "idle", "timestamp": given},
        )
        event = {"type": "take.selected", "node_id": "n1", "take_id": "t9"}
        publisher.publish_event(project, event)
        assert event == {"type": "take.selected", "node_id": "n1", "take_id": "t9"}  # not mutated
        first, second = client.recv(), client.recv()
        assert first["timestamp"] == given
        assert TIMESTAMP.match(second["timestamp"])
    finally:
        client.close()


def test_commands_receive_node_execute_from_a_browser(gateway, publisher, project):
    commands = publisher.commands(project, timeout=10)
    received: list[dict] = []
    worker = threading.Thread(target=lambda: received.append(next(commands, None)), daemon=True)
    worker.start()
    client = gateway.connect(project)
    try:
        client.send({"type": "node.execute", "node_id": "n1", "request_id": "r1"})
        reply = client.recv()
        assert reply["type"] == "command.accepted", reply
        assert reply["command"] == "node.execute"
        assert reply["request_id"] == "r1"
        assert reply["delivered_to"] >= 1
        worker.join(timeout=15)
        assert not worker.is_alive()
        command = received[0]
        assert command is not None, "no command within the timeout"
        assert command["type"] == "execute_node"
        assert command["node_id"] == "n1"
        assert command["project_id"] == project
        assert command["request_id"] == "r1"
        assert command["parameters"] == {}
    finally:
        client.close()
        commands.close()


def test_commands_generator_ends_after_its_timeout(publisher, project):
    assert list(publisher.commands(project, timeout=0.3)) == []


def test_reloads_the_script_after_a_flush(publisher, r, project):
    assert publisher.task_queued(project, "t1", "n1") == 1
    r.script_flush()
    assert publisher.task_queued(project, "t2", "n1") == 2


def test_connection_errors_are_publish_errors(project):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    pub = FunctionRunnerEventPublisher("r", f"redis://127.0.0.1:{port}")
    with pytest.raises(PublishError) as info:
        pub.node_state_update(project, "n1", "idle")
    assert isinstance(info.value.__cause__, redis.ConnectionError)


def test_packaged_script_is_the_gateways_script():
    shipped = Path(__file__).resolve().parents[1] / "src" / "switchboard_publisher" / "publish.lua"
    assert shipped.is_symlink(), (
        "publish.lua must be a symlink to src/broker/publish.lua, not a copy"
    )
    assert load_script() == (REPO / "src" / "broker" / "publish.lua").read_bytes()


def test_story_progress_is_stored_and_reaches_a_story_socket(gateway, publisher, r):
    story = "story-" + secrets.token_hex(4)
    # Published before anyone connects: stored, so a socket starts from it.
    assert publisher.story_progress(story, "generating", 40, "Writing chapter 2") == 0
    stored = json.loads(r.get(f"story:{story}:progress"))
    assert stored["status"] == "generating" and stored["progress_percent"] == 40
    assert 0 < r.ttl(f"story:{story}:progress") <= 86400
    url = f"ws://127.0.0.1:{gateway.port}/ws/stories/{story}/progress?token={gateway.token('*')}"
    with connect(url, open_timeout=10, close_timeout=2) as ws:
        first = json.loads(ws.recv(timeout=10))
        assert first == stored, "the seed's object, no envelope"
        assert publisher.story_progress(story, "complete", 100, "Done") == 1
        live = json.loads(ws.recv(timeout=10))
        assert (live["status"], live["progress_percent"], live["current_step"]) == (
            "complete",
            100,
            "Done",
        )
        ws.send("ping")
        assert ws.recv(timeout=10) == "pong"
    for bad in [
        dict(status="done", progress_percent=1),
        dict(status="failed", progress_percent=101),
        dict(status="failed", progress_percent=True),
    ]:
        with pytest.raises(InvalidEvent):
            publisher.story_progress(story, current_step="x", **bad)
    with pytest.raises(InvalidEvent):
        publisher.story_progress("bad/id", "failed", 1, "x")


def test_story_lua_is_the_gateways_own():
    shipped = Path(__file__).resolve().parents[1] / "src" / "switchboard_publisher" / "story.lua"
    assert shipped.is_symlink()
    assert shipped.read_bytes() == (REPO / "src" / "broker" / "story.lua").read_bytes()
