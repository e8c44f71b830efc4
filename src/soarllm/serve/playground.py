"""GET /: the playground, one self-contained HTML page shipped in soarllm/serve/static/.

The page has no data of its own: it calls this server's API from the browser (/v1/models,
/v1/chat/completions with the key typed into it), so it is served without a key. Its script runs
under a Content-Security-Policy that allows only the page's own inline script (by a nonce drawn
for each response) and connections to this server: text a model writes is escaped before it is
rendered, and even a rendering bug could neither run a script nor send data elsewhere.
"""

from __future__ import annotations

import secrets
from importlib.resources import files

from fastapi.responses import HTMLResponse

PAGE = "playground.html"
NONCE_MARK = "{{nonce}}"


def playground_html(nonce: str) -> str:
    page = files("soarllm.serve").joinpath("static", PAGE).read_text(encoding="utf-8")
    return page.replace(NONCE_MARK, nonce)


def playground_response() -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    return HTMLResponse(playground_html(nonce), headers={
        "Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
    })
