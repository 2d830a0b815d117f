"""The chat page in a real browser: Debian's chromium, headless, driven by Playwright (no
browser download), against a fake-engine server that needs an API key and streams slowly
enough (50 ms a token) to be watched and stopped."""

import re
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.server.conftest import free_port, start_server, stop_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "sekret"
TOOLS = '[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]'

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        shutil.which("chromium") is None,
        reason="Debian's chromium is not installed (scripts/install_browser.sh installs it)",
    ),
]


@pytest.fixture(scope="module")
def slow_server() -> Iterator[str]:
    port = free_port()
    args = ["-m", "tests.server.fake_stack", "--port", str(port), "--api-key", KEY]
    proc = start_server([*args, "--delay", "0.05"], port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, slow_server) -> Iterator[Page]:
    """The page, the API key entered at its prompt; fails on any CSP violation or JS error."""
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    problems: list[str] = []
    # a 401 answer is logged as a failed load; anything else (CSP refusals) is a problem
    pg.on(
        "console", lambda m: m.type == "error" and "401" not in m.text and problems.append(m.text)
    )
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.goto(slow_server)
    expect(pg.locator("#key-form")).to_be_visible()
    pg.fill("#api-key", KEY)
    pg.click("#key-form button")
    expect(pg.locator("#model-name")).to_have_text("fake-model")
    yield pg
    context.close()
    assert not problems


def running(base: str) -> float:
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(r"^mistralpy_num_requests_running (\S+)$", text, re.M).group(1))


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def test_streamed_answer_and_speed_readout(page):
    send(page, "hi there")
    reply = page.locator(".msg.assistant").last
    expect(reply).to_have_class(re.compile("streaming"))
    expect(reply).to_have_text(re.compile(r"\w\w"))
    early = len(reply.inner_text())
    time.sleep(0.5)
    assert len(reply.inner_text()) > early  # tokens keep arriving
    expect(page.locator("#stop")).to_be_visible()
    expect(reply).not_to_have_class(re.compile("streaming"), timeout=20_000)
    expect(page.locator("#speed")).to_have_text(re.compile(r"^\d+ tokens · [\d.]+ tok/s$"))
    expect(page.locator("#stop")).to_be_hidden()


def test_attached_png_gets_an_answer(page, tmp_path):
    from PIL import Image

    path = tmp_path / "red.png"
    Image.new("RGB", (16, 16), (220, 20, 20)).save(path)
    page.set_input_files("#file", str(path))
    expect(page.locator("#attachments img")).to_have_count(1)
    send(page, "What is in the picture?")
    expect(page.locator(".msg.user img")).to_have_count(1)
    expect(page.locator("#attachments img")).to_have_count(0)
    reply = page.locator(".msg.assistant").last
    expect(reply).not_to_have_class(re.compile("streaming"), timeout=20_000)
    assert len(reply.inner_text()) > 10 and "error" not in reply.get_attribute("class")


def test_stop_aborts_the_request_on_the_server(page, slow_server):
    send(page, "tell me a story")
    reply = page.locator(".msg.assistant").last
    expect(reply).to_have_text(re.compile(r"\w\w"))
    assert running(slow_server) == 1
    page.click("#stop")
    expect(reply.locator(".note")).to_have_text("[stopped]")
    deadline = time.monotonic() + 2
    while running(slow_server) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(slow_server) == 0
    shown = reply.inner_text()
    time.sleep(0.3)
    assert reply.inner_text() == shown and len(shown) < 60  # a whole answer is ~70 chars


def test_tool_call_is_displayed(page):
    page.fill("#tools", TOOLS)
    page.fill("#system", "You check the weather.")
    send(page, "weather in Paris?")
    call = page.locator(".msg.assistant .tool-call")
    expect(call).to_contain_text("get_weather")
    expect(call).to_contain_text('"city": "Paris"')


def test_markdown_rendering_is_xss_safe(page):
    render = "md => window.mistralpyChat.renderMarkdown(md).innerHTML"
    html = page.evaluate(render, "**bold** _it_ `x<y`\n\n- a\n- b\n\n```py\nif a < b: pass\n```")
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html
    assert "<code>x&lt;y</code>" in html and "<ul><li>a</li><li>b</li></ul>" in html
    assert '<pre><code class="language-py">if a &lt; b: pass</code></pre>' in html
    evil = page.evaluate(
        render,
        '<img src=x onerror="window.pwned=1"> [click](javascript:alert(1)) [ok](https://a.b)',
    )
    assert "<img" not in evil and "&lt;img" in evil
    assert "javascript:" not in re.findall(r'href="[^"]*"', evil).__str__()
    assert 'href="https://a.b"' in evil
    # the same text as a model answer is shown, not run
    page.evaluate(
        "document.body.append(window.mistralpyChat.renderMarkdown('<img src=x onerror=\"window.pwned=1\">'))"
    )
    time.sleep(0.2)
    assert page.evaluate("window.pwned === undefined")


def test_png_on_the_real_demo_model(browser, demo_server, tmp_path):
    """The PNG goes through the real image path (decode, resize, vision tower) and back."""
    from PIL import Image

    path = tmp_path / "tile.png"
    Image.new("RGB", (40, 30), (20, 120, 220)).save(path)
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(demo_server)
        expect(pg.locator("#model-name")).not_to_be_empty()
        pg.fill("#max-tokens", "8")
        pg.set_input_files("#file", str(path))
        expect(pg.locator("#attachments img")).to_have_count(1)
        send(pg, "Describe the image.")
        reply = pg.locator(".msg.assistant").last
        expect(reply).not_to_have_class(re.compile("streaming"))
        assert "error" not in reply.get_attribute("class")
        expect(pg.locator("#speed")).to_have_text(re.compile(r"^8 tokens"))
    finally:
        context.close()


PASTE_PNG = """b64 => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
  document.getElementById("prompt").dispatchEvent(
    new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
}"""


def test_pasted_image_and_image_url(page):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (10, 200, 10)).save(buf, format="PNG")
    page.evaluate(PASTE_PNG, base64.b64encode(buf.getvalue()).decode())
    expect(page.locator("#attachments img")).to_have_count(1)
    page.fill("#image-url", "https://images.example/cat.png")
    page.click("#add-url")
    expect(page.locator("#attachments .chip")).to_have_count(2)
    send(page, "Compare these.")
    user = page.locator(".msg.user").last
    expect(user.locator("img")).to_have_count(1)
    expect(user).to_contain_text("image: https://images.example/cat.png")
    reply = page.locator(".msg.assistant").last
    expect(reply).not_to_have_class(re.compile("streaming"))
    assert "error" not in reply.get_attribute("class")
