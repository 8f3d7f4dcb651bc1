"""``rules``: the user lists triggers and actions (the original's successor, ensemble-python).

Instead of a named policy, ``algorithm.rules`` lists rules, each a **trigger** and an **action**,
evaluated in the order written on every metrics snapshot: each check (the heartbeat: one per
``checkSeconds``) and each event snapshot (``Metrics.event > 0``: a queue change the poller published at
once, so job-event rules fire on the event; see docs/poller.md)::

    algorithm:
      name: rules
      rules:
      - trigger: start                     # the first check
        action: {name: submit, group: sleep}
      - trigger: metric
        name: count.sleep.success
        when: 1                            # a bare number means "reaches": >= 1
        action: {name: submit, group: echo}
      - trigger: job-finish                # each echo job that finished since the last snapshot
        group: echo
        action: {name: submit, group: sleep-long, repetitions: 5}
      - trigger: metric
        name: mean.sleep-long-pending
        when: "> 5"
        action: {name: grow, value: 1, repetitions: 5, backoff: 2}
      - trigger: metric
        name: count.sleep-long.success
        when: 10
        action: {name: terminate}

Triggers:

- ``start`` — once, at the first check;
- job events, with an optional ``group`` (without one: every job of the member) — once for every job
  that, since the previous snapshot, was submitted (``job-depend``, ``job-sched``), started
  (``job-run``), was cancelled (``job-cancel``), ended (``job-cleanup``, ``job-finish``), succeeded
  (``job-success``) or failed (``job-failure``, or ensemble-python's ``job-fail``) — detected from the
  change of the group's counts in ``metrics.groups``; the first snapshot counts from zero;
- ``metric`` with ``name`` and ``when`` — whenever the named statistic satisfies ``when``: a number
  (``when: 3``, meaning *reaches*: ``>= 3``, because a count can pass a value between two snapshots)
  or a comparison string (``"> 5"``, ``">= 5"``, ``"< 5"``, ``"<= 5"``, ``"== 5"``).

``compat: ensemble-python`` (an option) gives ensemble-python's semantics where ours differ: a bare
number is equality (a count that passed it since the last snapshot counts as equal), ``when`` may be
omitted (always true), ``backoff`` counts occurrences of the trigger instead of checks,
``repetitions: 0`` is accepted (never performs), ``label`` names the group, a submit without one
submits every group, ``value`` on submit and ``name`` on non-metric rules are ignored, and
``mean|min|max.<group>-pending`` read the ``-waiting`` series (see docs/algorithms.md).

Statistics, per job group (``<group>`` is a ``name`` of the member's jobs matrix):
``count.<group>.finished``, ``count.<group>.success``, ``count.<group>.failed`` (0 before any job
ended), and ``<stat>.<group>-duration`` (run time, s) and ``<stat>.<group>-pending`` (time from
submit to start, s) over the group's finished jobs, where ``<stat>`` is ``mean``, ``min``, ``max``,
``variance`` (or ``var``; sample variance, s²), ``std`` (its square root), ``iqr`` (75th minus 25th
percentile) or ``mad`` (mean absolute deviation). A duration or pending statistic of a group with no
finished job has no value and satisfies no ``when``; nor do ``variance`` and ``std`` before two.
``count.<group>.submitted|started|cancelled|waiting`` count jobs submitted, started, cancelled and
waiting now; ``mean|min|max.<group>-waiting`` is the time in the queue of every job that started *or
still waits* (``now - submit`` for a waiting one), so it grows while jobs pile up.
The sidecar computes them as streams (``sidecar/streaming.py``): variance exactly, ``iqr`` and ``mad``
as estimates (P² quartiles; deviations from the running mean), like the successor's River statistics.
A sidecar that does not report them (an original one) leaves them without a value.

Actions (``action.name``), each with ``repetitions`` (default 1: how many times in all the action
may be performed) and ``backoff`` (default 0: checks to let pass after each performance before the
next; triggers in between are dropped):

- ``submit`` with ``group`` — submit that job group of the member's jobs matrix (``count`` jobs);
- ``grow`` / ``shrink`` with ``value`` (default 1) — scale by that many nodes from the size
  requested (nodes still coming included), clamped into ``[minSize, maxSize]``;
- ``terminate`` — end the member (``disableTermination: yes`` completes it instead, shrunk to minSize).
  The successor's ``custom`` action ran user code; an algorithm here is a pure function, so it is
  rejected.

Options (YAML names):

=====================  =======  ===========================================================================
option                 default  meaning
=====================  =======  ===========================================================================
``idleChecks``         ``30``   0 to 100000: the safety net. After this many consecutive idle checks (no job
                                active, every submitted job finished) the member is terminated even though
                                no rule did; 0 turns it off (a member whose rules never end it then runs
                                until deleted)
``disableTermination`` ``no``   ``yes``: a ``terminate`` action (or the safety net) completes instead
=====================  =======  ===========================================================================

The ``local`` sidecar has no held jobs: a group is not queued until a ``submit`` action names it.
Metrics with a seq at or below the last one consumed change nothing and decide nothing.
"""

