"""Issue #17 item 6 on the real stack: slow image URLs (a loopback server that takes its
time) must not hold up text chats, stop loading when their client leaves, and the same image
twice in one request is fetched once. Bounded: a few dozen fetches of 1.5 s at most, and
two downloads trickling for 15 s at most."""

from __future__ import annotations

import asyncio
import contextlib
import io
import select
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


class _QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """The base URL of a loopback server of `handler`, one thread per connection."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def slow_images() -> Iterator[tuple[str, Counter]]:
    """(base URL, fetch count per path) of a loopback server answering after SLOW_S."""
    fetched: Counter = Counter()
    body = _png()

    class Handler(_QuietHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            fetched[self.path] += 1
            time.sleep(SLOW_S)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with _serving(Handler) as base:
        yield base, fetched


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


SLOW_FOR_S = 15.0  # longer than the image policy's 10 s deadline: only the stop flag ends it


@pytest.fixture(params=["drips", "stalls"])
def slow_image(request) -> Iterator[tuple[str, threading.Event, list[float]]]:
    """(URL, fetch started, [when the fetcher closed the connection]) of a loopback server
    that sends an image's headers, then one byte every 50 ms ("drips") or nothing more
    ("stalls": a read waits on)."""
    drips = request.param == "drips"
    started = threading.Event()
    closed_at: list[float] = []

    class Handler(_QuietHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            started.set()
            end = time.monotonic() + SLOW_FOR_S
            try:
                while time.monotonic() < end:
                    if drips:
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                    readable, _, _ = select.select([self.connection], [], [], 0.05)
                    if readable and not self.connection.recv(1):  # the fetcher hung up
                        break
            except OSError:  # reset by the fetcher
                pass
            closed_at.append(time.monotonic())

    with _serving(Handler) as base:
        yield f"{base}/slow.png", started, closed_at


def test_a_download_under_way_ends_with_its_client(image_server, slow_image):
    """A client that leaves while its image is still arriving: the server hangs up on the image
    host within a second, rather than reading on to the download's 10 s deadline."""
    url, started, closed_at = slow_image

    async def go() -> float:
        async with httpx.AsyncClient(timeout=60) as client:
            chat = client.post(image_server + "/v1/chat/completions", json=_image_chat([url]))
            request = asyncio.ensure_future(chat)
            assert await asyncio.to_thread(started.wait, 30), "the image was never fetched"
            await asyncio.sleep(0.5)  # downloading now
            request.cancel()  # the client leaves: httpx closes its connection
            await asyncio.gather(request, return_exceptions=True)
            return time.monotonic()

    left_at = asyncio.run(go())
    deadline = left_at + 3.0
    while not closed_at and time.monotonic() < deadline:
        time.sleep(0.05)
    assert closed_at, "the image download went on 3 s after its client left"
    assert closed_at[0] - left_at < 1.0, f"hung up {closed_at[0] - left_at:.2f} s after"
