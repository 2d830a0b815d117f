"""`/v1/responses` on the real stack: `mistralpy serve demo` (tiny checkpoint, CPU) driven by
the official `openai` client, whole and streamed, text and image, greedy so both agree."""

from tests.server.test_http_real import client, model_name, png_data_url


def test_responses_whole_stream_image_and_previous_id(demo_server):
    c, name = client(demo_server), model_name(demo_server)
    content = [
        {"type": "input_image", "image_url": png_data_url()},
        {"type": "input_text", "text": "What is in the picture?"},
    ]
    req = {
        "model": name,
        "input": [{"role": "user", "content": content}],
        "instructions": "Answer briefly.",
        "max_output_tokens": 8,
        "temperature": 0,
    }
    res = c.responses.create(**req)
    assert res.status == "incomplete" and res.usage.output_tokens == 8
    events = list(c.responses.create(**req, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == res.output_text
    follow = c.responses.create(
        model=name, input="And then?", previous_response_id=res.id, max_output_tokens=4
    )
    assert follow.usage.input_tokens > res.usage.input_tokens  # the image turn is carried
