"""The browser chat page: plain HTML, CSS and JavaScript, served by the router (no build step, no CDN).

Files (in :data:`STATIC_DIR`, shipped as package data):

- ``index.html``: the page; ``chat.css``: its look.
- ``imclient.js``: the protocol client, PROTOCOL.md version 1 over the ``im.v1.json`` subprotocol:
  router lookup (``GET /v1/hub``, ``exclude=`` after a failure), dev login or a pasted token, requests
  with ids, a per-conversation cursor (``ConvCursor``: sans-I/O, like :mod:`im_actors.client`'s: drops a
  ``msg`` already held, buffers one ahead of a gap and fills the gap with ``sync``), an outbox of unacked
  sends resent with the same cmid (kept in the tab's ``sessionStorage``, so a reload resends them too),
  and reconnect with catch-up (``convs``, then ``sync`` from the last seq held) on every close code
  PROTOCOL.md section 7 says to reconnect on.
- ``chat.js``: the user interface over that client.

The router serves ``GET /chat/`` (the page; ``GET /`` and ``GET /chat`` redirect there) and the files
under ``/chat/``, each with :data:`PAGE_HEADERS`. ``python -m im_actors.web`` runs a local deployment
with development login to try it (see ``__main__.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = ["CHAT_PATH", "PAGE_HEADERS", "STATIC_DIR"]

#: Folder of the page's files (inside the installed package).
STATIC_DIR: Final[Path] = Path(__file__).resolve().parent / "static"

#: URL path the page is served under (with its trailing slash: the files are relative to it).
CHAT_PATH: Final[str] = "/chat/"

#: Headers on every file of the page. The content security policy allows only the page's own files
#: (no inline script, no CDN) and WebSocket connections to any hub (``ws:``/``wss:``: hubs listen on
#: their own ports and hosts, given by ``GET /v1/hub``); ``no-cache`` makes a browser revalidate the
#: files after an upgrade.
PAGE_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
