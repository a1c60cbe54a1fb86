"""The app as a server, attacked: the real UI served by the app's own launch (sdstudio.ui.server.launch, what
app.py calls) with `--auth`, in this process so that every route it has can be listed.

- Files outside the workspace, through every Gradio file route, with absolute, `../`, URL-encoded (once and
  twice), backslash and NUL-byte paths, `file://` URLs and symlinks in the workspace that point outside: every
  attempt fails, logged in or not. Attempts and successes are counted (successes must be 0).
- Uploads named `../../x` land in Gradio's upload folder, and the Dataset tab copies them into the workspace.
- Without a login, every route except the login page and its assets answers 401 (Gradio leaves some open).
- A JSON body with NaN or Infinity (a crafted slider value) is refused before any handler runs.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from inprocess_app import serve

SECRET = "TOP-SECRET-OUTSIDE-THE-WORKSPACE"
USER, PASSWORD = "alice", "correct horse"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from sdstudio.workspace import Workspace

    root = tmp_path_factory.mktemp("server")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    ws = Workspace.open(root / "ws")
    (ws.root / "inputs" / "inside.txt").write_text("inside the workspace")
    (ws.root / "inputs" / "link-dir").symlink_to(outside, target_is_directory=True)
    (ws.root / "inputs" / "link-file.txt").symlink_to(outside / "secret.txt")
    served = serve(ws, auth=(USER, PASSWORD))
    yield {"url": served.url, "app": served.app, "ws": ws, "root": root, "outside": outside, "ctx": served.ctx}
    served.close()


def _login(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    r = client.post("/login", data={"username": USER, "password": PASSWORD})
    assert r.status_code == 200, r.text
    assert client.get("/config").status_code == 200  # logged in: the app works
    return client


def _traversal_paths(ws_root: Path, outside: Path) -> list[str]:
    secret = outside / "secret.txt"
    rel_from_ws = "../" * len(ws_root.parts) + str(secret).lstrip("/")
    plain = [
        str(secret), "/etc/passwd", f"{ws_root}/../outside/secret.txt", f"{ws_root}/inputs/../../outside/secret.txt",
        rel_from_ws, "../../../../../../../../etc/passwd", f"{ws_root}/inputs/link-dir/secret.txt",
        f"{ws_root}/inputs/link-file.txt", f"file://{secret}", "file:///etc/passwd",
        f"{ws_root}\\..\\outside\\secret.txt", f"{ws_root}/inputs/inside.txt\x00/../../../outside/secret.txt",
        f"//{secret}", f"{ws_root}/./../outside/./secret.txt",
    ]
    encoded = []
    for p in plain:
        encoded.append(quote(p, safe=""))  # every / and . that needs it, encoded
        encoded.append(quote(quote(p, safe=""), safe=""))  # twice
    encoded += [p.replace("../", "%2e%2e%2f") for p in plain if "../" in p]
    encoded += [p.replace("../", "..%2f") for p in plain if "../" in p]
    encoded += [p.replace("../", "%2e%2e/") for p in plain if "../" in p]
    encoded += [p.replace("/", "%2F") for p in plain]
    return plain + encoded


FILE_ROUTES = ["/gradio_api/file={}", "/gradio_api/file/{}", "/file={}", "/gradio_api/proxy={}", "/static/{}",
               "/assets/{}", "/svelte/{}", "/gradio_api/stream/x/0/0/{}"]


def _leaked(r: httpx.Response) -> bool:
    return r.status_code == 200 and (SECRET in r.text or re.search(r"root:.*:0:0:", r.text) is not None)


def test_no_file_route_serves_anything_outside_the_workspace(server, capsys):
    client = _login(server["url"])
    anonymous = httpx.Client(base_url=server["url"], timeout=60)
    # The route works: a file inside the workspace is served to a logged-in user (so a refusal below is a refusal).
    ok = client.get("/gradio_api/file=" + str(server["ws"].root / "inputs" / "inside.txt"))
    assert ok.status_code == 200 and "inside the workspace" in ok.text
    tried, leaks = 0, []
    for route in FILE_ROUTES:
        for path in _traversal_paths(server["ws"].root, server["outside"]):
            for who in (client, anonymous):
                tried += 1
                try:
                    r = who.get(route.format(path.replace("\x00", "%00")))
                except httpx.HTTPError:
                    continue  # a malformed URL the client or server refuses outright: not a leak
                if _leaked(r):
                    leaks.append((route, path, r.status_code))
    with capsys.disabled():
        print(f"\nfile-route traversal: {len(leaks)} succeeded of {tried} attempts "
              f"({len(FILE_ROUTES)} routes, logged in and not)")
    assert tried >= 500 and leaks == [], leaks


def test_uploads_named_dotdot_stay_inside(server):
    from gradio.utils import get_upload_folder

    from sdstudio.ui.dataset_tab import import_uploads

    client = _login(server["url"])
    names = ["../../../../escaped-upload.txt", "..\\..\\escaped2.txt", "/tmp/escaped3.txt", "....//....//e4.txt"]
    files = [("files", (n, b"uploaded", "text/plain")) for n in names]
    r = client.post("/gradio_api/upload", files=files)
    assert r.status_code == 200, r.text
    stored = [Path(p) for p in r.json()]
    cache = Path(get_upload_folder()).resolve()
    assert len(stored) == len(names) and all(cache in p.resolve().parents for p in stored), stored
    assert not list(server["root"].rglob("escaped*")) and not Path("/tmp/escaped3.txt").exists()
    folder, refused = import_uploads(server["ctx"], "../../uploads", [str(p) for p in stored])
    ws = server["ws"].root
    assert ws in folder.parents and not refused
    assert all(ws in p.resolve().parents for p in folder.iterdir()) and len(list(folder.iterdir())) == len(names)


def _routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the server has, Gradio's included routers too."""
    out = []

    def walk(routes):
        for r in routes:
            if hasattr(r, "path") and hasattr(r, "methods"):
                out.extend((m, r.path) for m in sorted(r.methods or ["GET"]) if m != "HEAD")
            elif hasattr(r, "path"):
                out.append(("GET", r.path))  # a Route without methods (a mount)
            elif hasattr(r, "original_router"):
                walk(r.original_router.routes)
            elif hasattr(r, "routes"):
                walk(r.routes)
    walk(app.router.routes)
    return sorted(set(out))


