"""Seed tasks in Self-Instruct's JSONL schema, read and validated line by line.

One JSON object per line:

    {"id": "seed_task_1", "name": "sort_numbers", "instruction": "Sort the numbers ...",
     "instances": [{"input": "42, 7, 19", "output": "7, 19, 42"}], "is_classification": false}

The built-in set (`data/seed_tasks.jsonl`, 115 tasks, 28 of them classification) was written
for sftlab and is released under CC0 1.0 (public domain dedication).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sftlab.data.readers import json_lines
from sftlab.errors import SftlabError


class SelfInstructError(SftlabError):
    """A user-facing error of `sftlab self-instruct` (bad seed file, unusable log, failing backend)."""


class SeedTaskError(SelfInstructError):
    """A seed file that does not follow the schema; the message names the file, line and field."""


@dataclass(frozen=True)
class Instance:
    input: str
    output: str


@dataclass(frozen=True)
class SeedTask:
    id: str
    name: str
    instruction: str
    instances: tuple[Instance, ...]
    is_classification: bool


def default_seed_path() -> Path:
    return Path(str(resources.files("sftlab.selfinstruct") / "data" / "seed_tasks.jsonl"))


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _check(row: dict, where: str) -> SeedTask:
    def fail(field: str, problem: str) -> SeedTaskError:
        return SeedTaskError(f"{where}: field '{field}': {problem}")

    for field in ("id", "name", "instruction", "instances", "is_classification"):
        if field not in row:
            raise fail(field, "missing")
    for field in ("id", "name", "instruction"):
        if not isinstance(row[field], str):
            raise fail(field, f"expected a string, got {_type_name(row[field])}")
    if not row["id"].strip():
        raise fail("id", "empty")
    if not row["instruction"].strip():
        raise fail("instruction", "empty")
    if not isinstance(row["is_classification"], bool):
        raise fail("is_classification", f"expected true or false, got {_type_name(row['is_classification'])}")
    instances = row["instances"]
    if not isinstance(instances, list):
        raise fail("instances", f"expected a list of {{input, output}} objects, got {_type_name(instances)}")
    if not instances:
        raise fail("instances", "empty (every seed task needs at least one instance)")
    parsed = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise fail(f"instances[{i}]", f"expected an object with input and output, got {_type_name(instance)}")
        for key in ("input", "output"):
            if key not in instance:
                raise fail(f"instances[{i}].{key}", "missing")
            if not isinstance(instance[key], str):
                raise fail(f"instances[{i}].{key}", f"expected a string, got {_type_name(instance[key])}")
        if not instance["output"].strip():
            raise fail(f"instances[{i}].output", "empty")
        parsed.append(Instance(instance["input"].strip(), instance["output"].strip()))
    return SeedTask(row["id"], row["name"], row["instruction"].strip(), tuple(parsed), row["is_classification"])


def load_seed_tasks(path: str | Path | None = None, minimum: int = 1) -> list[SeedTask]:
    """The seed tasks of a JSONL file (default: the built-in CC0 set), validated.

    Raises SeedTaskError naming the line and field of the first problem.
    """
    path = Path(path) if path is not None else default_seed_path()
    if not path.is_file():
        raise SeedTaskError(f"{path}: no such seed-task file")
    tasks: list[SeedTask] = []
    seen: dict[str, int] = {}
    for where, row in json_lines(path, SeedTaskError):
        number = int(where.rsplit(":", 1)[1])
        if not isinstance(row, dict):
            raise SeedTaskError(f"{where}: expected a JSON object, got {_type_name(row)}")
        task = _check(row, where)
        if task.id in seen:
            raise SeedTaskError(f"{where}: field 'id': duplicate id {task.id!r} (first on line {seen[task.id]})")
        seen[task.id] = number
        tasks.append(task)
    if len(tasks) < minimum:
        raise SeedTaskError(f"{path}: {len(tasks)} seed task(s); this mode needs at least {minimum}")
    return tasks
