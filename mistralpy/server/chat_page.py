"""The web chat page at `GET /`: one HTML document with its CSS and JS inlined, no build step
and no CDN (it works offline). The script and style are allowed by their hashes in a strict
Content-Security-Policy, so nothing else (injected markup, other origins) can run or load.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

# The page is served without a key (a browser cannot send one on navigation); it asks for the
# key itself when the API answers 401.
CHAT_PAGE_PATH = "/"


@dataclass(frozen=True)
class ChatPage:
    html: str
    csp: str  # the Content-Security-Policy header value


def _hash_source(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def build_chat_page(template: str, css: str, js: str) -> ChatPage:
    """Inline `css` and `js` into `template` and the CSP that allows exactly them."""
    if "</script" in js.lower() or "</style" in css.lower():
        raise ValueError("inlined assets must not close their own element")
    html = template.replace("{{CSS}}", css).replace("{{JS}}", js)
    csp = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hash_source(js)}",
            f"style-src {_hash_source(css)}",
            "img-src data: blob:",  # previews of attached files; URLs are fetched by the server
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return ChatPage(html, csp)


def load_chat_page() -> ChatPage:
    """The page from the package's `server/static` files."""
    static = files("mistralpy.server") / "static"
    html, css, js = ((static / n).read_text("utf-8") for n in ("chat.html", "chat.css", "chat.js"))
    return build_chat_page(html, css, js)


def install_chat_page(app: FastAPI, page: ChatPage | None = None) -> None:
    """Serve the chat page at `/` (left out of the OpenAPI document)."""
    page = page or load_chat_page()
    headers = {
        "Content-Security-Policy": page.csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    @app.get(CHAT_PAGE_PATH, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page.html, headers=headers)
