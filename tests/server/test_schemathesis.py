"""Property-based requests generated from the server's own OpenAPI schema: never a 5xx.

Schemathesis's pytest plugin does not load under our pytest, so the operations are walked by
hand, each with a bounded Hypothesis run.
"""

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error


def test_no_server_errors(fake_server):
    schema = schemathesis.openapi.from_url(fake_server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(base_url=fake_server, checks=[not_a_server_error], timeout=30)

        check()
