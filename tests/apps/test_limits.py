"""One request-limits concept: the server's `Limits` and the demo's `DemoLimits` extend `RequestLimits`."""

from __future__ import annotations

import pytest

from apps.demo.settings import DemoLimits
from apps.limits import RequestLimits
from apps.serve.schemas import Limits
from steer.errors import ConfigError


@pytest.mark.parametrize("limits", [Limits, DemoLimits])
def test_server_and_demo_share_the_request_limits(limits):
    shared = RequestLimits()
    assert issubclass(limits, RequestLimits)
    assert (limits().max_prompt_tokens, limits().max_new_tokens) == (
        shared.max_prompt_tokens,
        shared.max_new_tokens,
    )
    with pytest.raises(ConfigError, match=rf"{limits.__name__}\.max_new_tokens must be positive, got 0"):
        limits(max_new_tokens=0)
    with pytest.raises(ConfigError, match=rf"{limits.__name__}\.max_queue must be positive, got -1"):
        limits(max_queue=-1)


def test_demo_limits_check_their_strength_multiple():
    with pytest.raises(ConfigError, match="strength_norm_multiple must be positive"):
        DemoLimits(strength_norm_multiple=0.0)
