"""One node budget shared by several ensembles: weighted max-min fair share in whole nodes.

The rule both the simulator (``ensemble simulate A.yaml B.yaml --budget N``) and the running system
(the actuator's enforcement of ``ensemble up A.yaml B.yaml --budget N``) apply, so that a plan measured
in simulation is the plan the cluster carries out.

Weighted max-min fairness: no member gets more than it wants; a member that wants less than its
weighted share keeps only what it wants and the rest is divided among the others by weight; among the
members left unsatisfied, allocations are as equal (per unit of weight) as whole nodes allow. Nodes are
handed out one at a time to the unsatisfied member with the smallest ``(granted + 1) / weight``, ties
broken by member name, which gives exactly that allocation and makes it deterministic: the same wants,
weights and budget always give the same grants, whatever the order of the mappings.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping


def fair_share(wants: Mapping[str, int], weights: Mapping[str, float], budget: int) -> dict[str, int]:
    """Divide ``budget`` whole nodes among the members of ``wants`` by weighted max-min fair share.

    ``wants[name]`` is how many nodes the member would use (0: none); ``weights[name]`` its weight
    (absent: 1.0; names in ``weights`` that are not in ``wants`` are ignored). Returns a grant for every
    member of ``wants``, each ``0 <= grant <= want``, summing to ``min(budget, sum(wants))``: when the
    wants fit, every member gets what it wants. Raises ``ValueError`` naming the member for a negative
    or non-integer want, a weight that is not a finite number > 0, or a negative budget.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget: must be an integer >= 0 nodes, got {budget!r}")
    for name, want in wants.items():
        if isinstance(want, bool) or not isinstance(want, int) or want < 0:
            raise ValueError(f"wants[{name!r}]: must be an integer >= 0 nodes, got {want!r}")
    weight_of: dict[str, float] = {}
    for name in wants:
        weight = weights.get(name, 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weights[{name!r}]: must be a finite number > 0, got {weight!r}")
        weight_of[name] = float(weight)
    grants = {name: 0 for name in wants}
    if sum(wants.values()) <= budget:
        return {name: wants[name] for name in wants}
    # Each member's next node is ranked by the share per unit of weight it would then hold.
    queue = [(1 / weight_of[name], name) for name in sorted(wants) if wants[name] > 0]
    heapq.heapify(queue)
    for _ in range(budget):
        _, name = heapq.heappop(queue)
        grants[name] += 1
        if grants[name] < wants[name]:
            heapq.heappush(queue, ((grants[name] + 1) / weight_of[name], name))
    return grants


def jain_index(shares: Mapping[str, float]) -> float:
    """Jain's fairness index of ``shares``: ``(sum x)^2 / (n * sum x^2)``, 1.0 when all are equal,
    ``1/n`` when one member has everything; 1.0 for no members or all zero."""
    values = [float(value) for value in shares.values()]
    square_sum = sum(value * value for value in values)
    if not values or square_sum == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * square_sum)
