"""mmdemo.webguard against real Gradio servers on 127.0.0.1 (in this process, launched with
prevent_thread_lock): the delay after failed logins, the cap on request bodies, the expiry of
temporary uploads. Every server is stopped, every request has a timeout, every loop a deadline.
The figures go to tests/report.py (section webguard_*)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

from mmdemo import webguard  # noqa: E402
from mmdemo.webguard import (  # noqa: E402
    BodyLimitMiddleware,
    LoginThrottle,
    guarded_app_kwargs,
    parse_size,
    throttled_auth,
    upload_cache_ttl,
)
from tests.conftest import free_port  # noqa: E402
from tests.report import record  # noqa: E402

MB = 1024 * 1024  # bytes
USER, PASSWORD = "alice", "correct horse"  # the account of the login tests
MAX_FILE_SIZE = "20mb"  # as app.py's MAX_UPLOAD


# ----------------------------------------------------------------------------- helpers


def echo_demo(**blocks_kwargs):
    """gr.Blocks with one trivial endpoint, /echo (text -> the same text)."""
    import gradio as gr

    with gr.Blocks(**blocks_kwargs) as demo:
        box, out = gr.Textbox(), gr.Textbox()
        box.submit(lambda s: s, box, out, api_name="echo")
    return demo


@contextlib.contextmanager
def launched(demo, **launch_kwargs) -> Iterator[str]:
    """The demo served on a free 127.0.0.1 port; yields its URL, stops it afterwards."""
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                        quiet=True, ssr_mode=False, share=False, **launch_kwargs)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close(verbose=False)


def echo(client, text: str = "hi") -> list:
    """/echo through the REST API (POST the call, read its event stream): its output."""
    r = client.post("/gradio_api/call/echo", json={"data": [text]})
    assert r.status_code == 200, r.text
    stream = client.get(f"/gradio_api/call/echo/{r.json()['event_id']}")
    assert "event: complete" in stream.text, stream.text
    return json.loads(stream.text.split("event: complete\ndata:", 1)[1].splitlines()[0])


def vm(key: str = "VmRSS") -> float:
    """This process's resident memory (or its peak, VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(f"{key} not in /proc/self/status")


def json_body(size: int) -> Iterator[bytes]:
    """A JSON call body of about `size` bytes, streamed in 1 MB pieces (never held whole)."""
    yield b'{"data": ["'
    left = size
    while left > 0:
        piece = min(left, MB)
        left -= piece
        yield b"x" * piece
    yield b'"]}'


def post_body(url: str, size: int, chunked: bool, path: str = "/gradio_api/call/echo"):
    """POST a streamed JSON body of `size` bytes: (status, text, seconds). With chunked, no
    Content-Length (Transfer-Encoding: chunked); else Content-Length declared up front."""
    import httpx

    headers = {"content-type": "application/json"}
    if not chunked:
        headers["content-length"] = str(size + len(b'{"data": [""]}'))
    start = time.monotonic()
    with httpx.Client(timeout=30) as c:
        r = c.post(url + path, content=json_body(size), headers=headers)
    return r.status_code, r.text, time.monotonic() - start


# ----------------------------------------------------------------------------- unit


def test_parse_size():
    assert parse_size("20mb") == 20 * MB
    assert parse_size("512 KB") == 512 * 1024
    assert parse_size("7") == 7 and parse_size(9) == 9
    for bad in ("", "mb", "20 parsecs", "-1mb", "1.5mb"):
        with pytest.raises(ValueError, match="got"):
            parse_size(bad)
    with pytest.raises(TypeError):
        parse_size(2.5)  # type: ignore[arg-type]


@pytest.mark.slow  # imports gradio (~3 s the first time)
def test_parse_size_agrees_with_gradio():
    from gradio.utils import _parse_file_size

    for size in ("20mb", "1gb", "300kb", "12b"):
        assert parse_size(size) == _parse_file_size(size)


def test_upload_cache_ttl():
    assert upload_cache_ttl({}) == (600, 3600)
    assert upload_cache_ttl({"MMDEMO_UPLOAD_TTL": "2"}) == (2, 2)
    assert upload_cache_ttl({"MMDEMO_UPLOAD_TTL": " 86400 "}) == (600, 86400)
    for bad in ("0", "-5", "1h", "2.5"):
        with pytest.raises(ValueError, match=repr(bad)):
            upload_cache_ttl({"MMDEMO_UPLOAD_TTL": bad})


@pytest.mark.slow  # imports gradio (~3 s the first time)
def test_upload_path_is_gradios():
    from gradio.route_utils import API_PREFIX

    assert webguard.UPLOAD_PATH == API_PREFIX + "/upload"


