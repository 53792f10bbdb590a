"""The serving series (vLLM's names): TTFT, TPOT, end-to-end latency, queue gauges, token counters."""

from __future__ import annotations

import pytest
from test_metrics import result, samples

from joulecap.runtime.metrics import Metrics


def test_latency_series_from_a_finished_request() -> None:
    m = Metrics()
    r = result(4.0, None)  # 4 tokens; first token at 0.1 s, last at 0.5 s; 30 prompt tokens
    m.observe_latency(r, arrival_s=-0.2)  # arrived 0.2 s before its run started (queued)
    s = samples(m)
    model = (("model", "m1"),)
    assert s[("joulecap_time_to_first_token_seconds_sum", model)] == pytest.approx(0.3)
    assert s[("joulecap_time_per_output_token_seconds_sum", model)] == pytest.approx(0.4 / 3)
    assert s[("joulecap_e2e_request_latency_seconds_sum", model)] == pytest.approx(0.7)
    assert s[("joulecap_time_to_first_token_seconds_bucket", (("le", "0.25"), *model))] == 0.0
    assert s[("joulecap_time_to_first_token_seconds_bucket", (("le", "0.5"), *model))] == 1.0
    assert s[("joulecap_prompt_tokens_total", model)] == 30.0
    assert s[("joulecap_generation_tokens_total", model)] == 4.0


def test_no_token_requests_have_no_ttft_or_tpot() -> None:
    from dataclasses import replace

    m = Metrics()
    r = result(1.0, None)
    aborted = replace(r, generation=replace(r.generation, token_ids=(), stop_reason="aborted"))
    one = replace(r, generation=replace(r.generation, token_ids=(5,)))
    m.observe_latency(aborted, arrival_s=0.0)
    m.observe_latency(one, arrival_s=0.0)
    s = samples(m)
    model = (("model", "m1"),)
    assert s[("joulecap_time_to_first_token_seconds_count", model)] == 1.0
    assert s.get(("joulecap_time_per_output_token_seconds_count", model), 0.0) == 0.0
    assert s[("joulecap_e2e_request_latency_seconds_count", model)] == 2.0
    assert s[("joulecap_generation_tokens_total", model)] == 1.0


def test_queue_gauges() -> None:
    m = Metrics()
    m.set_queue_state("m1", running=3, waiting=5)
    m.set_queue_state("m1", running=2, waiting=-1)  # never negative
    s = samples(m)
    assert s[("joulecap_num_requests_running", (("model", "m1"),))] == 2.0
    assert s[("joulecap_num_requests_waiting", (("model", "m1"),))] == 0.0
