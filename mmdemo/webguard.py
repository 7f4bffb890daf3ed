"""Guards for the Gradio server: a delay on failed logins, a cap on request bodies, and a
lifetime for temporary uploads. Pure ASGI/Starlette and the standard library (no gradio import).

    auth = throttled_auth(user, password)                  # launch(auth=auth)
    kwargs = guarded_app_kwargs(max_file_size="20mb")      # launch(app_kwargs=kwargs)
    gr.Blocks(delete_cache=upload_cache_ttl())             # uploads expire ($MMDEMO_UPLOAD_TTL)

How Gradio 6.31 uses each (gradio/ in site-packages):

- Login: `POST /login` is an `async def` (routes.py:497). A callable `auth` is awaited when
  `inspect.iscoroutinefunction(auth)` is true and otherwise called *in the event loop*
  (routes.py:513-517), so a blocking sleep there would stall every request of the server. The
  callable sees only (username, password), never the request (routes.py:515), hence one global
  gate here, not one per client (behind --share or a Space proxy every client has the same
  address anyway).
- Bodies: `launch(app_kwargs=...)` passes its dict to `App(**app_kwargs)`, a FastAPI subclass
  (blocks.py:3395-3399, routes.py:388-397), so FastAPI's `middleware=[Middleware(...)]` reaches
  Starlette before the app starts. Gradio then inserts its CORS and Brotli middleware outside it
  (routes.py:410-419); this one runs inside them, so a 413 still gets CORS headers. Uploads go
  to disk through GradioMultiPartParser, which refuses a file over `max_file_size` but lets up
  to 1000 files through in one request (route_utils.py:1641-1650).
- Uploads: `/gradio_api/upload` adds every stored path to `blocks.upload_file_set`
  (routes.py:2124), one of `blocks.temp_file_sets` (blocks.py:1442-1443). With
  `gr.Blocks(delete_cache=(frequency, age))` a lifespan task (route_utils.py:1184-1190, started
  by routes.py:392-397) removes, every `frequency` seconds, each of those files whose ctime is
  more than `age` seconds old (route_utils.py:1157-1181), whether or not an event used it, and
  all of them when the server stops (route_utils.py:1221). The file's hash folder stays, empty.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOGIN_DELAY_S = 1.0  # seconds after a failed login before the next login is checked
LOGIN_MAX_WAITING = 16  # logins queued behind that delay; more are answered 429, unchecked
BODY_LIMIT = 1024 * 1024  # bytes of body a request to any route but the upload may carry
MULTIPART_OVERHEAD = 64 * 1024  # bytes of boundaries and part headers around one upload
UPLOAD_PATH = "/gradio_api/upload"  # Gradio's upload route (API_PREFIX + "/upload")
UPLOAD_TTL_S = 3600  # default seconds a temporary upload (or cached output) is kept
UPLOAD_SWEEP_S = 600  # longest wait between two sweeps of the temporary files
TTL_ENV = "MMDEMO_UPLOAD_TTL"  # environment variable: the lifetime of uploads, in seconds
SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}  # as Gradio's

AuthCheck = Callable[[str, str], Awaitable[bool]]


# ----------------------------------------------------------------------------- logins


def _digest(text: str) -> bytes:
    """A fixed-length digest, so that comparing it does not time the secret's length."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class LoginThrottle:
    """One account, checked at most once per `delay_s` after a failure, server-wide.

    Every login waits (asynchronously) until `delay_s` has passed since the last failed one
    *before* its password is compared, one at a time; so the number of passwords tried per
    second is bounded even for a guesser that drops its requests without waiting for the answer.
    The right password is never refused for having been guessed at: it waits behind at most
    `max_waiting` queued logins (`max_waiting * delay_s` seconds). A login arriving while
    `max_waiting` are queued gets HTTP 429 without being checked.

    `checked`, `failed` and `refused` count logins compared, compared and wrong, and refused
    unchecked.
    """

    def __init__(self, user: str, password: str, delay_s: float = LOGIN_DELAY_S,
                 max_waiting: int = LOGIN_MAX_WAITING) -> None:
        if not user or not password:
            raise ValueError(f"user and password must both be non-empty, got user {user!r} and "
                             f"a password of {len(password)} characters")
        if not delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0 seconds, got {delay_s!r}")
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting!r}")
        self.user = user.strip()  # Gradio strips the typed username (routes.py:500)
        self._user = _digest(self.user)
        self._password = _digest(password)
        self.delay_s = float(delay_s)
        self.max_waiting = max_waiting
        self.checked = self.failed = self.refused = 0
        self._next_at = 0.0  # time.monotonic() before which no login is compared
        self._waiting = 0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    def _get_lock(self) -> asyncio.Lock:
        """The lock of the running event loop (a relaunched Gradio server runs a new one)."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    def matches(self, username: str, password: str) -> bool:
        """Both in constant time (both compared, whatever the first gives)."""
        user_ok = hmac.compare_digest(_digest(username.strip()), self._user)
        password_ok = hmac.compare_digest(_digest(password), self._password)
        return user_ok & password_ok

    async def check(self, username: str, password: str) -> bool:
        """Gradio's `auth` callable: True for the account's login, after the failure delay."""
        if self._waiting >= self.max_waiting:
            self.refused += 1
            raise HTTPException(status_code=429, detail="Too many login attempts; try again in "
                                f"{self.max_waiting * self.delay_s:.0f} s.",
                                headers={"Retry-After": str(max(1, round(self.delay_s)))})
        self._waiting += 1
        try:
            async with self._get_lock():
                wait = self._next_at - time.monotonic()
                if wait > 0:  # cancelled here, nothing was compared: the gate still holds
                    await asyncio.sleep(wait)
                ok = self.matches(username, password)
                self.checked += 1
                if not ok:
                    self.failed += 1
                    self._next_at = time.monotonic() + self.delay_s
                return ok
        finally:
            self._waiting -= 1


def throttled_auth(user: str, password: str, delay_s: float = LOGIN_DELAY_S,
                   max_waiting: int = LOGIN_MAX_WAITING) -> AuthCheck:
    """`launch(auth=...)` for one account: an async (username, password) -> bool that Gradio
    awaits, so the delay after a failed login never blocks the event loop. Its LoginThrottle is
    `.__self__` (counters for tests and logs)."""
    return LoginThrottle(user, password, delay_s, max_waiting).check


# ----------------------------------------------------------------------------- request bodies


def parse_size(size: str | int) -> int:
    """Bytes from an int or a string like Gradio's max_file_size: '20mb', '512 kb' (1024-based)."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"a size must be an int or a string like '20mb', got {size!r}")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"a size must be >= 0 bytes, got {size!r}")
        return size
    text = size.replace(" ", "").lower()
    digits = len(text) - len(text.lstrip("0123456789"))
    unit = text[digits:] or "b"
    if not digits or unit not in SIZE_UNITS:
        raise ValueError(f"a size must be digits and one of {sorted(SIZE_UNITS)}, got {size!r}")
    return int(text[:digits]) * SIZE_UNITS[unit]


