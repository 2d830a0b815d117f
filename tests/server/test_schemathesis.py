"""Property-based requests generated from the server's own OpenAPI schema: never a 5xx, and
every status the server answers is one its OpenAPI document lists (400/401/404/413 with
OpenAI error bodies, not FastAPI's default 422).

Schemathesis's pytest plugin does not load under our pytest, so the operations are walked by
hand, each with a bounded Hypothesis run.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, status_code_conformance

CHECKS = [not_a_server_error, status_code_conformance]


def walk(base_url: str, max_examples: int) -> None:
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=60)

        check()


def test_no_server_errors(fake_server):
    walk(fake_server, 20)


@pytest.mark.slow
def test_real_server_on_the_demo_checkpoint(demo_server):
    """The real stack (templates, tokenizer, engine limits): e.g. `{"messages": ""}` once
    started a generation with no end in sight."""
    walk(demo_server, 15)
