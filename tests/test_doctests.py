"""The doctest examples in rule and helper docstrings run in CI."""

import doctest
import importlib

import pytest

MODULES = ["krypton_db.graph", "krypton_db.planner.ivm.registry", "krypton_db.planner.batching",
           "krypton_db.planner.delta_plan", "krypton_db.sqltext", "krypton_db.sqlviews"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0