def _content_length(scope: Scope) -> int | None:
    """The declared Content-Length, or None (absent, chunked, or not a number: then counted)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _refuse(send: Send, limit: int, declared: int | None) -> None:
    """HTTP 413, plain text, and the connection closed (the rest of the body is not read)."""
    size = f"{declared} bytes" if declared is not None else f"over {limit} bytes"
    body = f"Request body too large: {size}; the limit here is {limit} bytes.\n".encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _Counted:
    """receive/send of one request: counts body bytes, answers 413 past the limit, then tells
    the app the client went away and drops what the app still sends."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self.limit = receive, send, limit
        self.total = 0
        self.over = False  # the body passed the limit
        self.refused = False  # this guard sent the 413
        self.started = False  # the app started its response

    async def receive(self) -> Message:
        if self.over:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.total += len(message.get("body", b""))
            if self.total > self.limit:
                self.over = True
                if not self.started:
                    await _refuse(self._send, self.limit, None)
                    self.refused = True
                return {"type": "http.disconnect"}
        return message

    async def send(self, message: Message) -> None:
        if self.refused:
            return  # the app's answer to the cut-off body (a 400 or a ClientDisconnect)
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class BodyLimitMiddleware:
    """ASGI middleware: HTTP 413 for a request body over `body_bytes` (`upload_bytes` for
    Gradio's upload route) — before reading it when Content-Length says so, else as soon as
    the streamed (chunked) body passes the limit. Websockets and lifespan pass through."""

    def __init__(self, app: ASGIApp, body_bytes: int = BODY_LIMIT,
                 upload_bytes: int = BODY_LIMIT, upload_path: str = UPLOAD_PATH) -> None:
        for name, value in (("body_bytes", body_bytes), ("upload_bytes", upload_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not upload_path.startswith("/"):
            raise ValueError(f"upload_path must start with '/', got {upload_path!r}")
        self.app = app
        self.body_bytes, self.upload_bytes = body_bytes, upload_bytes
        self.upload_path = upload_path.rstrip("/")

    def limit_for(self, path: str, root_path: str = "") -> int:
        """The body limit of a request path (the app's own, below a mount's root_path)."""
        if root_path and path.startswith(root_path):
            path = path[len(root_path):]
        return self.upload_bytes if path.rstrip("/") == self.upload_path else self.body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"], scope.get("root_path", ""))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, limit, declared)
            return
        counted = _Counted(receive, send, limit)
        try:
            await self.app(scope, counted.receive, counted.send)
        except ClientDisconnect:
            if not counted.over:
                raise  # a real disconnect, not this guard's


def body_limit_middleware(max_file_size: str | int, body_bytes: int = BODY_LIMIT,
                          files_per_upload: int = 1) -> Middleware:
    """BodyLimitMiddleware for FastAPI's `middleware=[...]`: `body_bytes` for every route but
    the upload, which may carry `files_per_upload` files of `max_file_size` (each with
    MULTIPART_OVERHEAD). Gradio's page sends all the files of one gr.File(file_count="multiple")
    pick in one request, so a pick larger than that in total is refused."""
    if isinstance(files_per_upload, bool) or not isinstance(files_per_upload, int) \
            or files_per_upload < 1:
        raise ValueError(f"files_per_upload must be an int >= 1, got {files_per_upload!r}")
    upload_bytes = files_per_upload * (parse_size(max_file_size) + MULTIPART_OVERHEAD)
    return Middleware(BodyLimitMiddleware, body_bytes=body_bytes, upload_bytes=upload_bytes)


def guarded_app_kwargs(max_file_size: str | int, body_bytes: int = BODY_LIMIT,
                       files_per_upload: int = 1) -> dict[str, Any]:
    """`launch(app_kwargs=...)`: a new dict each call (Gradio adds keys to the one it gets)."""
    return {"middleware": [body_limit_middleware(max_file_size, body_bytes, files_per_upload)]}


# ----------------------------------------------------------------------------- uploads


def upload_cache_ttl(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """`gr.Blocks(delete_cache=...)`: (sweep every s, remove files older than s) from
    $MMDEMO_UPLOAD_TTL (seconds, default UPLOAD_TTL_S); sweeps every min(UPLOAD_SWEEP_S, ttl).
    A file lives between ttl and ttl + sweep seconds. Also removes the outputs Gradio cached."""
    raw = (os.environ if env is None else env).get(TTL_ENV, "").strip()
    if not raw:
        ttl = UPLOAD_TTL_S
    elif raw.isdigit():
        ttl = int(raw)
    else:
        raise ValueError(f"{TTL_ENV} must be a whole number of seconds, got {raw!r}")
    if ttl < 1:  # Gradio reads an age of 0 as "never delete" (route_utils.py:1253)
        raise ValueError(f"{TTL_ENV} must be >= 1 second, got {raw!r}")
    return min(UPLOAD_SWEEP_S, ttl), ttl
