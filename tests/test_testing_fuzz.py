"""Property-based fuzzing of convert() (and save/load) on random small conv nets; see fxsurgeon.testing.fuzz.

A modest, derandomised number of examples runs here (CI stays stable and fast); benchmarks/fuzz.py runs
thousands. A failure is shrunk by Hypothesis to a minimal net spec, printed in the report: rebuild it with
``fxsurgeon.testing.fuzz.FuzzNet(spec)``.
"""

import json
import random

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fxsurgeon.testing.fuzz import (  # noqa: E402
    FuzzNet,
    RandomDraw,
    check_approximate,
    check_exact,
    generate_spec,
    net_specs,
    option_sets,
)

CI = dict(deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def one_thread():
    # tiny convs: thread hand-offs cost more than the arithmetic, and the CI box is shared
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_generator_covers_every_feature():
    """The strategy is not vacuous: over a few hundred draws every op kind and conv feature shows up."""
    seen = set()
    for seed in range(300):
        spec = generate_spec(RandomDraw(random.Random(seed)))
        assert json.loads(json.dumps(spec)) == spec  # JSON, so save/load can rebuild it by factory name
        for op in spec["ops"]:
            seen.add(op["op"])
            if op["op"] == "conv":
                seen.add("tie" if "tie" in op else "conv")
                seen.add(f"groups>1={op['groups'] > 1}")
                seen.add(f"k={op['k'][0]}x{op['k'][1]}")
                seen.add(f"stride={op['stride']}")
                seen.add(f"dilation={op['dilation']}")
                seen.add(f"padding={'same' if op['padding'] == 'same' else 'int'}")
                seen.add(f"mode={op['padding_mode']}")
        if spec["head"]:
            seen.add(f"head={spec['head']['pool']}")
    expected = {"conv", "tie", "call", "add", "cat", "pool", "groups>1=True", "k=3x1", "k=5x5", "stride=2",
                "dilation=2", "padding=same", "mode=reflect", "mode=circular", "mode=replicate",
                "head=avg", "head=mean", "head=max", "head=flatten"}
    assert expected <= seen, expected - seen
    spec = generate_spec(RandomDraw(random.Random(1)))
    net = FuzzNet(spec)
    assert net(torch.randn(2, *spec["input"])).shape[0] == 2


@settings(max_examples=40, **CI)
@given(spec=net_specs(), train=st.booleans(), freeze=st.booleans(), double=st.booleans())
def test_exact_recipes_reproduce_the_outputs(spec, train, freeze, double):
    check_exact(spec, train=train, freeze=freeze, dtype=torch.float64 if double else torch.float32)


@settings(max_examples=40, **CI)
@given(spec=net_specs(), options=option_sets(), train=st.booleans())
def test_approximate_recipes_give_finite_outputs_or_a_surgery_error(spec, options, train):
    check_approximate(spec, options, train=train)


@settings(max_examples=12, **CI)
@given(spec=net_specs(max_ops=5), options=option_sets())
def test_save_load_round_trip_on_random_nets(spec, options):
    check_exact(spec, round_trip=True)
    check_approximate(spec, options, round_trip=True)
