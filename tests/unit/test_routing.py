"""The canary split: a stable, proportional coin per caller."""

import hashlib

import pytest

from service.adapters.service import in_canary
from service.auth import Caller, Role

CALLERS = [Caller(key_id=i, name=f"c{i}", role=Role.user, key_hash=hashlib.sha256(f"key-{i}".encode()).hexdigest())
           for i in range(20_000)]


@pytest.mark.parametrize("percent", [1, 10, 25, 50])
def test_the_configured_share_of_distinct_callers_gets_the_canary(percent):
    share = sum(in_canary(c, percent) for c in CALLERS) / len(CALLERS)
    assert abs(share - percent / 100) < 0.01


def test_a_caller_always_gets_the_same_arm_and_keeps_it_when_the_canary_grows():
    at_10 = {c.key_id for c in CALLERS if in_canary(c, 10)}
    assert at_10 == {c.key_id for c in CALLERS if in_canary(c, 10)}
    assert at_10 < {c.key_id for c in CALLERS if in_canary(c, 25)}