def test_limit_for_routes():
    mw = BodyLimitMiddleware(lambda *a: None, body_bytes=10, upload_bytes=99)
    assert mw.limit_for("/gradio_api/upload") == 99
    assert mw.limit_for("/gradio_api/upload/") == 99
    assert mw.limit_for("/demo/gradio_api/upload", root_path="/demo") == 99
    assert mw.limit_for("/gradio_api/queue/join") == 10
    assert mw.limit_for("/login") == 10
    with pytest.raises(ValueError, match="-1"):
        BodyLimitMiddleware(lambda *a: None, body_bytes=-1)


def test_guarded_app_kwargs_fresh_and_sized():
    a, b = guarded_app_kwargs(MAX_FILE_SIZE), guarded_app_kwargs(MAX_FILE_SIZE)
    assert a is not b and a["middleware"] is not b["middleware"]
    mw = a["middleware"][0]
    assert mw.cls is BodyLimitMiddleware
    assert mw.kwargs == {"body_bytes": webguard.BODY_LIMIT,
                         "upload_bytes": 20 * MB + webguard.MULTIPART_OVERHEAD}
    many = guarded_app_kwargs("2mb", body_bytes=5, files_per_upload=3)["middleware"][0]
    assert many.kwargs == {"body_bytes": 5,
                           "upload_bytes": 3 * (2 * MB + webguard.MULTIPART_OVERHEAD)}
    with pytest.raises(ValueError, match="0"):
        guarded_app_kwargs(MAX_FILE_SIZE, files_per_upload=0)


def test_auth_is_awaited_by_gradio():
    """Gradio awaits `auth` only when inspect.iscoroutinefunction says so (routes.py:516);
    otherwise it calls it in the event loop."""
    auth = throttled_auth(USER, PASSWORD)
    assert inspect.iscoroutinefunction(auth)
    assert isinstance(auth.__self__, LoginThrottle)
    with pytest.raises(ValueError, match="''"):
        throttled_auth("", PASSWORD)
    with pytest.raises(ValueError, match="-1"):
        throttled_auth(USER, PASSWORD, delay_s=-1)


def test_throttle_delays_checks_not_the_loop():
    """Wrong logins are checked one per delay; the right one still passes; the loop runs."""
    async def scenario() -> tuple[list[bool], float, int]:
        gate = LoginThrottle(USER, PASSWORD, delay_s=0.2)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick = asyncio.create_task(ticker())
        start = time.monotonic()
        results = await asyncio.gather(gate.check(USER, "a"), gate.check(USER, "b"),
                                       gate.check(" alice ", PASSWORD), gate.check("bob", PASSWORD))
        took = time.monotonic() - start
        tick.cancel()
        return results, took, ticks

    results, took, ticks = asyncio.run(scenario())
    assert results == [False, False, True, False]
    assert 0.4 <= took < 1.0  # two failures before the right login: two delays
    assert ticks >= 20  # the event loop kept running meanwhile


def test_throttle_refuses_when_the_queue_is_full():
    from starlette.exceptions import HTTPException

    async def scenario() -> tuple[list, LoginThrottle]:
        gate = LoginThrottle(USER, PASSWORD, delay_s=0.2, max_waiting=2)
        first = await gate.check(USER, "wrong")  # opens the delay
        results = await asyncio.gather(*(gate.check(USER, "wrong") for _ in range(4)),
                                       return_exceptions=True)
        return [first, *results], gate

    results, gate = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, HTTPException)]
    assert len(refused) == 2 and all(r.status_code == 429 for r in refused)
    assert gate.checked == 3 and gate.refused == 2


# ----------------------------------------------------------------------------- logins, served


def _guess_rate(url: str, seconds: float) -> tuple[float, int]:
    """One guesser POSTing wrong passwords to /login for `seconds`: (answered/s, answered)."""
    import httpx

    n, start = 0, time.monotonic()
    with httpx.Client(timeout=10) as c:
        while time.monotonic() - start < seconds:
            r = c.post(url + "/login", data={"username": USER, "password": f"guess{n}"})
            assert r.status_code == 400, r.text
            n += 1
    return n / (time.monotonic() - start), n


@pytest.mark.slow
def test_login_unthrottled_baseline():
    """What Gradio does with auth=(user, password): no delay at all."""
    with launched(echo_demo(), auth=(USER, PASSWORD)) as url:
        rate, n = _guess_rate(url, 1.5)
    record("webguard_login_baseline", {"guesses_per_s": round(rate, 1), "guesses": n})
    assert rate > 20, rate


