"""The mutation check's list stays applicable: every mutant's snippet occurs exactly once in the
current source, and every test it names exists (running the mutants is tools/mutation_check.py)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "tools" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(_spec)
sys.modules["mutation_check"] = mutation_check  # dataclasses look their module up there
_spec.loader.exec_module(mutation_check)
MUTANTS = mutation_check.MUTANTS


def test_mutant_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_exactly_once_and_names_real_tests(mutant):
    source = (ROOT / mutant.path).read_text()
    assert source.count(mutant.original) == 1, (
        f"stale mutant {mutant.name}: its snippet is found {source.count(mutant.original)} times "
        f"in {mutant.path}; update it in tools/mutation_check.py")
    assert mutant.mutated != mutant.original
    assert mutant.tests
    for node in mutant.tests:
        path, _, func = node.partition("::")
        text = (ROOT / path).read_text()
        if func:
            assert re.search(rf"^def {re.escape(func.split('[')[0])}\(", text, re.M), node