from __future__ import annotations

import difflib
import functools
import math
import operator
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec
from msgspec.structs import replace

from ensemble_core.messages import Decision, GroupStats, JobSpec, MemberSpec, Metrics
from ensemble_core.words import every, plural

from .base import decision
from .sizing import finish, idle, scale_to
from .workload_demand import member_seed

NAME = "rules"
#: ``options.compat`` value that gives the rules ensemble-python's semantics (see the module docstring).
COMPAT = "ensemble-python"
Trigger = Literal[
    "start", "job-depend", "job-sched", "job-run", "job-cancel", "job-cleanup", "job-finish", "job-success",
    "job-failure", "job-fail", "metric",
]  # fmt: skip
ActionName = Literal["submit", "grow", "shrink", "terminate"]

#: Job-event triggers → the ``GroupStats`` count whose increase is the number of those events.
_JOB_EVENTS: dict[str, str] = {
    "job-depend": "submitted",  # every submitted job passes depend and sched (Flux's job states)
    "job-sched": "submitted",
    "job-run": "started",
    "job-cancel": "cancelled",
    "job-cleanup": "finished",  # every job that ends passes cleanup
    "job-finish": "finished",
    "job-success": "succeeded",
    "job-failure": "failed",
    "job-fail": "failed",  # ensemble-python's name
}
_COUNTED: tuple[str, ...] = ("submitted", "started", "cancelled", "finished", "succeeded", "failed")
_TRIGGERS: tuple[str, ...] = ("start", *_JOB_EVENTS, "metric")
_ACTIONS: tuple[str, ...] = ("submit", "grow", "shrink", "terminate")
_RULE_KEYS = ("trigger", "group", "name", "when", "action")
_ACTION_KEYS = ("name", "group", "value", "repetitions", "backoff")
_COMPAT_ACTION_KEYS = (*_ACTION_KEYS, "label")
_COUNTS = {"finished": "finished", "success": "succeeded", "failed": "failed", "submitted": "submitted",
           "started": "started", "cancelled": "cancelled", "waiting": "waiting"}  # fmt: skip
#: Statistic name → the ``GroupStats`` field suffix it reads.
_SPREADS = {"mean": "mean", "min": "min", "max": "max", "variance": "var", "var": "var", "std": "var", "iqr": "iqr",
            "mad": "mad"}  # fmt: skip
_SERIES = {"duration": "run", "pending": "wait", "waiting": "queued"}
#: The statistics of the ``queued`` series (time in the queue of started and still waiting jobs).
_QUEUED_SPREADS = ("mean", "min", "max")
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}
_WHEN = re.compile(r"\s*(>=|<=|==|>|<)?\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*")
#: Most rules one member may list.
MAX_RULES = 1000


class RulesOptions(msgspec.Struct, kw_only=True, frozen=True, rename="camel", forbid_unknown_fields=True):
    """The options of ``rules`` (see the module docstring); the rules themselves are ``algorithm.rules``."""

    idle_checks: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 30
    disable_termination: bool = False
    #: ``ensemble-python``: the successor's semantics where ours differ; ``""``: this project's.
    compat: Literal["", "ensemble-python"] = ""


