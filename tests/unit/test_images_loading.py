"""Image loading attacked from every side: a local HTTP server (loopback only) plays the hostile
host; files, base64 and data URLs are built fresh in each test."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import ssl
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpcore
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mistralpy.processing.errors import (
    ImageDecodeError,
    ImageError,
    ImageFetchError,
    ImageSourceForbiddenError,
    ImageTooLargeError,
    InvalidInputError,
)
from mistralpy.processing.images import (
    ImagePolicy,
    ImageProcessorConfig,
    address_refusal,
    decode_image_bytes,
    load_image,
    preprocess_image,
)

LOOPBACK_OK = ImagePolicy(allow_private_networks=True, timeout_s=2.0)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def random_image(width: int = 37, height: int = 23, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng()
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


def png_declaring(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR is rewritten to claim width x height (a decompression bomb)."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


# ----------------------------------------------------------------------------------------------
# A hostile HTTP server on loopback


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output quiet
        pass

    def send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        path = self.path
        if path == "/ok.png":
            self.send(200, server.png, {"Content-Length": str(len(server.png))})
        elif path == "/host":  # only answers when the Host header is the name the client used
            expected = f"img.test:{server.server_port}"
            ok = self.headers.get("Host") == expected
            self.send(200 if ok else 400, server.png if ok else b"bad host")
        elif path == "/text":
            self.send(200, b"<html>not an image</html>", {"Content-Type": "text/html"})
        elif path == "/truncated.png":
            self.send(200, server.png[: len(server.png) // 2])
        elif path == "/bomb.png":
            self.send(200, png_declaring(100_000, 100_000))
        elif path == "/missing":
            self.send(404, b"nope")
        elif path == "/endless":  # no Content-Length: streams until the client gives up (bounded)
            self.send_response(200)
            self.end_headers()
            self.stream_chunks(b"\x89PNG" + b"\0" * 65536, 400, 0.0)
        elif path == "/claims-huge":
            self.send(200, server.png, {"Content-Length": str(10**12)})
        elif path == "/claims-tiny":  # says 16 bytes, then keeps sending (bounded)
            self.send_response(200)
            self.send_header("Content-Length", "16")
            self.end_headers()
            self.stream_chunks(b"\xff" * 65536, 400, 0.0)
        elif path == "/drip":  # a byte every 50 ms: each read is quick, the whole never ends
            self.send_response(200)
            self.end_headers()
            self.stream_chunks(b"x", 200, 0.05)
        elif path == "/drip-headers":
            self.wfile.write(b"HTTP/1.0 200 OK\r\n")
            self.stream_chunks(b"X-Slow: a\r\n", 200, 0.05)
        elif path.startswith("/redirect/"):
            hops = int(path.rsplit("/", 1)[1])
            target = "/ok.png" if hops <= 1 else f"/redirect/{hops - 1}"  # n redirects in all
            self.send(302, b"", {"Location": target})
        elif path.startswith("/to?"):
            self.send(302, b"", {"Location": path[len("/to?") :]})
        else:
            self.send(404)

    def stream_chunks(self, chunk: bytes, count: int, pause: float) -> None:
        try:
            for _ in range(count):
                self.wfile.write(chunk)
                self.wfile.flush()
                if pause:
                    time.sleep(pause)
        except OSError:  # the client hung up, as it should
            pass


def start_server(host: str, png: bytes) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    server.png = png
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def served_image() -> Image.Image:
    return random_image(41, 29)


@pytest.fixture(scope="module")
def serve(served_image):
    """Starts servers on loopback addresses; each gives its base URL."""
    servers = []

    def start(host: str) -> str:
        servers.append(start_server(host, encode(served_image)))
        return f"http://{host}:{servers[-1].server_port}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def server(serve):
    return serve("127.0.0.1")


@pytest.fixture(scope="module")
def second_server(serve):
    """Another loopback address, allowed by CIDR in tests that need an 'allowed host'."""
    return serve("127.0.0.2")


def same_pixels(image: Image.Image, expected: Image.Image) -> bool:
    return np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected.convert("RGB")))


# ----------------------------------------------------------------------------------------------
# HTTP


def test_http_happy_path(server, served_image):
    image = load_image(f"{server}/ok.png", LOOPBACK_OK)
    assert same_pixels(image, served_image)


def test_loopback_refused_by_default(server):
    with pytest.raises(ImageSourceForbiddenError) as info:
        load_image(f"{server}/ok.png", ImagePolicy(), param="messages[0].content[1].image_url")
    assert info.value.param == "messages[0].content[1].image_url"
    assert isinstance(info.value, InvalidInputError) and isinstance(info.value, ValueError)


def test_localhost_name_refused(server):
    port = server.rsplit(":", 1)[1]
    with pytest.raises(ImageSourceForbiddenError):
        load_image(f"http://localhost:{port}/ok.png", ImagePolicy())


@pytest.mark.parametrize(
    "host", ["2130706433", "0x7f.0.0.1", "127.1", "[::ffff:127.0.0.1]", "[::1]", "0.0.0.0"]
)
def test_loopback_spellings_refused(server, host):
    port = server.rsplit(":", 1)[1]
    with pytest.raises((ImageSourceForbiddenError, ImageFetchError)) as info:
        load_image(f"http://{host}:{port}/ok.png", ImagePolicy())
    # Either refused by the address check or unparseable: never fetched.
    assert not isinstance(info.value, ImageFetchError) or "invalid" in str(info.value)


def test_connects_to_checked_address_with_host_header(server, served_image, monkeypatch):
    """DNS is answered once and the socket goes to that checked address; Host stays the name."""
    real = socket.getaddrinfo
    calls = []

    def fake(host, *args, **kwargs):
        if host == "img.test":
            calls.append(host)
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    port = server.rsplit(":", 1)[1]
    image = load_image(f"http://img.test:{port}/host", LOOPBACK_OK)
    assert same_pixels(image, served_image)
    assert calls == ["img.test"]


def test_any_forbidden_address_refuses_host(monkeypatch):
    """A name resolving to a public AND a private address is refused before connecting."""
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host == "rebind.test":
            public = real("93.184.216.34", port, *args, **kwargs)
            return public + real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    monkeypatch.setattr(socket, "create_connection", _no_connection)
    with pytest.raises(ImageSourceForbiddenError):
        load_image("http://rebind.test/x.png", ImagePolicy())


def _no_connection(*args, **kwargs):
    raise AssertionError("a refused host must never be connected to")


def test_https_connects_to_checked_ip_with_url_hostname_for_tls(monkeypatch):
    """The socket goes to the checked IP while SNI and certificate checks use the URL's name."""
    real = socket.getaddrinfo
    seen = {}

    def resolve(host, port, *args, **kwargs):
        return real("127.0.0.1" if host == "img.test" else host, port, *args, **kwargs)

    class FakeStream(httpcore.NetworkStream):
        def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            seen["sni"] = server_hostname
            seen["verify"] = (
                ssl_context.check_hostname and ssl_context.verify_mode == ssl.CERT_REQUIRED
            )
            raise httpcore.ConnectError("no TLS peer in tests")

        def close(self):
            pass

    def connect(self, host, port, timeout=None, local_address=None, socket_options=None):
        seen["connect"] = (host, port)
        return FakeStream()

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect)
    with pytest.raises(ImageFetchError):
        load_image("https://img.test/x.png", LOOPBACK_OK)
    assert seen == {"connect": ("127.0.0.1", 443), "sni": "img.test", "verify": True}


