"""The algorithm plug-in interface, the registry of algorithms, options parsing and decision helpers.

An algorithm is a pure function of a member's spec, its typed options, its state and one metrics
snapshot (see DESIGN.md, "Algorithms"). Its state is a ``msgspec.Struct`` that the decider stores
between calls as ``msgspec.json.encode(state)`` and reads back with
``msgspec.json.decode(data, type=algorithm.state_type)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeVar, get_args

import msgspec

from ensemble_core.messages import Decision, JobSpec, MemberSpec, Metrics

OptionsT = TypeVar("OptionsT", bound=msgspec.Struct)
StateT = TypeVar("StateT", bound=msgspec.Struct)

#: An option value as it arrives from the Ensemble's YAML.
RawOption = str | int | float | bool


class Algorithm(Protocol[OptionsT, StateT]):
    """What the decider needs of an algorithm.

    Implementations are pure: no I/O, no wall clock (the time is ``metrics.time``), randomness only
    from a seed kept in the state, and inputs are never mutated (a new state is returned).
    """

    #: The name users write in ``algorithm.name``.
    name: str
    #: The options struct; field names as users write them are its encode names (camelCase).
    options_type: type[OptionsT]
    #: The state struct, JSON-serialisable with msgspec; fields must have defaults so that a state
    #: stored by an older version still decodes.
    state_type: type[StateT]

    def initial_state(self, member: MemberSpec, options: OptionsT) -> StateT:
        """The state before the member's first metrics; deterministic for the same member."""
        ...

    def decide(
        self, member: MemberSpec, options: OptionsT, state: StateT, metrics: Metrics
    ) -> tuple[StateT, list[Decision]]:
        """The next state and the decisions (possibly none) for one metrics snapshot."""
        ...


class UnknownAlgorithm(LookupError):
    """An algorithm name that is not registered."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        nearest = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {nearest[0]}?" if nearest else ""
        super().__init__(f"unknown algorithm {name!r}{hint} (known: {', '.join(known)})")


class OptionsError(ValueError):
    """Options that do not fit their algorithm; ``errors`` holds one ``"<option>: <problem>"`` each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


_registry: dict[str, Algorithm[Any, Any]] = {}


def register(algorithm: Algorithm[Any, Any]) -> None:
    """Make ``algorithm`` available under ``algorithm.name``.

    Registering the same object twice is harmless; a different algorithm under a taken name is a
    ``ValueError`` (two plug-ins must not silently replace each other).
    """
    existing = _registry.get(algorithm.name)
    if existing is not None and existing is not algorithm:
        raise ValueError(f"an algorithm named {algorithm.name!r} is already registered")
    _registry[algorithm.name] = algorithm


def names() -> list[str]:
    """The registered algorithm names, sorted."""
    return sorted(_registry)


def get(name: str) -> Algorithm[Any, Any]:
    """The algorithm registered as ``name``; ``UnknownAlgorithm`` (naming the nearest) otherwise."""
    try:
        return _registry[name]
    except KeyError:
        raise UnknownAlgorithm(name, names()) from None


def validate_options(algorithm_name: str, raw: Mapping[str, RawOption]) -> list[str]:
    """Every problem with ``raw`` as options of ``algorithm_name``; an empty list means valid.

    Each problem reads ``"<option>: <problem and fix>"``; an unknown algorithm is reported as a
    single ``"name: unknown algorithm ..."`` problem.
    """
    try:
        algorithm = get(algorithm_name)
    except UnknownAlgorithm as error:
        return [f"name: {error}"]
    return _convert_options(algorithm, raw)[1]


def parse_options(algorithm_name: str, raw: Mapping[str, RawOption]) -> msgspec.Struct:
    """``raw`` as the typed options struct of ``algorithm_name`` (unset options take defaults).

    Raises ``UnknownAlgorithm`` for an unregistered name and ``OptionsError`` listing every problem
    for bad options (unknown names, wrong types, values out of range).
    """
    options, errors = _convert_options(get(algorithm_name), raw)
    if options is None:
        raise OptionsError(errors)
    return options


def option_names(algorithm_name: str) -> list[str]:
    """The option names ``algorithm_name`` accepts, as written in YAML (camelCase)."""
    return [field.encode_name for field in msgspec.structs.fields(get(algorithm_name).options_type)]


def _convert_options(
    algorithm: Algorithm[Any, Any], raw: Mapping[str, RawOption]
) -> tuple[msgspec.Struct | None, list[str]]:
    fields = {field.encode_name: field for field in msgspec.structs.fields(algorithm.options_type)}
    valid = ", ".join(fields)
    converted: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in raw.items():
        field = fields.get(key)
        if field is None:
            errors.append(f"{key}: {_unknown_option(key, algorithm.name, list(fields), valid)}")
            continue
        try:
            converted[key] = _convert_value(value, field.type)
        except ValueError as error:
            errors.append(f"{key}: {error}")
    if errors:
        return None, errors
    # Every field was converted on its own above; this builds the struct with defaults filled in.
    options: msgspec.Struct = msgspec.convert(converted, type=algorithm.options_type)
    return options, []


