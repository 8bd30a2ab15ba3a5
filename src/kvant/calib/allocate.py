"""Choose one candidate per layer minimising the summed predicted loss under a bit budget.

A multiple-choice knapsack: layer l takes candidate c at an exact integer cost (stored bits)
and a predicted loss; the total cost must stay at or under the budget. Solved the usual
Lagrangian way: on each layer's lower convex hull of (cost, loss), upgrades are taken in
order of loss saved per extra bit (the order of the Lagrange multiplier decreasing), which
is optimal at the budgets the hull's vertices reach; the budget left when the next hull step
no longer fits is then spent greedily on any candidate (hull or not) that still fits, and
the result is compared with an exact dynamic programme over the budget cut into
``resolution`` units (each cost rounded *up* to whole units, so its answer always fits; it
can only waste ``layers / resolution`` of the budget) and with every uniform assignment (all
layers on the same candidate): the lowest predicted loss wins. The greedy alone can be far
from the optimum when a large layer's next step does not fit (up to ~3x the loss on random
5-layer problems in tests/calib/test_mixed.py); the programme closes that gap.
"""

from __future__ import annotations

import heapq
import math
from typing import Hashable

import torch

Options = dict[Hashable, tuple[int, float]]  # candidate key -> (cost in bits, predicted loss)


class BudgetError(ValueError):
    """The budget is below the cheapest assignment."""


def lower_hull(opts: Options) -> list[Hashable]:
    """Candidate keys on the lower convex hull of (cost, loss), cost increasing and loss
    strictly decreasing; dominated candidates (dearer and no better) are dropped."""
    pts = sorted(opts, key=lambda k: (opts[k][0], opts[k][1]))
    front: list[Hashable] = []
    for k in pts:  # Pareto front: each next point strictly better in loss
        if not front or opts[k][1] < opts[front[-1]][1]:
            if front and opts[k][0] == opts[front[-1]][0]:
                front.pop()
            front.append(k)
    hull: list[Hashable] = []
    for k in front:  # keep slopes increasing (less loss saved per bit as cost grows)
        while len(hull) >= 2:
            (c1, l1), (c2, l2), (c3, l3) = opts[hull[-2]], opts[hull[-1]], opts[k]
            # hull[-1] lies on or above the chord from hull[-2] to k: not on the hull
            if (l2 - l1) * (c3 - c1) >= (l3 - l1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def allocate(options: dict[str, Options], budget: int,
             resolution: int = 1 << 16) -> dict[str, Hashable]:
    """layer -> chosen candidate key, with ``sum cost <= budget`` and the predicted loss as
    low as the method above finds. Raises :class:`BudgetError` when even the cheapest
    candidate of every layer exceeds ``budget``."""
    if not options:
        return {}
    cheapest = {n: min(o, key=lambda k: (o[k][0], o[k][1])) for n, o in options.items()}
    least = sum(options[n][k][0] for n, k in cheapest.items())
    if least > budget:
        raise BudgetError(f"the budget of {budget} bits is below the {least} bits of the "
                          "cheapest candidate of every layer")
    hulls = {n: lower_hull(o) for n, o in options.items()}
    choice = {n: h[0] for n, h in hulls.items()}  # h[0] is a cheapest candidate
    spent = sum(options[n][k][0] for n, k in choice.items())
    step = {n: 0 for n in hulls}
    heap: list[tuple[float, str]] = []

    def push(n: str) -> None:
        h, i = hulls[n], step[n]
        if i + 1 < len(h):
            (c0, l0), (c1, l1) = options[n][h[i]], options[n][h[i + 1]]
            heapq.heappush(heap, (-(l0 - l1) / max(c1 - c0, 1), n))

    for n in hulls:
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        h, i = hulls[n], step[n]
        extra = options[n][h[i + 1]][0] - options[n][h[i]][0]
        if spent + extra > budget:
            continue  # this layer's next step does not fit; smaller ones elsewhere may
        spent += extra
        step[n] = i + 1
        choice[n] = h[i + 1]
        push(n)
    choice = _fill(options, choice, budget - spent)
    exact = _programme(options, budget, resolution)
    if exact is not None and total(options, exact, 1) < total(options, choice, 1):
        choice = exact
    return _best_uniform(options, choice, budget)


def _programme(options: dict[str, Options], budget: int, resolution: int) -> dict | None:
    """Min-loss choice by dynamic programming over ``resolution`` budget units (costs
    rounded up, so the choice fits the budget); None when the rounding leaves no fit."""
    resolution = max(1, min(resolution, budget))  # a small budget: whole bits, exact
    unit = budget / resolution
    names = list(options)
    keys = {n: list(options[n]) for n in names}
    inf = float("inf")
    best = torch.full((resolution + 1,), inf, dtype=torch.float64)
    best[0] = 0.0  # best[r]: least loss of the layers so far using exactly r units
    picks = []
    for n in names:
        new = torch.full_like(best, inf)
        arg = torch.zeros(resolution + 1, dtype=torch.int16)  # candidate index per r
        for j, k in enumerate(keys[n]):
            cost, loss = options[n][k]
            w = math.ceil(cost / unit - 1e-9) if unit > 0 else 0
            if w > resolution:
                continue
            cand = best[: resolution + 1 - w] + loss
            better = cand < new[w:]
            new[w:] = torch.where(better, cand, new[w:])
            arg[w:] = torch.where(better, torch.tensor(j, dtype=torch.int16), arg[w:])
        best = new
        picks.append(arg)
    if not torch.isfinite(best).any():
        return None
    r = int(best.argmin())
    choice = {}
    for n, arg in zip(reversed(names), reversed(picks)):
        k = keys[n][int(arg[r])]
        choice[n] = k
        r -= math.ceil(options[n][k][0] / unit - 1e-9) if unit > 0 else 0
    return choice


def _fill(options: dict[str, Options], choice: dict, left: int) -> dict:
    """Spend what is left on the single change that saves the most loss and fits, again and
    again (off-hull candidates included)."""
    choice = dict(choice)
    while True:
        best = None
        for n, o in options.items():
            c0, l0 = o[choice[n]]
            for k, (c, l) in o.items():
                if l < l0 and c - c0 <= left and (best is None or l0 - l > best[0]):
                    best = (l0 - l, n, k, c - c0)
        if best is None:
            return choice
        _, n, k, extra = best
        choice[n] = k
        left -= extra


def total(options: dict[str, Options], choice: dict, what: int) -> float:
    """Sum over layers of the chosen candidates' cost (``what=0``) or loss (``what=1``)."""
    return sum(options[n][k][what] for n, k in choice.items())


def _best_uniform(options: dict[str, Options], choice: dict, budget: int) -> dict:
    keys = set.intersection(*(set(o) for o in options.values()))
    best, best_loss = choice, total(options, choice, 1)
    for key in keys:
        uni = {n: key for n in options}
        if total(options, uni, 0) <= budget and total(options, uni, 1) < best_loss:
            best, best_loss = uni, total(options, uni, 1)
    return best
