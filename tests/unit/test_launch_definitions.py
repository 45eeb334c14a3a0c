"""`launch.simple_task_types`: which task types of a workflow definition a worker must serve."""

from __future__ import annotations

import json
from pathlib import Path

from perago_worker.launch import simple_task_types

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.workflow.json"


def test_the_example_workflow_needs_its_three_task_types() -> None:
    tasks = json.loads(EXAMPLE.read_text())["tasks"]
    assert list(simple_task_types(tasks)) == ["qs_ingest", "qs_clean", "qs_total"]


def test_nested_simple_tasks_count_and_system_tasks_do_not() -> None:
    tasks = [
        {"name": "a", "type": "SIMPLE"},
        {"name": "wait", "type": "WAIT"},
        {
            "name": "fork",
            "type": "FORK_JOIN",
            "forkTasks": [[{"name": "b"}], [{"name": "c", "type": "SIMPLE"}]],
        },
        {
            "name": "switch",
            "type": "SWITCH",
            "decisionCases": {"x": [{"name": "d"}]},
            "defaultCase": [{"name": "e"}],
        },
        {"name": "loop", "type": "DO_WHILE", "loopOver": [{"name": "f"}]},
        {"name": "http", "type": "HTTP"},
        "not a task",
    ]
    assert sorted(simple_task_types(tasks)) == ["a", "b", "c", "d", "e", "f"]