class Statistic(msgspec.Struct, frozen=True):
    """A statistic as the user named it: ``field`` of one group's ``GroupStats``.

    ``timed`` statistics (durations, pending times) have no value before the group's first finished job.
    """

    name: str
    group: str
    field: str
    timed: bool
    #: The square root of the field (``std`` from the variance).
    root: bool = False
    #: The ``GroupStats`` count that must be above 0 for a timed statistic to have a value.
    needs: str = "finished"


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    """One validated rule."""

    trigger: Trigger
    action: ActionName
    #: The job group of a job-event trigger; "" for every group.
    group: str = ""
    statistic: Statistic | None = None
    #: ``""``: no ``when`` (always true, ensemble-python only); ``"="``: ensemble-python's bare number.
    compare: str = ">="
    threshold: float = 0.0
    #: The job group a submit names; "" for every group (ensemble-python's submit without a label).
    target: str = ""
    value: int = 1
    repetitions: int = 1
    backoff: int = 0
    #: ensemble-python: ``backoff`` counts occurrences of the trigger, not checks.
    backoff_occurrences: bool = False


class RulesState(msgspec.Struct, kw_only=True, frozen=True):
    """What ``rules`` remembers between checks (every field has a default)."""

    seed: int = 0
    last_seq: int = -1
    #: Checks consumed so far; backoffs are counted in checks.
    checks: int = 0
    #: Per group: finished, succeeded, failed at the last snapshot (job events are their increase).
    seen: dict[str, tuple[int, int, int]] = {}
    #: Per group: submitted, started, cancelled at the last snapshot.
    seen_more: dict[str, tuple[int, int, int]] = {}
    #: Per rule (by position): performances left, and the first check at which it may perform again.
    left: list[int] = []
    ready_at: list[int] = []
    #: Per rule: occurrences still to skip (ensemble-python's backoff), and the statistic's last value.
    skip: list[int] = []
    values: list[float | None] = []
    #: The last event snapshot consumed (``Metrics.event``) of check ``last_seq``.
    last_event: int = 0
    submitted: int = 0
    inactive: int = 0
    done: bool = False


def validate_rules(
    algorithm_name: str,
    raw: object,
    groups: Collection[str] | None = None,
    options: Mapping[str, object] | None = None,
) -> list[str]:
    """Every problem with ``raw`` as the rules of ``algorithm_name``; an empty list means valid.

    Each problem reads ``"rules[<i>].<field>: <problem and fix>"`` (or ``"rules: ..."``). With
    ``groups`` (the member's job group names) every group a rule names must be one of them; ``options``
    (the algorithm's, as written) say whether ``compat: ensemble-python`` semantics apply.
    """
    rules = raw if isinstance(raw, list) else None
    if algorithm_name != NAME:
        if raw:
            return [
                f"rules: only the rules algorithm reads rules, not {algorithm_name}; remove them or set name: rules"
            ]
        return []
    if rules is None:
        return [f"rules: expected a list of rules (trigger and action), got {type(raw).__name__}"]
    compat = str((options or {}).get("compat", "")) == COMPAT
    return _parse(rules, groups, compat)[1]


def parse_rules(
    raw: Sequence[Mapping[str, Any]], groups: Collection[str] | None = None, compat: bool = False
) -> list[Rule]:
    """The typed rules (``compat``: with ensemble-python's semantics); ``ValueError`` listing every problem."""
    rules, errors = _parse(list(raw), groups, compat)
    if errors:
        raise ValueError("; ".join(errors))
    return rules


def _parse(raw: list[Any], groups: Collection[str] | None, compat: bool = False) -> tuple[list[Rule], list[str]]:
    errors: list[str] = []
    if not raw:
        return [], ["rules: the rules algorithm needs at least one rule (a trigger and an action)"]
    if len(raw) > MAX_RULES:
        return [], [f"rules: {len(raw)} rules exceed the limit of {MAX_RULES}"]
    rules: list[Rule] = []
    for index, item in enumerate(raw):
        rule = _rule(item, f"rules[{index}]", groups, errors, compat)
        if rule is not None:
            rules.append(rule)
    return rules, errors