@pytest.mark.slow
def test_login_throttled_while_others_are_served():
    """Two guessers for 3 s: at most one wrong password per delay is checked, the page and an
    API call of a logged-in session answer at once, and the right login gets in within about
    (guessers + 1) delays."""
    import httpx

    delay = 0.5
    auth = throttled_auth(USER, PASSWORD, delay_s=delay)
    gate = auth.__self__
    stop = threading.Event()
    answered: list[int] = []

    def guesser(k: int) -> None:
        n = 0
        with httpx.Client(timeout=15) as c:
            while not stop.is_set():
                r = c.post(url + "/login", data={"username": USER, "password": f"g{k}-{n}"})
                answered.append(r.status_code)
                n += 1

    with launched(echo_demo(), auth=auth, app_kwargs=guarded_app_kwargs(MAX_FILE_SIZE)) as url:
        with httpx.Client(base_url=url, timeout=10) as session:
            assert session.post("/login", data={"username": USER,
                                                "password": PASSWORD}).status_code == 200
            checked_before = gate.checked
            threads = [threading.Thread(target=guesser, args=(k,), daemon=True) for k in (0, 1)]
            start = time.monotonic()
            for t in threads:
                t.start()
            try:
                time.sleep(0.6)  # the guessers have the gate busy
                t0 = time.monotonic()
                page = httpx.get(url + "/", timeout=5)
                page_s = time.monotonic() - t0
                t0 = time.monotonic()
                out = echo(session, "still here")
                api_s = time.monotonic() - t0
                t0 = time.monotonic()
                login = httpx.post(url + "/login", data={"username": USER, "password": PASSWORD},
                                   timeout=15)
                login_s = time.monotonic() - t0
                time.sleep(max(0.0, 3.0 - (time.monotonic() - start)))
            finally:
                stop.set()
                for t in threads:
                    t.join(15)
            elapsed = time.monotonic() - start
    wrong = gate.failed
    rate = wrong / elapsed
    record("webguard_login_throttled", {
        "delay_s": delay, "guessers": 2, "seconds": round(elapsed, 2),
        "wrong_guesses_checked": wrong, "guesses_per_s": round(rate, 2),
        "page_s": round(page_s, 3), "api_call_s": round(api_s, 3),
        "right_login_s": round(login_s, 3)})
    assert not any(t.is_alive() for t in threads)
    assert page.status_code == 200 and page_s < 1.0, page_s
    assert out == ["still here"] and api_s < 3.0, api_s
    assert login.status_code == 200 and login.json() == {"success": True}
    assert login_s < 3 * delay + 1.0, login_s
    assert set(answered) == {400}
    assert gate.checked - checked_before == wrong + 1  # every wrong answer was a real check
    assert rate <= 5 and wrong <= elapsed / delay + 2, (wrong, elapsed)


@pytest.mark.slow
def test_login_flood_of_dropped_requests():
    """Guessers that drop each request after 0.1 s (they would learn a right password from a
    fast answer) still get at most one check per delay (Gradio keeps checking a dropped login);
    past max_waiting queued logins the rest are refused (429) unchecked. Once the flood stops,
    a user retrying on 429 gets in within about max_waiting delays."""
    import httpx

    delay, max_waiting = 0.5, 4
    auth = throttled_auth(USER, PASSWORD, delay_s=delay, max_waiting=max_waiting)
    gate = auth.__self__
    stop = threading.Event()

    def flooder(k: int) -> None:
        n = 0
        with httpx.Client(timeout=0.1) as c:
            while not stop.is_set():
                with contextlib.suppress(httpx.TimeoutException):
                    c.post(url + "/login", data={"username": USER, "password": f"f{k}-{n}"})
                n += 1
                time.sleep(0.02)

    with launched(echo_demo(), auth=auth) as url:
        threads = [threading.Thread(target=flooder, args=(k,), daemon=True) for k in range(3)]
        start = time.monotonic()
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            t0 = time.monotonic()
            page = httpx.get(url + "/", timeout=5)
            page_s = time.monotonic() - t0
            time.sleep(max(0.0, 2.5 - (time.monotonic() - start)))
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        flood_s = time.monotonic() - start
        checked_in_flood = gate.checked
        t0 = time.monotonic()  # the user retries on 429 until the dropped requests drain
        tries = 0
        while True:
            login = httpx.post(url + "/login", data={"username": USER, "password": PASSWORD},
                               timeout=15)
            tries += 1
            if login.status_code != 429 or time.monotonic() - t0 > 10:
                break
            time.sleep(0.2)
        login_s = time.monotonic() - t0
    record("webguard_login_flood", {
        "delay_s": delay, "max_waiting": max_waiting, "flood_s": round(flood_s, 2),
        "checked": checked_in_flood, "refused_429": gate.refused,
        "page_s": round(page_s, 3), "right_login_after_flood_s": round(login_s, 3),
        "right_login_tries": tries})
    assert page.status_code == 200 and page_s < 1.0, page_s
    assert gate.refused > 0
    assert checked_in_flood <= flood_s / delay + 2, (checked_in_flood, flood_s)
    assert login.status_code == 200, login.text
    assert login_s < (max_waiting + 1) * delay + 1.0, login_s