def _unknown_option(key: str, algorithm_name: str, valid_names: list[str], valid: str) -> str:
    # Compare case-insensitively so that ``scalechecks`` or ``ScaleChecks`` still find their match.
    lowered = {name.lower(): name for name in valid_names}
    nearest = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)
    hint = f"; did you mean {lowered[nearest[0]]}?" if nearest else ""
    return f"unknown option for {algorithm_name}{hint} (valid: {valid})"


_TRUE_WORDS = frozenset({"yes", "true"})
_FALSE_WORDS = frozenset({"no", "false"})


def _convert_value(value: RawOption, annotation: Any) -> Any:
    """``value`` converted to ``annotation`` leniently (``"5"`` → 5, ``"yes"`` → True).

    Raises ``ValueError`` with a message that says what is expected and what was given.
    """
    info = msgspec.inspect.type_info(annotation)
    if isinstance(info, msgspec.inspect.BoolType) and isinstance(value, str):
        # The original had no booleans and wrote "yes" / "no"; YAML may also quote true / false.
        word = value.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
    try:
        return msgspec.convert(value, type=annotation, strict=False)
    except msgspec.ValidationError as error:
        raise ValueError(_problem(info, annotation, value, error)) from None


def _problem(info: msgspec.inspect.Type, annotation: Any, value: RawOption, error: msgspec.ValidationError) -> str:
    if isinstance(info, msgspec.inspect.LiteralType):
        return _literal_problem(value, annotation)
    if isinstance(info, msgspec.inspect.BoolType):
        expected = "expected a boolean (yes/no or true/false)"
    elif isinstance(info, msgspec.inspect.IntType):
        expected = "expected an integer" + _bounds(info.ge, info.le)
    elif isinstance(info, msgspec.inspect.FloatType):
        expected = "expected a number" + _bounds(info.ge, info.le)
    else:
        # Kinds no registered algorithm uses yet keep msgspec's own wording.
        expected = str(error)
    return f"{expected}, got {value!r}"


def _literal_problem(value: RawOption, annotation: Any) -> str:
    # get_args keeps the declared order, which reads better than msgspec's sorted values.
    choices = [str(choice) for choice in get_args(annotation)]
    shown = ", ".join(repr(choice) if choice == "" else choice for choice in choices)
    problem = f"must be one of {shown}, got {value!r}"
    # A wrong capital (``nextjob``) is the usual slip: point at the spelling meant.
    by_lower = {choice.lower(): choice for choice in choices if choice}
    nearest = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1, cutoff=0.6)
    if nearest:
        problem += f"; did you mean {by_lower[nearest[0]]}?"
    return problem


def _bounds(ge: float | None, le: float | None) -> str:
    if ge is not None and le is not None:
        return f" between {_number(ge)} and {_number(le)}"
    if ge is not None:
        return f" >= {_number(ge)}"
    if le is not None:
        return f" <= {_number(le)}"
    return ""


def _number(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def clamp(member: MemberSpec, target: int) -> int:
    """``target`` moved into the member's allowed sizes, ``[max(1, min_size), max_size]``.

    A ``max_size`` below the lower bound is treated as equal to it, so the result is always ≥ 1.
    """
    lower = max(1, member.min_size)
    upper = max(lower, member.max_size)
    return min(max(target, lower), upper)


def decision(
    member: MemberSpec,
    metrics: Metrics,
    index: int,
    action: str,
    *,
    size: int | None = None,
    jobs: Iterable[JobSpec] = (),
    order: str = "",
    seed: int = 0,
    reason: str,
) -> Decision:
    """A decision about ``member`` taken on ``metrics``, the ``index``-th of that call.

    Its id, ``"<namespace>/<ensemble>/<member>/<metrics.seq>/<index>"`` (``<seq>e<event>`` for an event
    snapshot, ``Metrics.event > 0``), is the same every time the
    same metrics are decided on, so a redelivered or replayed decision can be recognised (and
    de-duplicated downstream). ``time`` is ``metrics.time`` and ``based_on`` is ``metrics.seq``.
    """
    return Decision(
        namespace=member.namespace,
        ensemble=member.ensemble,
        member=member.member,
        id=f"{member.namespace}/{member.ensemble}/{member.member}/{_snapshot(metrics)}/{index}",
        time=metrics.time,
        based_on=metrics.seq,
        action=action,
        size=size,
        jobs=list(jobs),
        order=order,
        seed=seed,
        reason=reason,
    )


def _snapshot(metrics: Metrics) -> str:
    return f"{metrics.seq}e{metrics.event}" if metrics.event else str(metrics.seq)


def takes_events(algorithm: object) -> bool:
    """Whether ``algorithm`` decides on event snapshots (``Metrics.event > 0``) too, not only on checks.

    An algorithm says so with a class attribute ``events = True``; every other one counts checks and is
    given checks only (the decider skips event snapshots for it).
    """
    return getattr(algorithm, "events", False) is True
