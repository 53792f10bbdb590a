"""Building a `Request`: every option is checked once, in `joulecap.runtime.requests.build_request`,
against the server's `RequestLimits` (the scheduler and the policies trust what they are given)."""

from __future__ import annotations

from typing import Any

import pytest

from joulecap.runtime.errors import InvalidRequest
from joulecap.runtime.requests import RequestLimits, RequestOptions, build_request, parse_budget
from joulecap.runtime.types import ChatMessage, Request, TextPart

MESSAGES = (ChatMessage("user", (TextPart("hi"),)),)
LIMITS = RequestLimits(budget_min_j=1.0, budget_max_j=1000.0, policies=frozenset({"joint", "baseline"}))


def build(**options: Any) -> Request:
    return build_request(MESSAGES, (), RequestOptions(**options), LIMITS)


@pytest.mark.parametrize("budget", [0.0, -1.0, float("inf"), float("nan"), 0.5, 2000.0, "abc", True])
def test_budget_out_of_range_is_400(budget: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        build(energy_budget_j=budget)
    assert err.value.param == "energy_budget_j" and err.value.http_status == 400
    assert err.value.code == "invalid_budget"


def test_the_budget_error_names_the_field_it_came_from() -> None:
    with pytest.raises(InvalidRequest) as err:
        build(energy_budget_j="0", budget_param="X-Energy-Budget-J")
    assert err.value.param == "X-Energy-Budget-J"


@pytest.mark.parametrize("budget,want", [(1.0, 1.0), (1000.0, 1000.0), ("2.5", 2.5), (7, 7.0)])
def test_budget_in_range_is_kept(budget: object, want: float) -> None:
    assert build(energy_budget_j=budget).energy_budget_j == want


def test_parse_budget_reads_headers_and_bodies() -> None:
    assert parse_budget(" 3.25 ", param="h") == 3.25
    assert parse_budget(2, param="h") == 2.0
    with pytest.raises(InvalidRequest, match="greater than 0"):
        parse_budget("-0", param="h")


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_invalid_tau_is_400(tau: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        build(tau=tau)
    assert err.value.param == "tau" and err.value.http_status == 400


def test_valid_options_become_the_request() -> None:
    request = build(
        tau=1.0, max_tokens=12, policy="baseline", temperature=0.7, top_p=0.9, seed=3, stream=True
    )
    assert (request.tau, request.max_tokens, request.policy) == (1.0, 12, "baseline")
    sampling = request.sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed, sampling.greedy) == (0.7, 0.9, 3, False)
    assert request.stream is True and request.energy_budget_j is None
    assert request.request_id.startswith("chatcmpl-") and request.messages == MESSAGES
    assert build().request_id != build().request_id


def test_unknown_policy_is_400_listing_the_known_ones() -> None:
    with pytest.raises(InvalidRequest) as err:
        build(policy="magic")
    assert err.value.param == "policy" and "baseline, joint" in err.value.message


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", 4097),
        ("max_tokens", 2.5),
        ("temperature", 2.5),
        ("top_p", 0.0),
        ("seed", 2**64),
        ("seed", True),
    ],
)
def test_other_options_out_of_range_are_400(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        build(**{field: value})
    assert err.value.param == field and err.value.http_status == 400
