"""schemathesis against the server's own /openapi.json on a live uvicorn server: never a 5xx.

Examples are bounded (a few dozen per operation) and the server is configured so that each
generated request stays cheap: the tiny model, at most 8 output tokens, 4 by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from _factories import make_config
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from joulecap.runtime.api.app import create_app
from joulecap.runtime.api.server import BackgroundServer
from joulecap.runtime.runtime import Runtime


@pytest.fixture(scope="module")
def live_base_url(tiny_idefics3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    cfg = make_config(
        tiny_idefics3,
        tmp,
        server={"max_tokens_limit": 8, "max_images": 2, "request_timeout_s": 60.0},
        energy={"idle_baseline_s": 0.0},
        scheduler={"default_max_tokens": 4},
    )
    runtime = Runtime(cfg)
    server = BackgroundServer(create_app(runtime)).start()
    yield server.base_url
    server.stop()
    runtime.close()


MAX_EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 15}
"""Examples per operation and mode: positive (schema-valid) and negative (schema-violating)."""


@pytest.mark.slow
def test_no_server_errors(live_base_url: str) -> None:
    schema = schemathesis.openapi.from_url(live_base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/energy/estimate", "GET /v1/energy/ledger"} <= labels
    calls: dict[str, list[int]] = {}
    for operation in operations:
        for mode, examples in MAX_EXAMPLES.items():

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                response = case.call(base_url=live_base_url, timeout=120)
                calls.setdefault(case.operation.label, []).append(response.status_code)
                detail = (case.method, case.path, str(case.body)[:300], response.text[:300])
                assert response.status_code < 500, detail
                if response.status_code >= 400 and case.path != "/metrics":
                    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}, detail

            with contextlib.suppress(Unsatisfiable):  # no inputs: no schema-violating (negative) cases
                check()
    assert set(calls) == labels
    # Valid bodies really ran (the fuzzing is not all bounced off validation).
    assert 200 in calls["POST /v1/chat/completions"] and 200 in calls["POST /v1/energy/estimate"]
    print({label: sorted(set(statuses)) for label, statuses in calls.items()})
