"""ensemble-python's ``ensemble.yaml`` read as an Ensemble: its users' files run as they are.

The successor (converged-computing/ensemble-python) has a flat file: top-level ``jobs`` (job groups:
name, command, count, nodes, tasks, workdir, duration), ``rules`` (trigger, name, when, action) and
``logging`` (debug, heartbeat), and optionally ``custom`` (Python source for custom actions).
:func:`is_ensemble_python` recognises one (no ``apiVersion``/``kind``/``spec``, a ``rules`` or ``jobs``
list at the top); :func:`convert` turns it into an Ensemble document with one member running the
``rules`` algorithm with ``compat: ensemble-python`` and says, in one note per field, what it converted
and what it refused. The document is then validated like any other, so a problem is still reported
with its path (``spec.members[0].algorithm.rules[1].when: ...``) and the note says where it came from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ensemble_core.spec import API_VERSION, KIND

#: The successor's heartbeat when grow or shrink rules exist and none is set (``ensemble/defaults.py``).
DEFAULT_HEARTBEAT = 60
#: Idle checks before ``ensemble up`` ends a converted member (the successor ran until interrupted).
IDLE_CHECKS = 3
#: maxSize, in multiples of the size, of a converted file with grow rules (it names no cluster size).
GROW_ROOM = 4
_TOP_KEYS = {"jobs", "rules", "logging", "custom"}
_JOB_KEYS = ("name", "command", "count", "nodes", "tasks", "workdir", "duration")


def is_ensemble_python(document: object) -> bool:
    """Whether ``document`` is an ensemble-python file rather than an Ensemble resource."""
    if not isinstance(document, Mapping) or {"apiVersion", "kind", "spec"} & set(document):
        return False
    return isinstance(document.get("rules"), list) or isinstance(document.get("jobs"), list)


def convert(document: Mapping[str, Any], name: str) -> tuple[dict[str, Any], list[str]]:
    """The Ensemble document for an ensemble-python file, and a note for each field converted or refused.

    ``name`` becomes ``metadata.name`` (the file's stem, made a valid Kubernetes name). Fields the
    conversion does not know are passed on, so the validation that follows names them.
    """
    notes: list[str] = []
    jobs_raw = document.get("jobs")
    jobs: list[Any] = []
    widest = 1
    if isinstance(jobs_raw, list):
        for index, job in enumerate(jobs_raw):
            if isinstance(job, Mapping):
                job = dict(job)
                for key in ("count", "nodes", "tasks", "duration"):
                    value = job.get(key)
                    if isinstance(value, float) and value.is_integer():
                        job[key] = int(value)  # the successor's schema says "number"
                nodes = job.get("nodes", 1)
                if isinstance(nodes, int) and not isinstance(nodes, bool):
                    widest = max(widest, nodes)
            jobs.append(job)
            if index == 0:
                notes.append(f"jobs: {len(jobs_raw)} job groups became spec.members[0].jobs")
    else:
        jobs = jobs_raw  # type: ignore[assignment]  # wrong type: the validation names it
    logging = document.get("logging") if isinstance(document.get("logging"), Mapping) else {}
    assert isinstance(logging, Mapping)
    rules = document.get("rules")
    scaling = isinstance(rules, list) and any(
        isinstance(rule, Mapping)
        and isinstance(rule.get("action"), Mapping)
        and rule["action"].get("name") in ("grow", "shrink")
        for rule in rules
    )
    heartbeat = logging.get("heartbeat")
    if isinstance(heartbeat, int | float) and not isinstance(heartbeat, bool) and heartbeat > 0:
        check_seconds = max(1, math.ceil(heartbeat))
        notes.append(f"logging.heartbeat: {heartbeat:g} s became spec.checkSeconds {check_seconds} (rules run then)")
    elif scaling:
        check_seconds = DEFAULT_HEARTBEAT
        notes.append(
            f"logging.heartbeat: not set and grow/shrink rules exist: the successor's default, spec.checkSeconds "
            f"{DEFAULT_HEARTBEAT}"
        )
    else:
        check_seconds = 10
        notes.append(
            "logging.heartbeat: not set: checks every 10 s (spec.checkSeconds); rules also run on every job event"
        )
    if "debug" in logging:
        notes.append("logging.debug: ignored (the services log every decision; ensemble up --logs keeps them)")
    extra_logging = sorted(set(logging) - {"heartbeat", "debug"})
    for key in extra_logging:
        notes.append(f"logging.{key}: refused: not a field of ensemble-python's logging (debug, heartbeat)")
    if "custom" in document:
        notes.append(
            "custom: refused: it is Python code for custom actions, which would run inside the decider (code "
            "execution in a shared service); rules with a custom action are errors below"
        )
    if isinstance(rules, list):
        notes.extend(_rule_notes(rules))
    for key in sorted(set(document) - _TOP_KEYS):
        notes.append(f"{key}: refused: not a field of ensemble-python's file (jobs, rules, logging, custom)")
    notes.append(
        f"converted into one member with algorithm rules and compat: ensemble-python (size {widest}, the "
        f"widest job group, maxSize {widest * GROW_ROOM if scaling else widest}; ends after {IDLE_CHECKS} idle "
        "checks, where the successor ran until interrupted)"
    )
    member: dict[str, Any] = {
        "minicluster": {"spec": {"size": widest, "maxSize": widest * GROW_ROOM if scaling else widest}},
        "jobs": jobs,
        "algorithm": {
            "name": "rules",
            "options": {"compat": "ensemble-python", "idleChecks": IDLE_CHECKS},
            "rules": rules if rules is not None else [],
        },
    }
    converted = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": _kubernetes_name(name)},
        "spec": {"checkSeconds": check_seconds, "members": [member]},
    }
    return converted, [f"ensemble-python file: {note}" for note in notes]


def _rule_notes(rules: list[Any]) -> list[str]:
    notes: list[str] = []
    for index, rule in enumerate(rules):
        if not isinstance(rule, Mapping):
            continue
        path = f"rules[{index}]"
        action = rule.get("action") if isinstance(rule.get("action"), Mapping) else {}
        assert isinstance(action, Mapping)
        trigger = rule.get("trigger")
        if trigger != "metric" and "name" in rule:
            notes.append(f"{path}.name: {rule['name']!r} kept as a label only (the rule applies to every job)")
        if trigger == "metric" and "when" not in rule:
            notes.append(f"{path}.when: not set: true whenever the rules run (ensemble-python)")
        if trigger == "metric" and isinstance(rule.get("when"), int | float):
            notes.append(f"{path}.when: {rule['when']!r} means equal to it (ensemble-python), not 'reaches'")
        if (
            trigger == "metric"
            and str(rule.get("name", "")).split(".", 1)[0] in ("mean", "min", "max")
            and str(rule.get("name", "")).endswith("-pending")
        ):
            notes.append(f"{path}.name: {rule['name']} includes the jobs still waiting (now - submit)")
        if "label" in action:
            notes.append(f"{path}.action.label: read as the job group")
        if action.get("name") == "submit" and "label" not in action and "group" not in action:
            notes.append(f"{path}.action: submit without a label submits every job group (ensemble-python)")
        if action.get("name") == "submit" and "value" in action:
            notes.append(f"{path}.action.value: ignored on submit (ensemble-python ignores it too)")
        if action.get("backoff") is not None:
            notes.append(f"{path}.action.backoff: counts occurrences of the trigger (ensemble-python), not checks")
        if action.get("repetitions") == 0:
            notes.append(f"{path}.action.repetitions: 0: the rule never performs (ensemble-python)")
        if action.get("name") == "custom":
            notes.append(f"{path}.action: custom refused (Python code inside the decider)")
    return notes


def _kubernetes_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-." else "-" for c in name.lower()).strip("-.")
    return cleaned[:253] or "ensemble"
