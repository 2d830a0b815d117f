"""`/v1/responses` with the official `openai` client (`client.responses.create`) against a fake
engine in a real server subprocess: text and image input, instructions, streaming events,
function tools, stored conversations and errors."""

import base64
import io
import re
import time

import httpx
import openai
import pytest
from PIL import Image

from mistralpy.server.responses import ResponsesRequest, ResponseStore, chat_body, input_messages
from tests.server.conftest import free_port, start_server, stop_server

TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)


def png_data_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_text_input_instructions_and_usage(fake_server):
    c = client(fake_server)
    res = c.responses.create(model="fake-model", input="hi there", instructions="be brief")
    assert res.object == "response" and res.status == "completed" and res.id.startswith("resp_")
    assert res.output_text and res.output[0].type == "message"
    assert res.instructions == "be brief"
    u = res.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens > 0
    bare = c.responses.create(model="fake-model", input="hi there")
    assert bare.usage.input_tokens < u.input_tokens  # the instructions are in the prompt


def test_max_output_tokens_gives_incomplete(fake_server):
    res = client(fake_server).responses.create(
        model="fake-model", input="hi", max_output_tokens=5, temperature=0, top_p=0.9
    )
    assert res.status == "incomplete" and res.incomplete_details.reason == "max_output_tokens"
    assert len(res.output_text) == 5 and res.usage.output_tokens == 5
    assert res.temperature == 0 and res.top_p == 0.9


def test_stream_event_sequence(fake_server):
    c = client(fake_server)
    events = list(
        c.responses.create(model="fake-model", input="hi there", temperature=0, stream=True)
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1
    final = events[-1].response
    assert "".join(deltas) == final.output_text == events[-4].text
    assert final.usage.output_tokens == len(deltas)
    whole = c.responses.create(model="fake-model", input="hi there", temperature=0)
    assert whole.output_text == final.output_text  # the fake is deterministic per prompt


def test_image_input(fake_server):
    c = client(fake_server)
    content = [
        {"type": "input_text", "text": "what is this?"},
        {"type": "input_image", "image_url": png_data_url()},
    ]
    res = c.responses.create(model="fake-model", input=[{"role": "user", "content": content}])
    assert res.status == "completed" and res.output_text
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(
            model="fake-model",
            input=[{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}],
        )
    assert "image_url" in err.value.body["message"]
    bad = [{"role": "user", "content": [{"type": "input_image", "image_url": "bad:x"}]}]
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="fake-model", input=bad)
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="fake-model", input=bad, stream=True)


def test_function_call_and_output_round_trip(fake_server):
    c = client(fake_server)
    res = c.responses.create(model="fake-model", input="weather in Paris?", tools=TOOLS)
    calls = [o for o in res.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    assert '"Paris"' in calls[0].arguments and res.tools[0].name == "get_weather"
    follow = c.responses.create(
        model="fake-model",
        previous_response_id=res.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C"}],
        tools=TOOLS,
    )
    assert follow.status == "completed" and follow.previous_response_id == res.id
    # the whole stateless conversation, as agent frameworks send it, works too
    replay = c.responses.create(
        model="fake-model",
        input=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C"},
        ],
        tools=TOOLS,
        store=False,
    )
    assert replay.status == "completed"


def test_function_call_streamed(fake_server):
    c = client(fake_server)
    whole = c.responses.create(model="fake-model", input="weather in Paris?", tools=TOOLS)
    events = list(
        c.responses.create(model="fake-model", input="weather in Paris?", tools=TOOLS, stream=True)
    )
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == whole.output[-1].arguments and done.name == "get_weather"
    added = next(e for e in events if e.type == "response.output_item.added")
    assert added.item.type == "function_call" and added.item.call_id
    assert events[-1].response.output[-1].arguments == done.arguments


def test_previous_response_id_and_store(fake_server):
    c = client(fake_server)
    first = c.responses.create(model="fake-model", input="hi there", instructions="be brief")
    second = c.responses.create(
        model="fake-model", input="and then?", previous_response_id=first.id
    )
    carried = first.usage.input_tokens + first.usage.output_tokens
    # the earlier turn is in the prompt; the earlier instructions are not (OpenAI semantics)
    assert second.usage.input_tokens > carried - len("system: be brief")
    assert c.responses.retrieve(first.id).output_text == first.output_text
    unstored = c.responses.create(model="fake-model", input="hi", store=False)
    with pytest.raises(openai.NotFoundError) as err:
        c.responses.create(model="fake-model", input="x", previous_response_id=unstored.id)
    assert err.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_unknown")
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)


def test_request_errors_are_openai_bodies(fake_server):
    c = client(fake_server)
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="fake-model", input="hi", temperature=9)
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="fake-model", input="hi", tools=[{"type": "web_search"}])
    assert err.value.body["param"].startswith("tools")
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="no-such-model", input="hi")
    raw = httpx.post(fake_server + "/v1/responses", json={"input": [{"type": "item_reference"}]})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    raw = httpx.post(fake_server + "/v1/responses", json={"input": "hi", "background": True})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "background"
    for stream in (False, True):  # the chat path's error names the field this API calls it
        body = {"input": "hi", "max_output_tokens": 10**6, "stream": stream}
        raw = httpx.post(fake_server + "/v1/responses", json=body)
        assert raw.status_code == 400 and raw.json()["error"]["param"] == "max_output_tokens"


def test_store_is_a_bounded_lru():
    store = ResponseStore(capacity=2, max_bytes=10_000)
    for rid in ("a", "b"):
        store.put({"id": rid}, [{"role": "user", "content": rid}])
    assert store.get("a") is not None  # "a" is now the most recent
    store.put({"id": "c"}, [])
    assert store.get("b") is None and store.get("a") and store.get("c")
    store.put({"id": "big"}, [{"role": "user", "content": "x" * 20_000}])
    assert len(store) == 1 and store.get("big")  # the byte bound drops older ones first
    assert store.delete("big") and not store.delete("big") and len(store) == 0


def test_client_gone_mid_stream_aborts_the_engine_request():
    port = free_port()
    proc = start_server(
        ["-m", "tests.server.fake_stack", "--port", str(port), "--delay", "0.05"], port
    )
    base = f"http://127.0.0.1:{port}"
    try:
        body = {"model": "fake-model", "input": "tell me a story", "stream": True}
        with httpx.stream("POST", base + "/v1/responses", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            while "response.output_text.delta" not in next(lines):
                pass
            assert running(base) == 1
        deadline = time.monotonic() + 2  # a whole answer takes ~3.5 s
        while running(base) != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running(base) == 0
    finally:
        stop_server(proc)


def running(base: str) -> float:
    text = httpx.get(base + "/metrics").text
    return float(re.search(r"^mistralpy_num_requests_running (\S+)$", text, re.M).group(1))


def test_input_items_become_chat_messages():
    req = ResponsesRequest.model_validate(
        {
            "input": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Let me look."}],
                },
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": "two"},
            ],
            "instructions": "You are terse.",
            "max_output_tokens": 7,
            "tool_choice": {"type": "function", "name": "f"},
            "tools": TOOLS,
        }
    )
    messages = input_messages(req.input)
    assert [m["role"] for m in messages] == ["developer", "user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == [{"type": "text", "text": "hi"}]
    assert messages[2]["content"] == "Let me look."  # one assistant turn with both calls
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]
    body = chat_body(req, [{"role": "user", "content": "earlier"}], messages)
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert body["messages"][1]["content"] == "earlier" and body["max_completion_tokens"] == 7
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["tools"][0]["function"]["name"] == "get_weather" and "stream" not in body
