"""The browser chat page's files and the router's routes for them, without Ray or a browser."""

from __future__ import annotations

import configparser
import fnmatch
import re
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from im_actors import web
from im_actors.config import load_config
from im_actors.router import HubTable, make_app

ROOT = Path(__file__).resolve().parents[2]


def test_public_surface() -> None:
    assert sorted(web.__all__) == ["CHAT_PATH", "PAGE_HEADERS", "STATIC_DIR"]


def test_every_static_file_is_package_data_and_every_reference_exists() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in cfg["options.package_data"]["im_actors.web"].split(",")]
    files = sorted(p.relative_to(web.STATIC_DIR.parent).as_posix() for p in web.STATIC_DIR.iterdir())
    assert {"static/index.html", "static/chat.css", "static/chat.js", "static/imclient.js"} <= set(files)
    for name in files:  # a non-editable install carries each of them
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} is not in setup.cfg package_data"
    html = (web.STATIC_DIR / "index.html").read_text()
    chat_js = (web.STATIC_DIR / "chat.js").read_text()
    refs = re.findall(r'(?:src|href)="([^":]+)"', html) + re.findall(r'from "\./([^"]+)"', chat_js)
    assert refs and all((web.STATIC_DIR / ref).is_file() for ref in refs), refs
    # Offline: nothing is loaded from another host (no CDN).
    for path in web.STATIC_DIR.iterdir():
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", path.read_text()), path.name


async def test_router_serves_the_page_with_its_headers() -> None:
    config = load_config(dev_login=True, jwt_secret="k" * 32)
    async with TestClient(TestServer(make_app(config, HubTable()))) as client:
        for path in ("/", "/chat"):
            resp = await client.get(path, allow_redirects=False)
            assert resp.status == 302 and resp.headers["Location"] == "/chat/", path
        resp = await client.get("/chat/")
        assert resp.status == 200 and resp.content_type == "text/html"
        assert 'src="chat.js"' in await resp.text()
        for name, value in web.PAGE_HEADERS.items():
            assert resp.headers[name] == value
        for name, kind in (("chat.js", "javascript"), ("imclient.js", "javascript"), ("chat.css", "text/css")):
            resp = await client.get(f"/chat/{name}")
            assert resp.status == 200 and kind in resp.content_type, name
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
        resp = await client.get("/chat/nothing.js")
        assert resp.status == 404
        resp = await client.get("/chat/%2e%2e/router.py")
        assert resp.status in (403, 404)
        resp = await client.get("/v1/hub")  # the API keeps its own headers
        assert "Content-Security-Policy" not in resp.headers
