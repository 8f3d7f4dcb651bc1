"""What a member's algorithm settings become under ``--algorithm NAME`` (``ensemble simulate`` / ``replay``).

The file's options that ``NAME`` takes (by name, with a value it accepts) are kept and the rest are
dropped with a note; the member's ``rules`` are kept (only the ``rules`` algorithm reads them).
"""

from __future__ import annotations

from ensemble_core import algorithms
from ensemble_core.messages import AlgorithmSpec


def carry(spec: AlgorithmSpec, name: str) -> tuple[AlgorithmSpec, list[str]]:
    """``spec`` as the spec of algorithm ``name``, and the names of the options it had to drop.

    Raises ``algorithms.UnknownAlgorithm`` for an unregistered ``name``.
    """
    accepted = set(algorithms.option_names(name))
    if name == spec.name:
        return AlgorithmSpec(name=name, options=dict(spec.options), rules=list(spec.rules)), []
    kept: dict[str, str | int | float | bool] = {}
    dropped: list[str] = []
    for key, value in spec.options.items():
        if key in accepted and not algorithms.validate_options(name, {key: value}):
            kept[key] = value
        else:
            dropped.append(key)
    return AlgorithmSpec(name=name, options=kept, rules=list(spec.rules)), dropped


def dropped_note(member: int, spec: AlgorithmSpec, name: str, dropped: list[str]) -> str:
    """The note that says which of member ``member``'s options ``--algorithm name`` dropped."""
    names = ", ".join(dropped)
    return (
        f"member {member}: --algorithm {name} does not take the file's {spec.name} option(s) {names}: "
        f"dropped (the others are kept; pass --option to set one)"
    )
