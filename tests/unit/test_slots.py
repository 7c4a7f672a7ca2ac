"""assign_slots against brute force: every assignment is valid, and no valid one loads less."""

import itertools
import random

import pytest

from horizon.engine.slots import assign_slots


def _valid(order, uses, num_slots):
    depth = num_slots - 1
    holder = [None] * num_slots
    for j, (unit, use) in enumerate(zip(order, uses)):
        if use.load:
            busy = {uses[k].slot for k in range(max(0, j - depth), j)}
            if use.slot in busy:
                return False
            holder[use.slot] = unit
        elif holder[use.slot] != unit:
            return False
    return True


def _min_loads(order, num_slots):
    """Fewest loads over every valid slot choice (loads only where the unit is not resident)."""
    depth = num_slots - 1
    best = None
    for choice in itertools.product(range(num_slots), repeat=len(order)):
        holder, loads, ok, slots = [None] * num_slots, 0, True, []
        for j, unit in enumerate(order):
            s = choice[j]
            if holder[s] != unit:
                if s in slots[max(0, j - depth):j]:
                    ok = False
                    break
                holder[s], loads = unit, loads + 1
            slots.append(s)
        if ok and (best is None or loads < best):
            best = loads
    return best


def _chain_order(num_units):
    return list(range(num_units)) + list(range(num_units - 2, -1, -1))


@pytest.mark.parametrize("num_slots", [2, 3, 4])
@pytest.mark.parametrize("num_units", [3, 4, 5])
def test_chain_orders_are_valid_and_minimal(num_slots, num_units):
    order = _chain_order(num_units)
    uses = assign_slots(order, num_slots)
    assert _valid(order, uses, num_slots)
    loads = sum(u.load for u in uses)
    if len(order) <= 9:
        assert loads == _min_loads(order, num_slots)
    # the last block sits on both sides of the head: it is never loaded twice in a row
    assert loads <= len(order) - 1


def test_double_buffering_alternates():
    uses = assign_slots(_chain_order(4), 2)
    assert [u.slot for u in uses[:4]] == [0, 1, 0, 1]
    assert [u.load for u in uses] == [True] * 4 + [False] + [True] * 2


def test_random_orders_are_valid_and_minimal():
    rng = random.Random(0)
    for _ in range(40):
        num_slots = rng.choice([2, 3])
        order = [rng.randrange(4) for _ in range(rng.randint(1, 7))]
        uses = assign_slots(order, num_slots)
        assert _valid(order, uses, num_slots)
        assert sum(u.load for u in uses) == _min_loads(order, num_slots)
