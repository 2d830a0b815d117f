"""Issue #17 item 6 on the real stack: slow image URLs (a loopback server that takes its
time) must not hold up text chats, stop loading when their client leaves, and the same image
twice in one request is fetched once. Bounded: a few dozen fetches of 1.5 s at most."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.server.conftest import free_port, start_server, stop_server

SLOW_S = 1.5


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (30, 30), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def slow_images() -> Iterator[tuple[str, Counter]]:
    """(base URL, fetch count per path) of a loopback server answering after SLOW_S."""
    fetched: Counter = Counter()
    body = _png()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            fetched[self.path] += 1
            time.sleep(SLOW_S)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", fetched
    server.shutdown()


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """`serve demo` that may fetch loopback image URLs (the slow server above)."""
    port = free_port()
    args = ["-m", "mistralpy.server.cli", "serve", "demo", "--host", "127.0.0.1"]
    args += ["--port", str(port), "--device", "cpu", "--max-model-len", "2048"]
    proc = start_server([*args, "--allow-private-image-urls"], port, timeout=300)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def _image_chat(urls: list[str]) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": "describe"})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 1}


TEXT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def test_slow_images_do_not_hold_up_text_and_stop_with_their_client(image_server, slow_images):
    """Six requests of ten slow URLs made an unrelated text chat wait 74.5 s, and went on
    loading after their clients left."""
    base, fetched = slow_images
    fetched.clear()

    async def go():
        async with httpx.AsyncClient(timeout=60) as client:
            await client.post(image_server + "/v1/chat/completions", json=TEXT)  # warm
            hogs = [
                asyncio.ensure_future(
                    client.post(
                        image_server + "/v1/chat/completions",
                        json=_image_chat([f"{base}/r{r}/i{i}.png" for i in range(10)]),
                    )
                )
                for r in range(6)
            ]
            await asyncio.sleep(0.5)
            start = time.monotonic()
            text = await client.post(image_server + "/v1/chat/completions", json=TEXT)
            text_wait = time.monotonic() - start
            for hog in hogs:  # the clients leave
                hog.cancel()
            await asyncio.gather(*hogs, return_exceptions=True)
            return text, text_wait

    text, text_wait = asyncio.run(go())
    assert text.status_code == 200
    assert text_wait < SLOW_S, f"a text chat waited {text_wait:.1f} s behind image downloads"
    time.sleep(SLOW_S + 0.5)  # fetches under way when the clients left end by now
    settled = sum(fetched.values())
    time.sleep(2 * SLOW_S)
    assert sum(fetched.values()) == settled, "images still loading for clients that left"
    assert settled < 60


def test_the_same_image_twice_is_fetched_once(image_server, slow_images):
    base, fetched = slow_images
    url = f"{base}/twice.png"
    body = _image_chat([url, url, url])
    resp = httpx.post(image_server + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert fetched["/twice.png"] == 1
