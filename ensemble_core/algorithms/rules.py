"""``rules``: the user lists triggers and actions (the original's successor, ensemble-python).

Instead of a named policy, ``algorithm.rules`` lists rules, each a **trigger** and an **action**,
evaluated in the order written on every metrics snapshot (the heartbeat: one per ``checkSeconds``)::

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
- ``job-finish`` / ``job-success`` / ``job-failure`` with ``group`` — once for every job of that group
  that finished / succeeded / failed since the previous snapshot (detected from the change of the
  group's counts in ``metrics.groups``; the first snapshot counts from zero);
- ``metric`` with ``name`` and ``when`` — whenever the named statistic satisfies ``when``: a number
  (``when: 3``, meaning *reaches*: ``>= 3``, because a count can pass a value between two snapshots)
  or a comparison string (``"> 5"``, ``">= 5"``, ``"< 5"``, ``"<= 5"``, ``"== 5"``).

Statistics, per job group (``<group>`` is a ``name`` of the member's jobs matrix):
``count.<group>.finished``, ``count.<group>.success``, ``count.<group>.failed`` (0 before any job
ended), and ``<stat>.<group>-duration`` (run time, s) and ``<stat>.<group>-pending`` (time from
submit to start, s) over the group's finished jobs, where ``<stat>`` is ``mean``, ``min``, ``max``,
``variance`` (or ``var``; sample variance, s²), ``std`` (its square root), ``iqr`` (75th minus 25th
percentile) or ``mad`` (mean absolute deviation). A duration or pending statistic of a group with no
finished job has no value and satisfies no ``when``; nor do ``variance`` and ``std`` before two.
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
Trigger = Literal["start", "job-finish", "job-success", "job-failure", "metric"]
ActionName = Literal["submit", "grow", "shrink", "terminate"]

_TRIGGERS: tuple[str, ...] = ("start", "job-finish", "job-success", "job-failure", "metric")
_ACTIONS: tuple[str, ...] = ("submit", "grow", "shrink", "terminate")
_RULE_KEYS = ("trigger", "group", "name", "when", "action")
_ACTION_KEYS = ("name", "group", "value", "repetitions", "backoff")
_COUNTS = {"finished": "finished", "success": "succeeded", "failed": "failed"}
#: Statistic name → the ``GroupStats`` field suffix it reads.
_SPREADS = {"mean": "mean", "min": "min", "max": "max", "variance": "var", "var": "var", "std": "var", "iqr": "iqr",
            "mad": "mad"}  # fmt: skip
_SERIES = {"duration": "run", "pending": "wait"}
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


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    """One validated rule."""

    trigger: Trigger
    action: ActionName
    group: str = ""
    statistic: Statistic | None = None
    compare: str = ">="
    threshold: float = 0.0
    target: str = ""
    value: int = 1
    repetitions: int = 1
    backoff: int = 0


class RulesState(msgspec.Struct, kw_only=True, frozen=True):
    """What ``rules`` remembers between checks (every field has a default)."""

    seed: int = 0
    last_seq: int = -1
    #: Checks consumed so far; backoffs are counted in checks.
    checks: int = 0
    #: Per group: finished, succeeded, failed at the last snapshot (job events are their increase).
    seen: dict[str, tuple[int, int, int]] = {}
    #: Per rule (by position): performances left, and the first check at which it may perform again.
    left: list[int] = []
    ready_at: list[int] = []
    submitted: int = 0
    inactive: int = 0
    done: bool = False


def validate_rules(algorithm_name: str, raw: object, groups: Collection[str] | None = None) -> list[str]:
    """Every problem with ``raw`` as the rules of ``algorithm_name``; an empty list means valid.

    Each problem reads ``"rules[<i>].<field>: <problem and fix>"`` (or ``"rules: ..."``). With
    ``groups`` (the member's job group names) every group a rule names must be one of them.
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
    return _parse(rules, groups)[1]


def parse_rules(raw: Sequence[Mapping[str, Any]], groups: Collection[str] | None = None) -> list[Rule]:
    """The typed rules; ``ValueError`` listing every problem when they do not validate."""
    rules, errors = _parse(list(raw), groups)
    if errors:
        raise ValueError("; ".join(errors))
    return rules


def _parse(raw: list[Any], groups: Collection[str] | None) -> tuple[list[Rule], list[str]]:
    errors: list[str] = []
    if not raw:
        return [], ["rules: the rules algorithm needs at least one rule (a trigger and an action)"]
    if len(raw) > MAX_RULES:
        return [], [f"rules: {len(raw)} rules exceed the limit of {MAX_RULES}"]
    rules: list[Rule] = []
    for index, item in enumerate(raw):
        rule = _rule(item, f"rules[{index}]", groups, errors)
        if rule is not None:
            rules.append(rule)
    return rules, errors


def _rule(item: object, path: str, groups: Collection[str] | None, errors: list[str]) -> Rule | None:
    if not isinstance(item, dict):
        errors.append(f"{path}: expected a mapping with trigger and action, got {_kind(item)}")
        return None
    before = len(errors)
    _unknown_keys(item, _RULE_KEYS, path, errors)
    trigger = _choice(item.get("trigger"), _TRIGGERS, f"{path}.trigger", errors)
    fields: dict[str, Any] = {}
    if trigger in ("job-finish", "job-success", "job-failure"):
        fields["group"] = _group(item.get("group"), f"{path}.group", groups, errors, f"{trigger} needs the job group")
    elif "group" in item and trigger is not None:
        errors.append(f"{path}.group: only job-finish, job-success and job-failure triggers take a group")
    if trigger == "metric":
        fields["statistic"] = _statistic(item.get("name"), f"{path}.name", groups, errors)
        when = _when(item.get("when"), f"{path}.when", errors)
        if when is not None:
            fields["compare"], fields["threshold"] = when
    elif trigger is not None:
        for key in ("name", "when"):
            if key in item:
                errors.append(f"{path}.{key}: only metric triggers take {key}")
    action = item.get("action")
    if not isinstance(action, dict):
        problem = "required" if action is None else f"expected a mapping, got {_kind(action)}"
        errors.append(f"{path}.action: {problem}; e.g. action: {{name: submit, group: <job group>}}")
    else:
        _action(action, f"{path}.action", groups, errors, fields)
    if len(errors) > before or trigger is None:
        return None
    return Rule(trigger=trigger, **fields)


def _action(
    action: dict[Any, Any], path: str, groups: Collection[str] | None, errors: list[str], fields: dict[str, Any]
) -> None:
    _unknown_keys(action, _ACTION_KEYS, path, errors)
    name = action.get("name")
    if name == "custom":
        errors.append(
            f"{path}.name: custom actions (user code) are not supported: an algorithm is a pure function; "
            f"use one of {', '.join(_ACTIONS)}"
        )
        return
    chosen = _choice(name, _ACTIONS, f"{path}.name", errors)
    if chosen is None:
        return
    fields["action"] = chosen
    if chosen == "submit":
        fields["target"] = _group(action.get("group"), f"{path}.group", groups, errors, "submit needs the job group")
    elif "group" in action:
        errors.append(f"{path}.group: only submit takes a group")
    if chosen in ("grow", "shrink"):
        fields["value"] = _integer(action, "value", path, errors, default=1, low=1)
    elif "value" in action:
        errors.append(f"{path}.value: only grow and shrink take a value")
    fields["repetitions"] = _integer(action, "repetitions", path, errors, default=1, low=1)
    fields["backoff"] = _integer(action, "backoff", path, errors, default=0, low=0)


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


def _statistic(value: object, path: str, groups: Collection[str] | None, errors: list[str]) -> Statistic | None:
    stats = "|".join(_SPREADS)
    forms = f"count.<group>.finished|success|failed, {stats}.<group>-duration or {stats}.<group>-pending"
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
        if series in _SERIES and group:
            statistic = Statistic(value, group, f"{_SERIES[series]}_{_SPREADS[kind]}", True, root=kind == "std")
    if statistic is None:
        errors.append(f"{path}: {value!r} is not a statistic; one of {forms}")
        return None
    if groups is not None and statistic.group not in groups:
        errors.append(f"{path}: {_not_a_group(statistic.group, groups)}")
    return statistic


def _when(value: object, path: str, errors: list[str]) -> tuple[str, float] | None:
    usage = 'a number (reaches: >= it) or a comparison such as "> 5" (>, >=, <, <=, ==)'
    if isinstance(value, bool) or value is None:
        problem = "required" if value is None else f"got {value!r}"
        errors.append(f"{path}: {problem}; expected {usage}")
        return None
    if isinstance(value, int | float):
        return ">=", float(value)
    match = _WHEN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        errors.append(f"{path}: expected {usage}, got {value!r}")
        return None
    return match.group(1) or ">=", float(match.group(2))


def _integer(action: dict[Any, Any], key: str, path: str, errors: list[str], *, default: int, low: int) -> int:
    value = action.get(key, default)
    if isinstance(value, str) and value.strip().isdigit():
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
def _cached(encoded: bytes, groups: tuple[str, ...]) -> tuple[Rule, ...]:
    # The decider calls decide with the same member record over and over: parse its rules once.
    return tuple(parse_rules(msgspec.json.decode(encoded), groups))


class Rules:
    """The ``rules`` algorithm (see the module docstring)."""

    name: str = NAME
    options_type: type[RulesOptions] = RulesOptions
    state_type: type[RulesState] = RulesState

    def initial_state(self, member: MemberSpec, options: RulesOptions) -> RulesState:
        """Nothing fired yet, seeded by the member's address."""
        return RulesState(seed=member_seed(member))

    def decide(
        self, member: MemberSpec, options: RulesOptions, state: RulesState, metrics: Metrics
    ) -> tuple[RulesState, list[Decision]]:
        """Evaluate every rule on one snapshot, in the order written; the inputs are untouched.

        Rules that do not validate (the creator refuses them, so only a hand-written member record
        can carry them) raise ``ValueError`` naming each problem.
        """
        if state.done or metrics.seq <= state.last_seq:
            return state, []
        groups = tuple(job.name for job in member.jobs)
        rules = _cached(msgspec.json.encode(member.algorithm.rules), groups)
        run = _Run(member, metrics, state, rules)
        for index, rule in enumerate(rules):
            run.apply(index, rule, options)
            if run.done:
                break
        contiguous = metrics.seq == state.last_seq + 1
        inactive = 0
        if not run.decisions and idle(metrics, run.submitted):
            inactive = (state.inactive if contiguous else 0) + 1
        if not run.done and options.idle_checks and inactive >= options.idle_checks:
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
            checks=state.checks + 1,
            seen=run.seen,
            left=run.left,
            ready_at=run.ready_at,
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
        self.previous = state.seen
        self.seen = {name: (stats.finished, stats.succeeded, stats.failed) for name, stats in metrics.groups.items()}
        self.submitted = state.submitted
        self.size = metrics.size
        self.decisions: list[Decision] = []
        self.done = False
        self.jobs: dict[str, JobSpec] = {job.name: job for job in member.jobs}

    def apply(self, index: int, rule: Rule, options: RulesOptions) -> None:
        """Perform the rule's action as often as it was triggered, its repetitions and backoff allow."""
        fired, why = self._triggered(rule)
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
        self.ready_at[index] = self.check + rule.backoff + 1

    def _triggered(self, rule: Rule) -> tuple[int, str]:
        """How many times the rule's trigger fired on this snapshot, and in words why."""
        if rule.trigger == "start":
            return (1 if self.first else 0), "start"
        if rule.trigger == "metric":
            assert rule.statistic is not None  # parse_rules sets it for every metric rule
            value = _value(self.metrics.groups.get(rule.statistic.group), rule.statistic)
            if value is None or not _COMPARE[rule.compare](value, rule.threshold):
                return 0, ""
            return 1, f"{rule.statistic.name} = {value:.4g} {rule.compare} {rule.threshold:g}"
        position = {"job-finish": 0, "job-success": 1, "job-failure": 2}[rule.trigger]
        now = self.seen.get(rule.group, (0, 0, 0))[position]
        before = self.previous.get(rule.group, (0, 0, 0))[position]
        # Counts that fell come from a restarted sidecar: nothing new happened.
        events = max(0, now - before)
        return events, f"{rule.trigger} of {rule.group}"

    def _perform(self, rule: Rule, why: str, options: RulesOptions) -> None:
        index = len(self.decisions)
        if rule.action == "submit":
            job = self.jobs[rule.target]
            reason = f"{why}: submit group {job.name} ({plural(job.count, 'job')})"
            self.decisions.append(decision(self.member, self.metrics, index, "submit", jobs=[job], reason=reason))
            self.submitted += job.count
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
    if statistic.timed and stats.finished == 0:
        return None
    value: float | None = getattr(stats, statistic.field)
    if value is not None and statistic.root:
        return math.sqrt(max(0.0, value))
    return value