def _rule(item: object, path: str, groups: Collection[str] | None, errors: list[str], compat: bool) -> Rule | None:
    if not isinstance(item, dict):
        errors.append(f"{path}: expected a mapping with trigger and action, got {_kind(item)}")
        return None
    before = len(errors)
    _unknown_keys(item, _RULE_KEYS, path, errors)
    trigger = _choice(item.get("trigger"), _TRIGGERS, f"{path}.trigger", errors)
    fields: dict[str, Any] = {}
    if trigger in _JOB_EVENTS:
        # no group: every job's events (ensemble-python's rule ``name`` there is only a label)
        if item.get("group") is not None:
            fields["group"] = _group(item.get("group"), f"{path}.group", groups, errors, f"{trigger} takes a job group")
    elif "group" in item and trigger is not None:
        errors.append(f"{path}.group: only job-event triggers (job-finish, job-run, ...) take a group")
    if trigger == "metric":
        fields["statistic"] = _statistic(item.get("name"), f"{path}.name", groups, errors, compat)
        if compat and item.get("when") is None:
            fields["compare"] = ""  # ensemble-python: no when, always true
        else:
            when = _when(item.get("when"), f"{path}.when", errors, compat)
            if when is not None:
                fields["compare"], fields["threshold"] = when
    elif trigger is not None:
        for key in ("name", "when"):
            if key in item and not (compat and key == "name"):  # ensemble-python: a rule's name is a label
                errors.append(f"{path}.{key}: only metric triggers take {key}")
    action = item.get("action")
    if not isinstance(action, dict):
        problem = "required" if action is None else f"expected a mapping, got {_kind(action)}"
        errors.append(f"{path}.action: {problem}; e.g. action: {{name: submit, group: <job group>}}")
    else:
        _action(action, f"{path}.action", groups, errors, fields, compat)
    if len(errors) > before or trigger is None:
        return None
    return Rule(trigger=trigger, **fields)


def _action(
    action: dict[Any, Any],
    path: str,
    groups: Collection[str] | None,
    errors: list[str],
    fields: dict[str, Any],
    compat: bool = False,
) -> None:
    _unknown_keys(action, _COMPAT_ACTION_KEYS if compat else _ACTION_KEYS, path, errors)
    name = action.get("name")
    if name == "custom":
        errors.append(
            f"{path}.name: custom actions are refused: they run the file's Python code inside the decider, which "
            "decides for every ensemble of the operator (code execution in a shared service). Express the step "
            f"with the actions {', '.join(_ACTIONS)} and metric or job-event triggers, or run that code as a job"
        )
        return
    chosen = _choice(name, _ACTIONS, f"{path}.name", errors)
    if chosen is None:
        return
    fields["action"] = chosen
    group_key = "group"
    if compat and "label" in action:
        group_key = "label"
        if "group" in action:
            errors.append(f"{path}.label: give the job group once, as group or as label")
    if chosen == "submit":
        if compat and action.get(group_key) is None:
            fields["target"] = ""  # ensemble-python: a submit without a label submits every group
        else:
            need = "submit needs the job group"
            fields["target"] = _group(action.get(group_key), f"{path}.{group_key}", groups, errors, need)
    elif group_key in action and not (compat and group_key == "label"):
        errors.append(f"{path}.{group_key}: only submit takes a group")
    if chosen in ("grow", "shrink"):
        fields["value"] = _integer(action, "value", path, errors, default=1, low=1)
    elif "value" in action and not (compat and chosen == "submit"):  # ensemble-python ignores it there
        errors.append(f"{path}.value: only grow and shrink take a value")
    fields["repetitions"] = _integer(action, "repetitions", path, errors, default=1, low=0 if compat else 1)
    fields["backoff"] = _integer(action, "backoff", path, errors, default=0, low=0)
    fields["backoff_occurrences"] = compat and action.get("backoff") is not None


def _unknown_keys(item: dict[Any, Any], valid: tuple[str, ...], path: str, errors: list[str]) -> None:
    for key in item:
        if str(key) not in valid:
            nearest = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            if key == "label" and "group" in valid:
                # ensemble-python named job groups by label; here a group is its jobs-matrix name.
                nearest = ["group"]
            hint = f"did you mean {nearest[0]}? " if nearest else ""
            errors.append(f"{path}.{key}: unknown field; {hint}(valid: {', '.join(valid)})")


def _choice(value: object, valid: tuple[str, ...], path: str, errors: list[str]) -> Any:
    if value is None:
        errors.append(f"{path}: required; one of {', '.join(valid)}")
        return None
    if value not in valid:
        nearest = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]}?" if nearest else ""
        errors.append(f"{path}: must be one of {', '.join(valid)}, got {value!r}{hint}")
        return None
    return value


