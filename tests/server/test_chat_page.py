"""The chat page at `GET /` without a browser: served without a key, a strict CSP whose hashes
allow exactly the inlined script and style, and no reference to any other origin."""

import base64
import hashlib
import re

from fastapi.testclient import TestClient

from mistralpy.server.app import ServerSettings, create_app
from tests.server.fake_stack import make_fake_service


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_page_is_served_with_a_strict_csp_and_no_external_urls():
    app = create_app(make_fake_service(), ServerSettings(api_key="sekret"))
    with TestClient(app) as http:
        res = http.get("/")
        assert http.get("/v1/models").status_code == 401  # the API still needs the key
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    html = res.text
    csp = dict(d.strip().split(" ", 1) for d in res.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert (
        csp["frame-ancestors"] == "'none'"
        and "unsafe" not in res.headers["content-security-policy"]
    )
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert csp["script-src"] == sha256_source(script)
    assert csp["style-src"] == sha256_source(style)
    assert not re.search(r"https?://", html)  # no CDN, nothing loaded from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(//|https?:)""", html)
    assert "@import" not in style and "url(" not in style
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert res.headers["x-content-type-options"] == "nosniff"
    assert "/" not in {p for p in app.openapi()["paths"]}