def test_environment_proxies_are_ignored(server, served_image, monkeypatch):
    """A proxy would connect on our behalf, past the address checks: never used."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    assert same_pixels(load_image(f"{server}/ok.png", LOOPBACK_OK), served_image)


def test_unreachable_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageFetchError):
        load_image(f"http://127.0.0.1:{port}/x.png", LOOPBACK_OK)


def test_unresolvable_host(monkeypatch):
    def fail(*args, **kwargs):
        raise socket.gaierror("no such host")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(ImageFetchError):
        load_image("http://nowhere.invalid/x.png", ImagePolicy())


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/text", ImageDecodeError),
        ("/truncated.png", ImageDecodeError),
        ("/bomb.png", ImageTooLargeError),
        ("/missing", ImageFetchError),
        ("/endless", ImageTooLargeError),
        ("/claims-huge", ImageTooLargeError),
        ("/redirect/4", ImageFetchError),  # one more than max_redirects=3
        ("/to?http://169.254.169.254/latest/meta-data/", ImageSourceForbiddenError),
        ("/to?http://[fd00:ec2::254]/", ImageSourceForbiddenError),
        ("/to?http://[::ffff:169.254.169.254]/", ImageSourceForbiddenError),
        ("/to?file:///etc/passwd", ImageSourceForbiddenError),
        ("/to?ftp://example.com/x.png", ImageSourceForbiddenError),
        ("/to?http://user:pw@127.0.0.1/ok.png", ImageSourceForbiddenError),
        ("/to?http://[::1", ImageFetchError),  # unparseable Location
    ],
)
def test_hostile_responses(server, path, error):
    policy = ImagePolicy(allow_private_networks=True, timeout_s=2.0, max_download_bytes=1 << 20)
    started = time.monotonic()
    with pytest.raises(error):
        load_image(server + path, policy)
    assert time.monotonic() - started < 4.0  # timeout_s plus slack for a loaded CI box


def test_lying_small_content_length_reads_only_what_it_declared(server):
    with pytest.raises(ImageDecodeError):
        load_image(f"{server}/claims-tiny", LOOPBACK_OK)


def test_redirect_chain_within_cap(server, served_image):
    assert same_pixels(load_image(f"{server}/redirect/3", LOOPBACK_OK), served_image)
    with pytest.raises(ImageFetchError, match="redirected"):
        load_image(
            f"{server}/redirect/1", ImagePolicy(allow_private_networks=True, max_redirects=0)
        )


def test_redirect_from_allowed_host_to_loopback_refused(second_server, server, served_image):
    """127.0.0.2 is allowed by CIDR; its redirect to 127.0.0.1 is checked again and refused."""
    policy = ImagePolicy(allowed_networks=("127.0.0.2/32",), timeout_s=2.0)
    assert same_pixels(load_image(f"{second_server}/ok.png", policy), served_image)
    with pytest.raises(ImageSourceForbiddenError):
        load_image(f"{second_server}/to?{server}/ok.png", policy)


def test_metadata_refused_even_when_private_allowed():
    for ip in ("169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"):
        assert address_refusal(ip, ImagePolicy.trusted_local()) is not None


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.1.1",
        "100.64.0.1",
        "224.0.0.1",
        "239.255.255.250",
        "0.0.0.0",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1%eth0",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "2002:7f00:1::1",  # 6to4 around 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 around 10.0.0.1
    ],
)
def test_private_addresses_refused(ip):
    assert address_refusal(ip, ImagePolicy()) is not None
    assert address_refusal(ip.split("%")[0], ImagePolicy(allow_private_networks=True)) is None


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_allowed(ip):
    assert address_refusal(ip, ImagePolicy()) is None


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_slow_server_bounded_by_timeout(server, path):
    """A byte every 50 ms keeps each read short; the whole fetch still ends at timeout_s."""
    policy = ImagePolicy(allow_private_networks=True, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="timed out"):
        load_image(server + path, policy)
    assert time.monotonic() - started < 3.0  # timeout_s plus slack for a loaded CI box


def test_hanging_dns_bounded_by_timeout(monkeypatch):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(5)
        raise socket.gaierror("late")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    started = time.monotonic()
    with pytest.raises(ImageFetchError, match="timed out"):
        load_image("http://slow-dns.test/x.png", ImagePolicy(timeout_s=0.5))
    assert time.monotonic() - started < 2.5  # well before the 5 s hang ends
    release.set()


# ----------------------------------------------------------------------------------------------
# base64 and data URLs


def test_base64_and_data_url(served_image):
    raw = base64.b64encode(encode(served_image)).decode()
    for source in (
        raw,
        f"data:image/png;base64,{raw}",
        f"DATA:Image/PNG;BASE64,{raw}",
        "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76)),  # MIME line breaks
        raw.rstrip("="),
        base64.urlsafe_b64encode(encode(served_image)).decode(),
    ):
        assert same_pixels(load_image(source, ImagePolicy()), served_image)


def test_jpeg_base64_is_not_mistaken_for_a_path():
    """JPEG base64 starts with '/9j/', which looks like an absolute path."""
    raw = base64.b64encode(encode(random_image(), "JPEG")).decode()
    assert raw.startswith("/9j/")
    assert load_image(raw, ImagePolicy()).size == (37, 23)
    assert load_image(raw, ImagePolicy.trusted_local()).size == (37, 23)


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("data:image/png;base64,@@@not-base64@@@", ImageDecodeError),
        ("data:image/png;base64,QUJD", ImageDecodeError),  # valid base64, not an image
        ("data:text/plain;base64,aGVsbG8=", ImageDecodeError),
        ("data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=", ImageDecodeError),
        ("data:image/png,rawbytes", ImageDecodeError),  # not base64-encoded
        ("data:image/png;base64", ImageDecodeError),  # no comma
        ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB", ImageDecodeError),  # truncated PNG base64
        ("QUJDRA=", ImageDecodeError),  # bad padding/length
        ("A", ImageDecodeError),
        ("", ImageError),
        ("   ", ImageError),
        ("gopher://example.com/", ImageSourceForbiddenError),
        ("javascript://alert(1)", ImageSourceForbiddenError),
    ],
)
def test_malformed_inline_sources(source, error):
    with pytest.raises(error):
        load_image(source, ImagePolicy())


def test_non_string_source():
    with pytest.raises(ImageError):
        load_image(b"bytes", ImagePolicy())  # type: ignore[arg-type]


def test_base64_over_cap_refused_before_decoding():
    raw = base64.b64encode(encode(random_image(64, 64))).decode()
    with pytest.raises(ImageTooLargeError):
        load_image(raw, ImagePolicy(max_download_bytes=len(raw) // 2))


# ----------------------------------------------------------------------------------------------
# Decoding


def test_truncated_png_and_jpeg():
    for fmt in ("PNG", "JPEG"):
        data = encode(random_image(64, 64), fmt)
        # Cuts inside the pixel data (a PNG missing only its IEND trailer still decodes fully).
        for cut in (len(data) // 2, len(data) // 3, 40):
            with pytest.raises(ImageDecodeError):
                decode_image_bytes(data[:cut], ImagePolicy())


def test_decompression_bombs():
    with pytest.raises(ImageTooLargeError):
        decode_image_bytes(png_declaring(100_000, 100_000), ImagePolicy())  # past PIL's own cap
    with pytest.raises(ImageTooLargeError):
        decode_image_bytes(png_declaring(8_000, 8_000), ImagePolicy())  # under PIL's, over ours
    with pytest.raises(ImageTooLargeError):
        decode_image_bytes(encode(random_image(40, 30)), ImagePolicy(max_pixels=40 * 30 - 1))


def test_max_pixels_does_not_touch_pil_global():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError):
        decode_image_bytes(encode(random_image(10, 10)), ImagePolicy(max_pixels=5))
    assert before == Image.MAX_IMAGE_PIXELS


def test_formats_outside_the_allowlist_refused():
    for fmt in ("TIFF", "PPM", "ICO"):
        with pytest.raises(ImageDecodeError):
            decode_image_bytes(encode(random_image(), fmt), ImagePolicy())
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(ImageDecodeError):
        decode_image_bytes(eps, ImagePolicy())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP"])
def test_accepted_formats_decode(fmt):
    image = random_image()
    decoded = decode_image_bytes(encode(image, fmt), ImagePolicy())
    assert decoded.size == image.size


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    image = decode_image_bytes(buf.getvalue(), ImagePolicy())
    assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


# ----------------------------------------------------------------------------------------------
# Local files


@pytest.fixture
def media(tmp_path) -> tuple[Path, Image.Image]:
    root = tmp_path / "media"
    root.mkdir()
    image = random_image()
    (root / "a.png").write_bytes(encode(image))
    (tmp_path / "secret.png").write_bytes(encode(random_image()))
    return root, image


def test_local_paths_refused_by_default(media):
    root, _ = media
    for source in (str(root / "a.png"), (root / "a.png").as_uri(), "a.png", "../x.png"):
        with pytest.raises(ImageSourceForbiddenError):
            load_image(source, ImagePolicy())


def test_local_path_inside_allowed_dir(media):
    root, image = media
    policy = ImagePolicy(allowed_local_media_path=root)
    sources = (str(root / "a.png"), (root / "a.png").as_uri(), f"file://localhost{root}/a.png")
    for source in (*sources, "a.png", "./a.png", "sub/../a.png"):
        assert same_pixels(load_image(source, policy), image)


def test_local_path_escapes_refused(media):
    root, _ = media
    os.symlink(root.parent / "secret.png", root / "link.png")
    os.symlink(root.parent, root / "up")
    policy = ImagePolicy(allowed_local_media_path=root)
    for source in (
        str(root / ".." / "secret.png"),
        f"file://{root}/../secret.png",
        f"file://{root}/%2e%2e/secret.png",
        str(root / "link.png"),
        str(root / "up" / "secret.png"),
        str(root.parent / "nonexistent.png"),  # outside: refused, not "missing"
        "/etc/passwd",
        "../secret.png",
        "up/secret.png",
    ):
        with pytest.raises(ImageSourceForbiddenError):
            load_image(source, policy)


def test_remote_file_url_refused(media):
    root, _ = media
    with pytest.raises(ImageSourceForbiddenError):
        load_image(f"file://evil.example{root}/a.png", ImagePolicy(allow_local_paths=True))


def test_local_special_files_do_not_hang(media):
    root, _ = media
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    policy = ImagePolicy(allowed_local_media_path=root)
    for source in (str(fifo), str(root), str(root / "missing.png")):
        with pytest.raises(ImageError):  # refused, with the one message of every refusal
            load_image(source, policy)
    with pytest.raises(ImageFetchError):
        load_image("/dev/zero", ImagePolicy(allow_local_paths=True))


def test_local_file_over_cap(media):
    root, _ = media
    size = (root / "a.png").stat().st_size
    with pytest.raises(ImageTooLargeError):
        load_image(
            str(root / "a.png"), ImagePolicy(allow_local_paths=True, max_download_bytes=size - 1)
        )


def test_trusted_policy_reads_any_path(media):
    root, image = media
    assert same_pixels(load_image(str(root / "a.png"), ImagePolicy.trusted_local()), image)


# ----------------------------------------------------------------------------------------------
# Every form of one image


def test_every_form_gives_one_image(served_image):
    policy, cfg = ImagePolicy(), ImageProcessorConfig()
    data = encode(served_image)
    images = [
        served_image,
        decode_image_bytes(data, policy),
        load_image(base64.b64encode(data).decode(), policy),
    ]
    assert len({preprocess_image(image, cfg).content_hash for image in images}) == 1
    with pytest.raises(ImageDecodeError) as info:
        decode_image_bytes(b"not an image", policy, param="messages[1].content[0].image_url")
    assert info.value.param == "messages[1].content[0].image_url"


def test_policy_validates_itself():
    for bad in ({"max_pixels": 0}, {"timeout_s": 0}, {"allowed_networks": ("nonsense",)}):
        with pytest.raises(ValueError):
            ImagePolicy(**bad)


# ----------------------------------------------------------------------------------------------
# Fuzz: nothing but our typed errors, never a hang, never a network connection


def _valid_encodings() -> list[bytes]:
    image = random_image(12, 9)
    return [encode(image, fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP")]


VALID = _valid_encodings()
PREFIXES = [
    "",
    "http://",
    "https://",
    "http://[",
    "data:",
    "data:image/png;base64,",
    "file://",
    "file:",
    "/",
    "../",
    "./",
    "~/",
    "iVBORw0KGgo",
    "/9j/",
    "R0lGODlh",
]


@pytest.fixture
def no_network(monkeypatch):
    """Every name resolves to loopback, which the default policy refuses: no traffic leaves."""
    real = socket.getaddrinfo

    def loopback(host, port, *args, **kwargs):
        return real("127.0.0.1", port or 80, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback)
    monkeypatch.setattr(socket, "create_connection", _no_connection)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prefix=st.sampled_from(PREFIXES), rest=st.text(max_size=60))
def test_fuzz_sources_raise_only_typed_errors(no_network, prefix, rest):
    with contextlib.suppress(ImageError):
        load_image(prefix + rest, ImagePolicy(timeout_s=1.0))


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-media")
    for i, data in enumerate(VALID):
        (root / f"{i}.img").write_bytes(data)
    return root


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.sampled_from(["", "/", "../", "./", "file://", "0.img"]), rest=st.text(max_size=30)
)
def test_fuzz_local_sources_raise_only_typed_errors(media_root, prefix, rest):
    with contextlib.suppress(ImageError):
        load_image(prefix + rest, ImagePolicy(allowed_local_media_path=media_root))


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(range(len(VALID))),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_fuzz_mutated_images_raise_only_typed_errors(base, flips, cut):
    data = bytearray(VALID[base])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    for source in (bytes(data), base64.b64encode(bytes(data)).decode()):
        try:
            if isinstance(source, bytes):
                decode_image_bytes(source, ImagePolicy())
            else:
                load_image(source, ImagePolicy())
        except ImageError:
            pass


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data):
    with contextlib.suppress(ImageError):
        decode_image_bytes(data, ImagePolicy())
