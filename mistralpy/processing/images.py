"""Image inputs: loading from untrusted sources within limits, Pixtral preprocessing, hashing.

Loading (`load_image`) accepts an http(s) URL, a `data:image/...;base64,` URL, raw base64, or a
local path / `file://` URL when the `ImagePolicy` allows it. Every step is bounded in bytes and
time; every failure is a typed `processing.errors.ImageError` naming the request field.

Preprocessing (`preprocess_image`) reproduces mistral-common's `ImageEncoder` (the reference
Mistral ships), not transformers' `PixtralImageProcessor` and not mistral.rs:
- RGB conversion composites alpha over WHITE (transformers 5 does too; plain
  `convert("RGB")`, as older code did, keeps the colour hidden under transparent pixels);
- the longest edge is scaled down to `longest_edge` with Python's banker's `round`, each side
  at least 1 (transformers uses `floor`, so the grid differs when that crosses a multiple of 28,
  and a 1x1541 image gets a zero-width grid there);
- both sides then go UP to a multiple of patch*merge (28) and the image is stretched to it:
  grid = ceil(h/28) x ceil(w/28). Transformers' image processor used alone with the
  checkpoint's preprocessor_config.json (patch_size 14) rounds to 14 instead; only its
  PixtralProcessor passes 28;
- one bicubic resize (Keys a=-0.75, no antialiasing: OpenCV's INTER_CUBIC, which torch's
  `interpolate(mode="bicubic")` also implements). PIL's BICUBIC (transformers' PIL processor)
  uses a=-0.5 and antialiases when shrinking, so its pixels differ visibly on detailed images.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import json
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpcore
import httpx
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mistralpy.processing.errors import (
    ImageDecodeError,
    ImageError,
    ImageFetchError,
    ImageSourceForbiddenError,
    ImageTooLargeError,
)

# CLIP statistics; mistral-common always normalises with these (Mistral's configs state the same).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # `resample` code in preprocessor_config.json

# Formats PIL may parse. Others (EPS runs Ghostscript, plus many rarely-audited decoders) are
# refused before any decoder sees the bytes. (PIL's JPEG opener also yields MPO camera files.)
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")

# Cloud instance-metadata endpoints: refused even when private networks are allowed, since no
# image lives there and reaching one from a server leaks credentials.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
_COMPAT_PREFIX = ipaddress.ip_network("::/96")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_BASE64_TEXT = re.compile(r"^[A-Za-z0-9+/\-_]+={0,2}$")
_WHITESPACE = re.compile(r"\s+")
_FETCH_HEADERS = {
    "User-Agent": "mistralpy-image-fetch",
    "Accept": "image/*",
    # Compressed transfer would let a small body inflate; images are compressed already.
    "Accept-Encoding": "identity",
}


@dataclass(frozen=True)
class ImagePolicy:
    """Limits and permissions for loading images from user input (server defaults are strict)."""

    max_download_bytes: int = 20 * 1024 * 1024  # encoded bytes from any source (URL, base64, file)
    timeout_s: float = 10.0  # wall-clock bound on one URL fetch: DNS, connect, redirects, body
    max_redirects: int = 3
    max_pixels: int = 50_000_000  # decoded width*height, checked from the header before decoding
    allow_private_networks: bool = False  # loopback, RFC 1918, link-local, CGNAT, multicast...
    allowed_networks: tuple[str, ...] = ()  # CIDRs reachable even when private (internal host)
    allow_local_paths: bool = False  # any local path / file:// URL
    allowed_local_media_path: Path | None = None  # if set, local paths allowed only under it
    max_images_per_request: int = 10

    def __post_init__(self) -> None:
        for name in ("max_download_bytes", "max_pixels", "max_images_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"ImagePolicy.{name} must be >= 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"ImagePolicy.timeout_s must be > 0, got {self.timeout_s}")
        if self.max_redirects < 0:
            raise ValueError(f"ImagePolicy.max_redirects must be >= 0, got {self.max_redirects}")
        for cidr in self.allowed_networks:
            ipaddress.ip_network(cidr, strict=False)  # raises ValueError naming the bad entry

    @classmethod
    def trusted_local(cls) -> ImagePolicy:
        """Policy for the in-process Python API, whose caller is the operator: any local path
        and private hosts are fine (metadata endpoints stay refused)."""
        return cls(allow_local_paths=True, allow_private_networks=True)

    @property
    def local_paths_allowed(self) -> bool:
        return self.allow_local_paths or self.allowed_local_media_path is not None


# ----------------------------------------------------------------------------------------------
# Loading: dispatch on the kind of source


def load_image(
    source: str,
    policy: ImagePolicy,
    param: str = "image_url",
    stop: threading.Event | None = None,
) -> Image.Image:
    """Load one image from a URL, data URL, base64 text or allowed local path; first frame only.

    Raises an `ImageError` subclass (with `param`) for anything wrong with the source;
    `stop` set (the client left) ends a download within STOP_POLL_S (LoadStopped)."""
    if not isinstance(source, str):
        raise ImageError(f"image source must be a string, got {type(source).__name__}", param)
    text = source.strip()
    if not text:
        raise ImageError("image source is empty", param)
    return decode_image_bytes(_read_source(text, policy, param, stop), policy, param)


def _read_source(
    text: str, policy: ImagePolicy, param: str, stop: threading.Event | None = None
) -> bytes:
    """The encoded image bytes behind one stripped, non-empty source string."""
    match = _URL_SCHEME.match(text)
    scheme = match.group(1).lower() if match else None
    if scheme == "data":
        return _read_data_url(text, policy, param)
    if scheme in ("http", "https"):
        return _fetch_http(text, policy, param, stop)
    if scheme == "file":
        return _read_local(_file_url_path(text, param), policy, param)
    if match is not None and text[match.end() :].startswith("//"):
        raise ImageSourceForbiddenError(f"URL scheme {scheme!r} is not supported", param)
    return _read_bare(text, policy, param)


def _read_bare(text: str, policy: ImagePolicy, param: str) -> bytes:
    """Raw base64 or a local path: base64 that opens with an image signature wins, then a path."""
    if _looks_like_base64_image(text):
        return _decode_base64(text, policy, param)
    if policy.allowed_local_media_path is not None:
        # decided by the text alone: asking the disk would tell what exists outside the dir
        if _path_like(text):
            return _read_local(text, policy, param)
        return _decode_base64(text, policy, param)
    if policy.local_paths_allowed:
        compact = _WHITESPACE.sub("", text)
        if os.path.lexists(text) or not _BASE64_TEXT.match(compact):
            return _read_local(text, policy, param)
        return _decode_base64(text, policy, param)
    if _path_like(text):
        raise ImageSourceForbiddenError("local file paths are not allowed", param)
    return _decode_base64(text, policy, param)


def _path_like(text: str) -> bool:
    """Text that reads as a file path rather than base64 (which has no '.' or '\\')."""
    return text.startswith(("/", "./", "../", "~")) or "." in text or "\\" in text


def _looks_like_base64_image(text: str) -> bool:
    """True if `text` is base64 whose first bytes are an accepted image format's signature."""
    head = _WHITESPACE.sub("", text[:96])[:64]
    head = head[: len(head) // 4 * 4].replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(head, validate=True)
    except (binascii.Error, ValueError):
        return False
    return raw.startswith(_IMAGE_MAGIC) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP")


def _read_data_url(text: str, policy: ImagePolicy, param: str) -> bytes:
    """Bytes of a `data:image/<type>[;...];base64,<payload>` URL."""
    header, sep, payload = text[len("data:") :].partition(",")
    if not sep:
        raise ImageDecodeError("malformed data URL: no ',' before the payload", param)
    parts = [p.strip().lower() for p in header.split(";")]
    if not parts[0].startswith("image/"):
        raise ImageDecodeError(f"data URL media type must be image/*, got {parts[0]!r}", param)
    if "base64" not in parts[1:]:
        raise ImageDecodeError("data URL must be base64-encoded (';base64,')", param)
    return _decode_base64(unquote(payload) if "%" in payload else payload, policy, param)


def _decode_base64(text: str, policy: ImagePolicy, param: str) -> bytes:
    """Strictly decode standard or URL-safe base64 (padding optional), within the byte cap."""
    compact = _WHITESPACE.sub("", text)
    if len(compact) // 4 * 3 > policy.max_download_bytes:
        raise ImageTooLargeError(
            f"base64 image exceeds {policy.max_download_bytes} bytes when decoded", param
        )
    compact = compact.replace("-", "+").replace("_", "/").rstrip("=")
    if not compact or len(compact) % 4 == 1:
        raise ImageDecodeError("malformed base64 image data (bad length)", param)
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("malformed base64 image data", param) from None


# ----------------------------------------------------------------------------------------------
# Local files


def _file_url_path(url: str, param: str) -> str:
    """The local path named by a `file:` URL; remote hosts are refused."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ImageFetchError("invalid file URL", param) from None
    if parts.netloc not in ("", "localhost"):
        raise ImageSourceForbiddenError(f"file URL host {parts.netloc!r} is not local", param)
    path = unquote(parts.path)
    if not path:
        raise ImageFetchError("file URL names no path", param)
    return path


# Every refusal of a path under --allowed-local-media-path reads the same, whether the file is
# outside, missing, unreadable, a symlink or a directory: answers reveal nothing about the disk.
LOCAL_REFUSED = "local image path is not an allowed, readable image file"
_OPEN_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _read_local(path_text: str, policy: ImagePolicy, param: str) -> bytes:
    """Read a regular file the policy allows, at most `max_download_bytes`, never blocking."""
    if not policy.local_paths_allowed:
        raise ImageSourceForbiddenError("local file paths are not allowed", param)
    root = policy.allowed_local_media_path
    if root is None:
        fd = _open_trusted(path_text, param)
    else:
        fd = _open_under(Path(root), path_text, param)
    try:
        return _read_regular(fd, policy, param, refused=root is not None)
    finally:
        os.close(fd)


def _open_trusted(path_text: str, param: str) -> int:
    """A trusted caller's path (the Python API): any file the process can read."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        return os.open(path_text, _OPEN_FILE & ~os.O_NOFOLLOW)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "invalid path"
        raise ImageFetchError(f"cannot open local image: {reason}", param) from None


def _open_under(root: Path, path_text: str, param: str) -> int:
    """Open `path_text` inside `root` one component at a time from the root's descriptor,
    refusing every symlink (O_NOFOLLOW per component): a directory swapped for a symlink
    between a check and the open cannot lead outside, as there is no separate check."""
    parts = _parts_under(root, path_text)
    if parts is None:
        raise ImageSourceForbiddenError(LOCAL_REFUSED, param)
    fds = []
    try:
        fds.append(os.open(root, _OPEN_DIR))
        for part in parts[:-1]:
            fds.append(os.open(part, _OPEN_DIR, dir_fd=fds[-1]))
        return os.open(parts[-1], _OPEN_FILE, dir_fd=fds[-1])
    except (OSError, ValueError):  # missing, a symlink, not a directory, NUL byte...
        raise ImageSourceForbiddenError(LOCAL_REFUSED, param) from None
    finally:
        for fd in fds:
            os.close(fd)


def _parts_under(root: Path, path_text: str) -> list[str] | None:
    """The components of `path_text` below `root` (absolute paths must start with it), or
    None if it names nothing strictly inside. Lexical only: the open refuses symlinks."""
    path = os.path.normpath(path_text)
    if os.path.isabs(path):
        try:
            path = os.path.relpath(path, root)
        except ValueError:
            return None
    parts = [p for p in Path(path).parts if p not in ("", ".")]
    if not parts or parts[0] == ".." or os.path.isabs(path):
        return None
    return parts


def _read_regular(fd: int, policy: ImagePolicy, param: str, refused: bool) -> bytes:
    """The bytes of the regular file open at `fd`; refused: the allowed-directory policy,
    whose refusals all read LOCAL_REFUSED."""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            if refused:
                raise ImageSourceForbiddenError(LOCAL_REFUSED, param)
            raise ImageFetchError("local image path is not a regular file", param)
        if info.st_size > policy.max_download_bytes:
            raise ImageTooLargeError(
                f"local image is {info.st_size} bytes, over the {policy.max_download_bytes} cap",
                param,
            )
        data = os.read(fd, policy.max_download_bytes + 1)
    except OSError as exc:
        raise ImageFetchError(f"cannot read local image: {exc.strerror}", param) from None
    if len(data) > policy.max_download_bytes:
        raise ImageTooLargeError(f"local image exceeds {policy.max_download_bytes} bytes", param)
    return data


# ----------------------------------------------------------------------------------------------
# Network: every resolved address is checked, and the socket connects to a checked address, so a
# DNS answer that changes between check and connect (rebinding) cannot reach a refused host.


def address_refusal(ip_text: str, policy: ImagePolicy) -> str | None:
    """Why `policy` refuses connecting to this IP address, or None when it may be contacted."""
    ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
    embedded = _embedded_ipv4(ip)
    if ip in _METADATA_ADDRESSES or embedded in _METADATA_ADDRESSES:
        return "cloud metadata address"
    if policy.allow_private_networks:
        return None
    if any(ip in ipaddress.ip_network(c, strict=False) for c in policy.allowed_networks):
        return None
    for candidate in (ip, embedded):
        if candidate is not None and (not candidate.is_global or candidate.is_multicast):
            return "non-public address (loopback, private, link-local, multicast or reserved)"
    return None


def _embedded_ipv4(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address tunnels to (mapped, compatible, 6to4, Teredo, NAT64)."""
    if ip.version == 4:
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64_PREFIX or (ip in _COMPAT_PREFIX and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _getaddrinfo_bounded(host: str, port: int, timeout: float) -> list[str]:
    """Resolve `host` to unique IP strings within `timeout` seconds (getaddrinfo has no timeout,
    so it runs in a daemon thread that is abandoned if the resolver hangs)."""
    box: list[Any] = []

    def work() -> None:
        try:
            box.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError, ValueError) as exc:
            box.append(exc)

    worker = threading.Thread(target=work, name="image-dns", daemon=True)
    worker.start()
    worker.join(max(timeout, 0.0))
    if not box:
        raise httpcore.ConnectTimeout(f"resolving {host!r} timed out")
    if isinstance(box[0], Exception):
        raise httpcore.ConnectError(f"cannot resolve {host!r}")
    return list(dict.fromkeys(info[4][0] for info in box[0]))


# A download whose client left stops within this: socket reads wait at most this long
# before looking at the stop flag.
STOP_POLL_S = 0.1


class LoadStopped(Exception):
    """A download stopped by its flag: nobody waits for the image any more."""


class _Deadline:
    """An absolute monotonic deadline; `clamp` shortens per-operation timeouts to fit in it,
    and raises LoadStopped once `stop` is set."""

    def __init__(self, seconds: float, stop: threading.Event | None = None) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.stop = stop

    def clamp(self, timeout: float | None, expired: type[Exception]) -> float:
        if self.stop is not None and self.stop.is_set():
            raise LoadStopped()
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise expired(f"deadline of {self.seconds}s exceeded")
        return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read/write (headers too) ends by the shared deadline, so a
    server dripping one byte at a time cannot hold a fetch past `timeout_s`."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Waits in slices of STOP_POLL_S when there is a stop flag to look at."""
        while True:
            allowed = self._deadline.clamp(timeout, httpcore.ReadTimeout)
            if self._deadline.stop is None or allowed <= STOP_POLL_S:
                return self._inner.read(max_bytes, allowed)
            try:
                return self._inner.read(max_bytes, STOP_POLL_S)
            except httpcore.ReadTimeout:
                if timeout is not None:
                    timeout -= STOP_POLL_S
                    if timeout <= 0:
                        raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._deadline.clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # server_hostname is the URL's host name, so SNI and certificate checks use it even
        # though the socket was opened to a checked IP.
        timeout = self._deadline.clamp(timeout, httpcore.ConnectTimeout)
        inner = self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    """Resolves the host itself, refuses it if ANY address is forbidden, connects to a checked
    address. Unix sockets are refused."""

    def __init__(self, policy: ImagePolicy, deadline: _Deadline, param: str) -> None:
        self._policy = policy
        self._deadline = deadline
        self._param = param
        self._plain = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = _getaddrinfo_bounded(
            host, port, self._deadline.clamp(timeout, httpcore.ConnectTimeout)
        )
        for ip in addresses:
            reason = address_refusal(ip, self._policy)
            if reason is not None:
                raise ImageSourceForbiddenError(
                    f"host {host!r} resolves to a {reason}", self._param
                )
        failure: Exception = httpcore.ConnectError(f"no address for {host!r}")
        for ip in addresses:
            timeout = self._deadline.clamp(timeout, httpcore.ConnectTimeout)
            try:
                stream = self._plain.connect_tcp(ip, port, timeout, None, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
                continue
            return _DeadlineStream(stream, self._deadline)
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise ImageSourceForbiddenError("unix sockets are not allowed", self._param)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


_HTTPCORE_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
    httpcore.ConnectionNotAvailable,
)


def _fetch_failure(exc: Exception, deadline: _Deadline, param: str) -> ImageFetchError:
    if isinstance(exc, httpcore.TimeoutException | httpx.TimeoutException):
        return ImageFetchError(f"image download timed out ({deadline.seconds}s limit)", param)
    return ImageFetchError(f"image download failed ({type(exc).__name__})", param)


class _CoreBody(httpx.SyncByteStream):
    """A response body from httpcore, its transport errors turned into ImageFetchError."""

    def __init__(self, response: httpcore.Response, deadline: _Deadline, param: str) -> None:
        self._response = response
        self._deadline = deadline
        self._param = param

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._response.iter_stream()
        except _HTTPCORE_ERRORS as exc:
            raise _fetch_failure(exc, self._deadline, self._param) from None

    def close(self) -> None:
        self._response.close()


class _GuardedTransport(httpx.BaseTransport):
    """httpx transport over an httpcore pool that uses `_GuardedBackend` (no proxies, HTTP/1.1)."""

    def __init__(self, policy: ImagePolicy, deadline: _Deadline, param: str) -> None:
        self._deadline = deadline
        self._param = param
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=_GuardedBackend(policy, deadline, param),
            retries=0,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            response = self._pool.handle_request(core_request)
        except _HTTPCORE_ERRORS as exc:
            raise _fetch_failure(exc, self._deadline, self._param) from None
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_CoreBody(response, self._deadline, self._param),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


def _check_http_url(url: str, param: str) -> httpx.URL:
    """Parse an http(s) URL with a host and no credentials (every redirect hop passes here)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ImageFetchError("invalid image URL", param) from None
    if parsed.scheme not in ("http", "https"):
        raise ImageSourceForbiddenError(f"URL scheme {parsed.scheme!r} is not allowed", param)
    if not parsed.host:
        raise ImageFetchError("image URL has no host", param)
    if parsed.userinfo:
        raise ImageSourceForbiddenError("image URLs with credentials are not accepted", param)
    return parsed


def _fetch_http(
    url: str, policy: ImagePolicy, param: str, stop: threading.Event | None = None
) -> bytes:
    """GET an image over http(s): redirects followed by hand (each hop re-checked), body capped;
    `stop` set ends it (LoadStopped) and closes its connection."""
    deadline = _Deadline(policy.timeout_s, stop)
    transport = _GuardedTransport(policy, deadline, param)
    timeout = httpx.Timeout(policy.timeout_s)
    with httpx.Client(transport=transport, trust_env=False, timeout=timeout) as client:
        target = _check_http_url(url, param)
        for _hop in range(policy.max_redirects + 1):
            try:
                with client.stream("GET", target, headers=_FETCH_HEADERS) as response:
                    if not response.is_redirect:
                        return _read_body(response, policy, param)
                    location = response.headers["location"]
            except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
                raise _fetch_failure(exc, deadline, param) from None
            target = _check_http_url(_join_url(target, location, param), param)
    raise ImageFetchError(f"image URL redirected more than {policy.max_redirects} times", param)


def _join_url(base: httpx.URL, location: str, param: str) -> str:
    """A redirect's Location resolved against the URL that sent it."""
    try:
        return str(base.join(location))
    except (httpx.InvalidURL, ValueError, TypeError):
        raise ImageFetchError("invalid redirect location", param) from None


def _read_body(response: httpx.Response, policy: ImagePolicy, param: str) -> bytes:
    """The body of a 200 response, refused as soon as it is known to exceed the byte cap."""
    if response.status_code != 200:
        raise ImageFetchError(f"image URL answered HTTP {response.status_code}", param)
    cap = policy.max_download_bytes
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ImageTooLargeError(f"image is {declared} bytes, over the {cap} byte cap", param)
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > cap:
            raise ImageTooLargeError(f"image download exceeds the {cap} byte cap", param)
    return bytes(body)


# ----------------------------------------------------------------------------------------------
# Decoding


def decode_image_bytes(data: bytes, policy: ImagePolicy, param: str = "image_url") -> Image.Image:
    """Decode encoded image bytes of an accepted format; the pixel cap is checked from the header
    before the pixels are decoded. Animated images give their first frame, fully loaded."""
    if len(data) > policy.max_download_bytes:
        raise ImageTooLargeError(f"image exceeds {policy.max_download_bytes} bytes", param)
    probe = _open_checked(data, policy, param)
    image = _open_checked(data, policy, param)
    try:
        probe.verify()  # structural check (PNG CRCs, chunk order); leaves `probe` unusable
        image.load()  # decodes the current frame = the first; truncation raises here
    except Image.DecompressionBombError:
        raise ImageTooLargeError("image is too large (decompression bomb)", param) from None
    except Exception:  # decoders of hostile bytes raise many types (OSError, SyntaxError...)
        raise ImageDecodeError("image data is corrupt or truncated", param) from None
    return image


def _open_checked(data: bytes, policy: ImagePolicy, param: str) -> Image.Image:
    """Parse just the header of an accepted format and enforce the pixel cap."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageTooLargeError("image is too large (decompression bomb)", param) from None
    except Exception:  # UnidentifiedImageError, SyntaxError, struct.error...
        raise ImageDecodeError(
            f"not a decodable image (accepted: {', '.join(ACCEPTED_FORMATS)})", param
        ) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has an empty size {width}x{height}", param)
    if width * height > policy.max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, over the {policy.max_pixels} "
            "pixel cap",
            param,
        )
    return image


# ----------------------------------------------------------------------------------------------
# Pixtral preprocessing (mistral-common's ImageEncoder)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Pixtral preprocessing settings, read from the checkpoint (see `from_model_dir`)."""

    patch_size: int = 14  # vision patch side in pixels
    spatial_merge_size: int = 2  # merged patches per side per image token
    longest_edge: int = 1540  # images are scaled down so their longest side fits
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC  # only bicubic exists in mistral-common

    def __post_init__(self) -> None:
        for name in ("patch_size", "spatial_merge_size", "longest_edge"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"image processor {name} must be a positive int")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image processor image_mean/image_std must be 3 values, std > 0")
        if self.resample != PIL_BICUBIC:
            raise ValueError(f"image processor resample={self.resample} unsupported: only bicubic")

    @property
    def token_pixels(self) -> int:
        """Side in pixels of the square one image token covers (patch * merge = 28)."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_model_dir(cls, path: Path | str) -> ImageProcessorConfig:
        """Read preprocessor_config.json, processor_config.json, config.json (HF layout) and/or
        params.json (Mistral layout) from a checkpoint directory."""
        path = Path(path)

        def read(name: str) -> dict | None:
            file = path / name
            return json.loads(file.read_text()) if file.is_file() else None

        model = read("config.json") or _params_as_hf_config(read("params.json"))
        return cls.from_dicts(
            read("preprocessor_config.json"), read("processor_config.json"), model
        )

    @classmethod
    def from_gguf_mmproj(cls, file: Path | str) -> ImageProcessorConfig:
        """The `clip.vision.*` settings of a llama.cpp mmproj file (its config is checked
        against the text model first, by model.config.read_config)."""
        from mistralpy.model.gguf_file import open_gguf

        meta = open_gguf(file).metadata
        return cls(
            patch_size=int(meta["clip.vision.patch_size"]),
            spatial_merge_size=int(meta.get("clip.vision.spatial_merge_size", 1)),
            longest_edge=int(meta["clip.vision.image_size"]),
            image_mean=_rgb(meta["clip.vision.image_mean"], "image_mean"),
            image_std=_rgb(meta["clip.vision.image_std"], "image_std"),
        )

    @classmethod
    def from_dicts(
        cls, preprocessor: Mapping | None, processor: Mapping | None, model: Mapping | None
    ) -> ImageProcessorConfig:
        """Combine the three HF config files' image fields; values stated twice must agree."""
        pre, proc, model = preprocessor or {}, processor or {}, model or {}
        vision = model.get("vision_config") or {}
        values = {
            "patch_size": [_side(pre.get("patch_size")), proc.get("patch_size")]
            + [vision.get("patch_size")],
            "spatial_merge_size": [proc.get("spatial_merge_size"), model.get("spatial_merge_size")],
            "longest_edge": [_side(pre.get("size")), vision.get("image_size")],
        }
        fields: dict[str, Any] = {}
        for name, stated in values.items():
            found = {v for v in stated if v is not None}
            if len(found) > 1:
                raise ValueError(f"checkpoint states conflicting {name} values: {sorted(found)}")
            if not found:
                raise ValueError(f"checkpoint does not state the image {name}")
            fields[name] = found.pop()
        for name in ("image_mean", "image_std"):
            if pre.get(name) is not None:
                fields[name] = _rgb(pre[name], name)
        if pre.get("rescale_factor") is not None:
            fields["rescale_factor"] = float(pre["rescale_factor"])
        if pre.get("resample") is not None:
            fields["resample"] = int(pre["resample"])
        return cls(**fields)


def _rgb(values: Sequence[Any], name: str) -> tuple[float, float, float]:
    """(R, G, B) floats of a per-channel config value; ValueError unless it has three."""
    if len(values) != 3:
        raise ValueError(f"image processor {name} must be 3 values, got {len(values)}")
    return float(values[0]), float(values[1]), float(values[2])


def _side(value: Any) -> int | None:
    """A square side from an int or a {"height","width"} / {"longest_edge"} dict."""
    if value is None or isinstance(value, int):
        return value
    if "longest_edge" in value:
        return value["longest_edge"]
    if value.get("height") != value.get("width"):
        raise ValueError(f"non-square image size/patch {value} is not supported")
    return value["height"]


def _params_as_hf_config(params: Mapping | None) -> dict | None:
    """The image fields of a Mistral-format params.json, shaped like HF's config.json."""
    encoder = (params or {}).get("vision_encoder")
    if not encoder:
        return None
    vision = {"patch_size": encoder.get("patch_size"), "image_size": encoder.get("image_size")}
    return {"vision_config": vision, "spatial_merge_size": encoder.get("spatial_merge_size", 1)}


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    """One image ready for the vision encoder, with its prompt layout and cache key."""

    pixel_values: torch.Tensor  # (3, H, W) float32 normalised; H = rows*28, W = cols*28
    content_hash: str  # hex sha256 of the decoded RGB pixels + size: same picture, same hash
    rows: int  # merged-token grid height
    cols: int  # merged-token grid width

    @property
    def num_image_tokens(self) -> int:
        """[IMG] tokens = image embeddings the model produces for this image."""
        return self.rows * self.cols

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length of the placeholder: each row's [IMG]s plus one [IMG_BREAK]/[IMG_END]."""
        return self.rows * (self.cols + 1)

    def placeholder_token_ids(self, img_id: int, break_id: int, end_id: int) -> list[int]:
        """[IMG]*cols + [IMG_BREAK] per row, the last row ending in [IMG_END] instead."""
        ids = ([img_id] * self.cols + [break_id]) * self.rows
        ids[-1] = end_id
        return ids


def image_grid(width: int, height: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """(rows, cols) of image tokens for a width x height image, exactly as mistral-common."""
    ratio = max(height / cfg.longest_edge, width / cfg.longest_edge)
    if ratio > 1:
        # Python's round (half to even) as mistral-common; at least 1 pixel for thin images.
        width = max(round(width / ratio), 1)
        height = max(round(height / ratio), 1)
    side = cfg.token_pixels
    return (height - 1) // side + 1, (width - 1) // side + 1


def to_rgb(image: Image.Image, param: str = "image_url") -> Image.Image:
    """RGB with transparency composited over white (mistral-common); RGB input unchanged."""
    if image.mode == "RGB":
        return image
    try:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, "WHITE")
        canvas.paste(rgba, (0, 0), rgba)
        return canvas.convert("RGB")
    except (ValueError, OSError):
        raise ImageDecodeError(f"cannot convert {image.mode} image to RGB", param) from None


_BAND_ROWS = 256


def resize_bicubic(rgb: np.ndarray, out_h: int, out_w: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, out_h, out_w) float32 in [0, 255]-ish, OpenCV INTER_CUBIC style.

    Done as two 1-D passes: width first, band by band straight from uint8, then height. Cubic
    weights at a scale of exactly 1 are (0, 1, 0, 0), so each pass leaves the other axis as is
    and the float32 copy of a large original (600 MB at 50 Mpx) never exists at once."""
    height, width, _ = rgb.shape
    bands = []
    for top in range(0, height, _BAND_ROWS):
        # np.array copies the band: PIL's buffers are read-only, which torch warns about.
        band = torch.from_numpy(np.array(rgb[top : top + _BAND_ROWS])).permute(2, 0, 1).float()
        bands.append(_bicubic(band, band.shape[1], out_w))
    return _bicubic(torch.cat(bands, dim=1), out_h, out_w)


def _bicubic(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """(C, h, w) float32 -> (C, out_h, out_w); half-pixel centres, a=-0.75, no antialias."""
    if x.shape[1:] == (out_h, out_w):
        return x
    return F.interpolate(x[None], size=(out_h, out_w), mode="bicubic", align_corners=False)[0]


def content_hash(rgb: np.ndarray) -> str:
    """Hex sha256 of an (H, W, 3) uint8 image's size and pixels, whatever its encoding was."""
    height, width, _ = rgb.shape
    digest = hashlib.sha256(f"rgb8:{width}x{height}:".encode())
    digest.update(np.ascontiguousarray(rgb).data)
    return digest.hexdigest()


def preprocess_image(
    image: Image.Image, cfg: ImageProcessorConfig, param: str = "image_url"
) -> ProcessedImage:
    """Resize and normalise one decoded image the way mistral-common's ImageEncoder does."""
    rgb = np.asarray(to_rgb(image, param), dtype=np.uint8)  # (H, W, 3)
    rows, cols = image_grid(rgb.shape[1], rgb.shape[0], cfg)
    side = cfg.token_pixels
    pixels = resize_bicubic(rgb, rows * side, cols * side)  # (3, H', W') float32
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
    pixels.mul_(cfg.rescale_factor).sub_(mean).div_(std)
    return ProcessedImage(pixels.contiguous(), content_hash(rgb), rows, cols)


__all__ = [
    "ACCEPTED_FORMATS",
    "CLIP_MEAN",
    "CLIP_STD",
    "ImagePolicy",
    "ImageProcessorConfig",
    "ProcessedImage",
    "address_refusal",
    "content_hash",
    "decode_image_bytes",
    "image_grid",
    "load_image",
    "preprocess_image",
    "resize_bicubic",
    "to_rgb",
]