def _group(value: object, path: str, groups: Collection[str] | None, errors: list[str], need: str) -> str:
    if not isinstance(value, str) or not value:
        problem = "required" if value is None else f"expected a job group name, got {_kind(value)}"
        errors.append(f"{path}: {problem}; {need} (a name from the member's jobs)")
        return ""
    if groups is not None and value not in groups:
        errors.append(f"{path}: {_not_a_group(value, groups)}")
    return value


def _not_a_group(value: str, groups: Collection[str]) -> str:
    nearest = difflib.get_close_matches(value, sorted(groups), n=1, cutoff=0.6)
    hint = f"did you mean {nearest[0]}? " if nearest else ""
    return f"{value!r} is not a job group of this member; {hint}(groups: {', '.join(sorted(groups)) or 'none'})"


def _statistic(
    value: object, path: str, groups: Collection[str] | None, errors: list[str], compat: bool = False
) -> Statistic | None:
    stats = "|".join(_SPREADS)
    forms = (
        f"count.<group>.{'|'.join(_COUNTS).replace('succeeded', 'success')}, {stats}.<group>-duration, "
        f"{stats}.<group>-pending or {'|'.join(_QUEUED_SPREADS)}.<group>-waiting"
    )
    if not isinstance(value, str) or "." not in value:
        problem = "required" if value is None else f"{value!r} is not a statistic"
        errors.append(f"{path}: {problem}; one of {forms}")
        return None
    kind, rest = value.split(".", 1)
    statistic: Statistic | None = None
    if kind == "count" and "." in rest:
        group, what = rest.rsplit(".", 1)
        if what in _COUNTS and group:
            statistic = Statistic(value, group, _COUNTS[what], False)
    elif kind in _SPREADS and "-" in rest:
        group, series = rest.rsplit("-", 1)
        # ensemble-python's pending time includes the jobs still waiting: its mean, min and max read the
        # queued series there (the other spreads have no O(1) form over waiting jobs: finished jobs')
        if compat and series == "pending" and kind in _QUEUED_SPREADS:
            series = "waiting"
        if series == "waiting" and kind in _QUEUED_SPREADS and group:
            statistic = Statistic(value, group, f"queued_{kind}", True, needs="queued_count")
        elif series in _SERIES and series != "waiting" and group:
            statistic = Statistic(value, group, f"{_SERIES[series]}_{_SPREADS[kind]}", True, root=kind == "std")
    if statistic is None:
        errors.append(f"{path}: {value!r} is not a statistic; one of {forms}")
        return None
    if groups is not None and statistic.group not in groups:
        errors.append(f"{path}: {_not_a_group(statistic.group, groups)}")
    return statistic


def _when(value: object, path: str, errors: list[str], compat: bool = False) -> tuple[str, float] | None:
    meaning = "equals it" if compat else "reaches: >= it"
    usage = f'a number ({meaning}) or a comparison such as "> 5" (>, >=, <, <=, ==)'
    if isinstance(value, bool) or value is None:
        problem = "required" if value is None else f"got {value!r}"
        errors.append(f"{path}: {problem}; expected {usage}")
        return None
    if isinstance(value, int | float):
        return ("=" if compat else ">="), float(value)
    match = _WHEN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        errors.append(f"{path}: expected {usage}, got {value!r}")
        return None
    return match.group(1) or ("=" if compat else ">="), float(match.group(2))


def _integer(action: dict[Any, Any], key: str, path: str, errors: list[str], *, default: int, low: int) -> int:
    """``action[key]`` as an integer in ``low..1000000`` (a string of digits taken; a float such as 2.0 too)."""
    value = action.get(key, default)
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():  # not '²'
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1_000_000:
        errors.append(f"{path}.{key}: expected an integer between {low} and 1000000, got {value!r}")
        return default
    return value


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}.get(
        type(value), type(value).__name__
    )


@functools.lru_cache(maxsize=256)
def _cached(encoded: bytes, groups: tuple[str, ...], compat: bool) -> tuple[Rule, ...]:
    # The decider calls decide with the same member record over and over: parse its rules once.
    return tuple(parse_rules(msgspec.json.decode(encoded), groups, compat))


