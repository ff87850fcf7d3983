"""The budget of the fuzz tests (tests/test_fuzz_*.py): `@fuzz(n)` above a hypothesis `@given`
test runs it twice over, parametrized by `budget`:

- "ci": n derandomized examples (the same ones every run), in the normal suite; a few seconds;
- "long": 50·n fresh random examples, marked `slow` and skipped unless MARN_FAST_FUZZ_LONG=1:

    MARN_FAST_FUZZ_LONG=1 pytest -m slow tests/test_fuzz_inputs.py tests/test_fuzz_ops.py
"""
import inspect
import os

import pytest
from hypothesis import HealthCheck, settings

LONG = os.environ.get("MARN_FAST_FUZZ_LONG") == "1"
LONG_FACTOR = 50
BUDGETS = ["ci", pytest.param("long", marks=[pytest.mark.slow, pytest.mark.skipif(
    not LONG, reason="the long fuzz run: MARN_FAST_FUZZ_LONG=1 pytest -m slow")])]


def fuzz(examples: int):
    """Parametrize a @given test over BUDGETS (see the module docstring)."""
    def apply(test):
        def run(budget, **fixtures):
            long = budget == "long"
            return settings(max_examples=examples * (LONG_FACTOR if long else 1), deadline=None,
                            derandomize=not long, database=None,
                            suppress_health_check=list(HealthCheck))(test)(**fixtures)
        signature = inspect.signature(test)  # the fixtures (hypothesis removed the drawn arguments)
        run.__signature__ = signature.replace(parameters=[
            inspect.Parameter("budget", inspect.Parameter.POSITIONAL_OR_KEYWORD), *signature.parameters.values()])
        run.__name__, run.__doc__ = test.__name__, test.__doc__
        return pytest.mark.parametrize("budget", BUDGETS)(run)
    return apply
