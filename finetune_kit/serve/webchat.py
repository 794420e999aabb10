"""The chat page: one self-contained HTML file for talking to the served model from a browser.

It is served at ``/chat``, and at ``/`` to clients whose ``Accept`` header prefers HTML
(browsers); Ollama clients and open-webui probe ``/`` without asking for HTML and keep getting
``Ollama is running``. The page loads nothing from elsewhere, so it works offline. Loading it
needs no key, like ``/health``; its calls to ``/v1`` send the key typed into it.
"""

# no `from __future__ import annotations`: FastAPI reads the route's return annotation as a real class
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi.responses import HTMLResponse

PAGE = "static/chat.html"
"""The page, relative to the ``finetune_kit.serve`` package (shipped as package data)."""

_HEADERS = {
    # the page's own inline script and style, and API calls to this server; nothing else
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
_HTML = ("text/html", "application/xhtml+xml")
_PLAIN = ("text/plain", "text/*", "*/*")


@lru_cache(maxsize=1)
def page_html() -> str:
    """The page's HTML, read once from the installed package."""
    return resources.files("finetune_kit.serve").joinpath(PAGE).read_text(encoding="utf-8")


def prefers_html(accept: str | None) -> bool:
    """Whether an ``Accept`` header names HTML and ranks it at least as high as plain text.

    Browsers send ``text/html,...,*/*;q=0.8``; curl, httpx and the Ollama clients send ``*/*``,
    ``application/json`` or nothing, which is no request for HTML.

    >>> prefers_html("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")
    True
    >>> prefers_html("*/*"), prefers_html(None), prefers_html("text/plain, text/html;q=0.5")
    (False, False, False)
    """
    html = plain = 0.0
    for item in (accept or "").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        if media in _HTML:
            html = max(html, quality)
        elif media in _PLAIN:
            plain = max(plain, quality)
    return html > 0 and html >= plain


def page_response() -> "HTMLResponse":
    """The page as an HTML response (``Vary: Accept``, since ``/`` answers by the Accept header)."""
    from fastapi.responses import HTMLResponse

    return HTMLResponse(page_html(), headers={**_HEADERS, "Vary": "Accept"})


def install_webchat_routes(app: Any) -> None:
    """Add ``GET /chat`` to ``app`` (a FastAPI app); ``/`` is the Ollama root, which serves the page to browsers."""
    from fastapi.responses import Response

    async def chat() -> Response:
        return page_response()

    app.add_api_route("/chat", chat, methods=["GET", "HEAD"], include_in_schema=False)