def _fill(path: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: "0" if m[1] in ("component_id", "size") else "x", path)


def test_auth_blocks_every_route_without_a_login(server, capsys):
    from sdstudio.ui.server import LOOPBACK_ONLY, _public

    anonymous = httpx.Client(base_url=server["url"], timeout=30)
    routes = _routes(server["app"])
    assert len(routes) >= 60, routes  # the whole of Gradio's API, not a sample
    checked, open_ = 0, []
    for method, path in routes:
        if _public(_fill(path)) or path in LOOPBACK_ONLY:  # (LOOPBACK_ONLY: see the test below)
            continue
        checked += 1
        r = anonymous.request(method, _fill(path), json={} if method == "POST" else None)
        if r.status_code != 401:
            open_.append((method, path, r.status_code))
    # The public ones show the login page and its assets, never data.
    assert anonymous.get("/config").status_code == 401
    assert anonymous.get("/gradio_api/info").status_code == 401
    with capsys.disabled():
        print(f"\n--auth: {checked - len(open_)} of {checked} API routes refused without a login "
              f"({len(routes) - checked} public: the login page and its assets)")
    assert open_ == [], open_


def test_startup_events_only_from_this_machine():
    """Gradio's launch calls /gradio_api/startup-events itself without a login; anyone else needs one."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from sdstudio.ui.server import AuthGuard

    sent = []

    async def inner(scope, receive, send):
        sent.append("reached")

    async def send(message):
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    app = SimpleNamespace(auth=[("u", "p")], tokens={}, cookie_id="c")
    for client in (("127.0.0.1", 5000), ("192.168.1.20", 5000), ("::1", 5000)):
        scope = {"type": "http", "method": "GET", "path": "/gradio_api/startup-events", "headers": [], "app": app,
                 "client": client}
        # In a thread of its own: a browser test earlier in this worker leaves playwright's event loop running in
        # the main thread, where asyncio.run refuses to start (pytest -n hands tests out in any order).
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, AuthGuard(inner)(scope, None, send)).result()
    assert sent == ["reached", 401, "reached"]


def test_wrong_password_gets_no_cookie(server):
    client = httpx.Client(base_url=server["url"], timeout=30)
    r = client.post("/login", data={"username": USER, "password": "wrong"})
    assert r.status_code in (400, 401)
    assert client.get("/gradio_api/info").status_code == 401


def test_non_finite_numbers_are_refused_before_any_handler(server):
    client = _login(server["url"])
    body = '{"data": [NaN, 1], "fn_index": 0, "session_hash": "abc", "event_data": null, "trigger_id": null}'
    for bad in (body, body.replace("NaN", "Infinity"), body.replace("NaN", "-Infinity"), body.replace("NaN", "1e400")):
        r = client.post("/gradio_api/queue/join", content=bad, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "NaN or infinite" in r.text, (bad, r.status_code, r.text)
    r = client.post("/gradio_api/queue/join", content=body.replace("NaN", "0.5").replace('"fn_index": 0', '"fn_index": 99999'),
                    headers={"content-type": "application/json"})
    assert r.status_code != 400 or "NaN" not in r.text


@pytest.mark.browser
def test_the_login_page_still_logs_in(server, page):
    """The guard must not break the login page: the browser shows it, logs in, and the app appears."""
    page.goto(server["url"], wait_until="domcontentloaded")
    page.wait_for_selector("input[type=password]", timeout=60_000)
    page.fill("input[type=text]", USER)
    page.fill("input[type=password]", PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_selector("#tabs", timeout=60_000)
    assert page.get_by_role("tab", name="Playground").is_visible()