class Rules:
    """The ``rules`` algorithm (see the module docstring)."""

    name: str = NAME
    options_type: type[RulesOptions] = RulesOptions
    state_type: type[RulesState] = RulesState
    #: It takes event snapshots (``Metrics.event > 0``) besides the checks: job-event rules fire on them.
    events: bool = True

    def initial_state(self, member: MemberSpec, options: RulesOptions) -> RulesState:
        """Nothing fired yet, seeded by the member's address."""
        return RulesState(seed=member_seed(member))

    def decide(
        self, member: MemberSpec, options: RulesOptions, state: RulesState, metrics: Metrics
    ) -> tuple[RulesState, list[Decision]]:
        """Evaluate every rule on one snapshot, in the order written; the inputs are untouched.

        Snapshots are taken in the order (``seq``, ``event``): a check and the event snapshots after it.
        Only checks count as checks (native backoff, the idle safety net). Rules that do not validate
        (the creator refuses them, so only a hand-written member record can carry them) raise
        ``ValueError`` naming each problem.
        """
        if state.done or (metrics.seq, metrics.event) <= (state.last_seq, state.last_event):
            return state, []
        groups = tuple(job.name for job in member.jobs)
        rules = _cached(msgspec.json.encode(member.algorithm.rules), groups, options.compat == COMPAT)
        run = _Run(member, metrics, state, rules)
        for index, rule in enumerate(rules):
            run.apply(index, rule, options)
            if run.done:
                break
        check = metrics.event == 0
        contiguous = metrics.seq == state.last_seq + 1
        inactive = state.inactive
        if check:
            inactive = 0
            if not run.decisions and idle(metrics, run.submitted):
                inactive = (state.inactive if contiguous else 0) + 1
        elif run.decisions:
            inactive = 0
        if check and not run.done and options.idle_checks and inactive >= options.idle_checks:
            why = (
                f"safety net: no job active for {plural(inactive, 'check')}, "
                f"{every(run.submitted, 'submitted job')} finished, "
                "and no rule ended the member"
            )
            run.decisions += finish(member, metrics, len(run.decisions), options.disable_termination, why)
            run.done = True
        state = RulesState(
            seed=state.seed,
            last_seq=metrics.seq,
            last_event=metrics.event,
            checks=state.checks + (1 if check else 0),
            seen=run.seen,
            seen_more=run.seen_more,
            left=run.left,
            ready_at=run.ready_at,
            skip=run.skip,
            values=run.values,
            submitted=run.submitted,
            inactive=inactive,
            done=run.done,
        )
        return state, run.decisions


