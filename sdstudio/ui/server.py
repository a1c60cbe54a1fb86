"""Serving the app: Gradio's `launch`, with three things it does not do on its own.

1. **A patient start-up probe.** After starting its server, Gradio sends one HEAD request to it with a 3-second
   timeout and, if that times out, dies with "When localhost is not accessible, a shareable link must be
   created". On a busy machine (a training in another process, load 9 on 2 cores) the first answer can take
   longer, so the app never started. We bind an explicit address and never share, so the probe only has to
   see our own server answer: it now retries, with longer timeouts, for up to `STARTUP_WAIT_S`.
2. **`--auth` covers every API route.** Gradio checks the login on most routes but not all (`/openapi.json`,
   `/gradio_api/cancel`, `/gradio_api/heartbeat/...`, `/gradio_api/stream/...`, `/monitoring`, ...). With auth
   on, `AuthGuard` answers 401 to every request without a valid login cookie, except the login page itself
   and its static assets.
3. **No NaN or infinity from a client.** JSON has no NaN, but Python's parser accepts `NaN` and `Infinity`, so
   a hand-made API call could put one in a slider. `AuthGuard` refuses such a request body before any handler
   runs (the browser cannot send one: JSON.stringify writes null).
"""
from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("sdstudio.server")

STARTUP_WAIT_S = 120.0  # how long the start-up probe waits for our own server to answer
MAX_CHECKED_BODY = 8 * 1024 * 1024  # JSON bodies up to this size are checked for NaN/Infinity

# Without a login, only the login page and what it loads are served.
PUBLIC_PATHS = {"/", "/login", "/login/", "/logout", "/config", "/config/", "/favicon.ico", "/theme.css",
                "/robots.txt", "/manifest.json", "/gradio_api/login_check", "/gradio_api/login_check/"}
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
# Gradio's launch calls this itself, without a login, to run the app's start-up events once: only from this
# machine.
LOOPBACK_ONLY = {"/gradio_api/startup-events"}


def patient_url_ok(url: str, wait_s: float | None = None) -> bool:
    """True once `url` answers at all (any status below 500), retrying with growing timeouts until `wait_s`."""
    import httpx

    deadline = time.monotonic() + (STARTUP_WAIT_S if wait_s is None else wait_s)
    timeout = 3.0
    while True:
        try:
            r = httpx.head(url, timeout=timeout, verify=False)
            if r.status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            log.error("the app's own server did not answer %s within the start-up wait", url)
            return False
        timeout = min(timeout * 2, 30.0)
        time.sleep(0.5)


def install_patient_probe() -> None:
    """Replace Gradio's one-shot start-up probe (gradio.networking.url_ok, read by Blocks.launch)."""
    from gradio import networking

    networking.url_ok = patient_url_ok


class AuthGuard:
    """ASGI middleware: the login wall for every route when auth is on, and the NaN/Infinity refusal."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gradio_app = scope.get("app")
        if (getattr(gradio_app, "auth", None) and not _public(scope["path"]) and not _logged_in(scope, gradio_app)
                and not (scope["path"] in LOOPBACK_ONLY and _from_loopback(scope))):
            return await _answer(send, 401, "Not authenticated: log in first.")
        if scope["method"] in ("POST", "PUT", "PATCH") and _is_json(scope):
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > MAX_CHECKED_BODY:
                    break
            if len(body) <= MAX_CHECKED_BODY and _has_non_finite(body):
                return await _answer(send, 400, "A number in the request is NaN or infinite: send plain numbers.")
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": more}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _from_loopback(scope) -> bool:
    client = scope.get("client") or ("", 0)
    return client[0] in ("127.0.0.1", "::1")


def _logged_in(scope, gradio_app) -> bool:
    cookies = {}
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, _, val = part.strip().partition("=")
                cookies[name] = val
    cookie_id = getattr(gradio_app, "cookie_id", "")
    tokens = getattr(gradio_app, "tokens", {}) or {}
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return bool(token) and token in tokens


def _is_json(scope) -> bool:
    for key, value in scope.get("headers", []):
        if key == b"content-type":
            return value.split(b";")[0].strip().lower() == b"application/json"
    return False


def _has_non_finite(body: bytes) -> bool:
    import math

    found = []

    def constant(name):  # json calls this for NaN, Infinity and -Infinity only
        found.append(name)
        return None

    def number(text):  # 1e400 parses as infinity
        value = float(text)
        if not math.isfinite(value):
            found.append(text)
        return value

    try:
        json.loads(body, parse_constant=constant, parse_float=number)
    except ValueError:
        return False  # not JSON after all: the route's own parser answers
    return bool(found)


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def launch(demo, *, host: str, port: int, auth: tuple[str, str] | None, workspace_root: str, inbrowser: bool,
           prevent_thread_lock: bool = False, **kwargs):
    """`demo.launch` as the app needs it: loopback by default, no sharing, the workspace as the only folder
    served, the patient probe, and the guard. Returns what Gradio's launch returns."""
    import gc

    from starlette.middleware import Middleware

    install_patient_probe()
    # Everything built so far (gradio, torch, the UI) lives as long as the app: moved out of the collector's
    # reach, so the full collection each job ends with costs milliseconds instead of half a second per
    # generation (measured: 0.63 -> 0.12 s of CPU per tiny-model generation job).
    gc.collect()
    gc.freeze()
    return demo.launch(server_name=host, server_port=port, share=False, auth=auth,
                       allowed_paths=[workspace_root], inbrowser=inbrowser, show_error=False,
                       prevent_thread_lock=prevent_thread_lock, app_kwargs={"middleware": [Middleware(AuthGuard)]},
                       **kwargs)