# ----------------------------------------------------------------------------- bodies, served


@pytest.fixture(scope="module")
def guarded_url(tmp_path_factory) -> Iterator[str]:
    """The echo demo behind the body limit, with app.py's max_file_size (its uploads under
    pytest's temporary folder)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        with launched(echo_demo(), max_file_size=MAX_FILE_SIZE,
                      app_kwargs=guarded_app_kwargs(MAX_FILE_SIZE)) as url:
            yield url


@pytest.mark.slow
def test_big_bodies_refused(guarded_url):
    """5 MB of JSON, declared or chunked: 413 at once, with a short plain message; to the
    queue too. A normal call still works."""
    import httpx

    cases = []
    for chunked in (False, True):
        for path in ("/gradio_api/call/echo", "/gradio_api/queue/join"):
            status, text, took = post_body(guarded_url, 5 * MB, chunked, path)
            cases.append({"path": path, "chunked": chunked, "status": status,
                          "seconds": round(took, 3)})
            assert status == 413, (path, chunked, status, text[:200])
            assert text.startswith("Request body too large") and len(text) < 200, text
            assert took < 2.0, took
    with httpx.Client(base_url=guarded_url, timeout=10) as c:
        assert echo(c, "a normal call") == ["a normal call"]
    record("webguard_body_refusal", {"body_mb": 5, "cases": cases})


@pytest.mark.slow
def test_big_body_does_not_grow_the_server(guarded_url):
    """52 MB, declared and chunked: the server (this process) grows by under 100 MB."""
    figures = {}
    for chunked in (False, True):
        rss, peak = vm(), vm("VmHWM")
        status, _, took = post_body(guarded_url, 52 * MB, chunked)
        time.sleep(0.3)
        grew, peak_grew = vm() - rss, vm("VmHWM") - peak
        name = "chunked" if chunked else "declared"
        figures[name] = {"status": status, "seconds": round(took, 3),
                         "rss_growth_mb": round(grew, 1), "peak_growth_mb": round(peak_grew, 1)}
        assert status == 413
        assert grew < 100 and peak_grew < 100, figures
    record("webguard_body_memory", {"body_mb": 52, **figures})


@pytest.mark.slow
def test_uploads_still_work(guarded_url):
    """A 1 MB file and a 19 MB file upload; a request over upload_bytes (one 21 MB body, or
    three 8 MB files at files_per_upload=1) is refused with 413."""
    import httpx

    sizes = {"one.bin": MB, "nineteen.bin": 19 * MB}
    with httpx.Client(base_url=guarded_url, timeout=30) as c:
        for name, size in sizes.items():
            r = c.post("/gradio_api/upload", files={"files": (name, os.urandom(size))})
            assert r.status_code == 200, r.text[:200]
            (stored,) = r.json()
            assert Path(stored).name == name and Path(stored).stat().st_size == size
        # several files in one request, as the page sends a multi-file pick: over one file's cap
        r = c.post("/gradio_api/upload",
                   files=[("files", (f"f{i}.bin", b"\0" * 8 * MB)) for i in range(3)])
        assert r.status_code == 413 and "too large" in r.text
    status, text, _ = post_body(guarded_url, 21 * MB, False, "/gradio_api/upload")
    assert status == 413 and "too large" in text


# ----------------------------------------------------------------------------- uploads expire


@pytest.mark.slow
def test_unused_upload_expires(tmp_path, monkeypatch):
    """MMDEMO_UPLOAD_TTL=2: a file posted to /gradio_api/upload, used by no event, is on disk
    and then gone within ttl + sweep (+ slack) seconds."""
    import httpx

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("MMDEMO_UPLOAD_TTL", "2")
    sweep, ttl = upload_cache_ttl()
    assert (sweep, ttl) == (2, 2)
    with launched(echo_demo(delete_cache=(sweep, ttl))) as url:
        r = httpx.post(url + "/gradio_api/upload", files={"files": ("note.txt", b"temporary")},
                       timeout=10)
        assert r.status_code == 200, r.text
        uploaded_at = time.monotonic()
        (stored,) = r.json()
        path = Path(stored)
        assert path.is_file() and (tmp_path / "gradio") in path.parents
        deadline = uploaded_at + ttl + sweep + 5
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        gone_s = time.monotonic() - uploaded_at
        assert not path.exists(), f"{path} still there after {gone_s:.1f} s"
    record("webguard_upload_expiry", {"ttl_s": ttl, "sweep_s": sweep,
                                      "removed_after_s": round(gone_s, 2)})
    assert gone_s >= ttl - 0.5, gone_s  # not before its time