class _Run:
    """The working state of one ``decide`` call."""

    def __init__(self, member: MemberSpec, metrics: Metrics, state: RulesState, rules: Sequence[Rule]) -> None:
        self.member = member
        self.metrics = metrics
        self.check = state.checks
        self.first = state.last_seq < 0
        self.left = [state.left[i] if i < len(state.left) else rule.repetitions for i, rule in enumerate(rules)]
        self.ready_at = [state.ready_at[i] if i < len(state.ready_at) else 0 for i in range(len(rules))]
        self.skip = [state.skip[i] if i < len(state.skip) else 0 for i in range(len(rules))]
        values = state.values
        self.values: list[float | None] = [values[i] if i < len(values) else None for i in range(len(rules))]
        self.previous = {
            name: (*state.seen_more.get(name, (0, 0, 0)), *state.seen.get(name, (0, 0, 0)))
            for name in state.seen.keys() | state.seen_more.keys()
        }
        self.seen = {name: (stats.finished, stats.succeeded, stats.failed) for name, stats in metrics.groups.items()}
        self.seen_more = {
            name: (stats.submitted, stats.started, stats.cancelled) for name, stats in metrics.groups.items()
        }
        self.submitted = state.submitted
        self.size = metrics.size
        self.decisions: list[Decision] = []
        self.done = False
        self.jobs: dict[str, JobSpec] = {job.name: job for job in member.jobs}

    def apply(self, index: int, rule: Rule, options: RulesOptions) -> None:
        """Perform the rule's action as often as it was triggered, its repetitions and backoff allow."""
        fired, why = self._triggered(index, rule)
        if rule.backoff_occurrences:
            # ensemble-python: each occurrence of the trigger either waits out the backoff or performs
            for _ in range(fired):
                if self.left[index] <= 0 or self.done:
                    break
                if self.skip[index] > 0:
                    self.skip[index] -= 1
                    continue
                self.skip[index] = rule.backoff
                self.left[index] -= 1
                self._perform(rule, f"rule {index + 1} ({why})", options)
            return
        times = min(fired, self.left[index])
        if times <= 0 or self.check < self.ready_at[index]:
            return
        if rule.backoff:
            times = 1
        for _ in range(times):
            self._perform(rule, f"rule {index + 1} ({why})", options)
            if self.done:
                break
        self.left[index] -= times
        # backoff is counted in checks; without one the rule may fire again on the next snapshot
        self.ready_at[index] = self.check + rule.backoff + 1 if rule.backoff else self.check

    def _triggered(self, index: int, rule: Rule) -> tuple[int, str]:
        """How many times the rule's trigger fired on this snapshot, and in words why."""
        if rule.trigger == "start":
            return (1 if self.first else 0), "start"
        if rule.trigger == "metric":
            assert rule.statistic is not None  # parse_rules sets it for every metric rule
            value = _value(self.metrics.groups.get(rule.statistic.group), rule.statistic)
            previous, self.values[index] = self.values[index], value
            if value is None:
                return 0, ""
            if rule.compare == "":
                return 1, f"{rule.statistic.name} = {value:.4g}"
            if rule.compare == "=":
                # ensemble-python's equality saw every event; a count may pass the value between two
                # snapshots (two jobs ending within the sidecar's coalescing interval): passing it counts
                passed = not rule.statistic.timed and previous is not None and previous < rule.threshold < value
                if value != rule.threshold and not passed:
                    return 0, ""
                return 1, f"{rule.statistic.name} = {value:.4g} (when: {rule.threshold:g})"
            if not _COMPARE[rule.compare](value, rule.threshold):
                return 0, ""
            return 1, f"{rule.statistic.name} = {value:.4g} {rule.compare} {rule.threshold:g}"
        position = _COUNTED.index(_JOB_EVENTS[rule.trigger])
        names = [rule.group] if rule.group else sorted(self.seen.keys() | self.previous.keys())
        events = 0
        for name in names:
            now = (*self.seen_more.get(name, (0, 0, 0)), *self.seen.get(name, (0, 0, 0)))[position]
            before = self.previous.get(name, (0, 0, 0, 0, 0, 0))[position]
            # Counts that fell come from a restarted sidecar: nothing new happened.
            events += max(0, now - before)
        return events, f"{rule.trigger} of {rule.group or 'any job'}"

    def _perform(self, rule: Rule, why: str, options: RulesOptions) -> None:
        index = len(self.decisions)
        if rule.action == "submit":
            jobs = [self.jobs[rule.target]] if rule.target else list(self.member.jobs)
            count = sum(job.count for job in jobs)
            what = f"group {rule.target}" if rule.target else "every group"
            reason = f"{why}: submit {what} ({plural(count, 'job')})"
            self.decisions.append(decision(self.member, self.metrics, index, "submit", jobs=jobs, reason=reason))
            self.submitted += count
        elif rule.action in ("grow", "shrink"):
            step = rule.value if rule.action == "grow" else -rule.value
            scaled = scale_to(self.member, _at(self.metrics, self.size), index, self.size + step, why)
            if scaled:
                self.size = scaled[0].size or self.size
                self.decisions += scaled
        else:
            self.decisions += finish(self.member, _at(self.metrics, self.size), index, options.disable_termination, why)
            self.done = True


def _at(metrics: Metrics, size: int) -> Metrics:
    """``metrics`` as if ``size`` were requested: a second scale in one check starts from the first's target."""
    return metrics if metrics.size == size else replace(metrics, size=size)


def _value(stats: GroupStats | None, statistic: Statistic) -> float | None:
    if stats is None:
        return None if statistic.timed else 0.0
    if statistic.timed and getattr(stats, statistic.needs) == 0:
        return None
    value: float | None = getattr(stats, statistic.field)
    if value is not None and statistic.root:
        return math.sqrt(max(0.0, value))
    return value
