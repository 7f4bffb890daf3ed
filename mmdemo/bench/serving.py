"""Serving figures: how long `python app.py` takes to answer its first page, and how long each
read-only endpoint takes through Gradio (one client, several at once) and in the Engine alone.

Everything binds 127.0.0.1 and runs with Gradio's and the Hub's telemetry off. No torch here.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmdemo.bench.common import md_table, summary, timed

ROOT = Path(__file__).resolve().parents[2]  # the repository root, where app.py lives
NO_PHONE_HOME = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
                 "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
START_TIMEOUT_S = 120.0  # start_app gives up after this long without a page
POLL_S = 0.05  # how often start_app asks for the page
STOP_TIMEOUT_S = 10.0  # stop_app kills what has not exited this long after terminate
LOG_DIR = Path(tempfile.gettempdir()) / "mmdemo-bench"  # app logs, unless given
SCENE = ROOT / "examples" / "scene_1.png"  # the query image of every image endpoint
TEXT = "a small red circle left of a blue square"
QUESTION = "what color is the square?"  # the classify tab's placeholder
PROMPT = "a large red circle left of a blue square"  # the draw tab's placeholder


# ----------------------------------------------------------------------------- the app process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **NO_PHONE_HOME, "PYTHONUNBUFFERED": "1", **(extra or {})}


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def stop_app(proc: subprocess.Popen) -> None:
    """Terminate the app, and kill it if it has not exited after STOP_TIMEOUT_S."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start(argv: list[str], what: str, port: int, log: Path,
           env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, float]:
    """Run argv from the repository root, output in `log`, until http://127.0.0.1:PORT/
    answers: the process and the seconds from Popen to the first HTTP 200 (asked every
    POLL_S). A process that exits first, or no page within START_TIMEOUT_S, is a RuntimeError
    with the log's tail (and the process is stopped)."""
    url = f"http://127.0.0.1:{port}/"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=ROOT, env=_env(env_extra), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return proc, time.perf_counter() - t0
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} before {url} "
                                   f"answered; log {log}:\n{_tail(log)}")
            if time.perf_counter() - t0 > START_TIMEOUT_S:
                raise RuntimeError(f"{what} did not answer {url} within {START_TIMEOUT_S:.0f} "
                                   f"s; log {log}:\n{_tail(log)}")
            time.sleep(POLL_S)
    except BaseException:
        stop_app(proc)
        raise


def start_app(bundle: Path, port: int, log: Path, env_extra: dict[str, str] | None = None
              ) -> tuple[subprocess.Popen, float]:
    """`python app.py --bundle BUNDLE --port PORT` on 127.0.0.1, as `_start` runs it: the
    process and its seconds to the first page."""
    return _start([sys.executable, "app.py", "--bundle", str(bundle), "--host", "127.0.0.1",
                   "--port", str(port)], "app.py", port, log, env_extra)


# A Gradio app with one endpoint that returns its text, queued as the app's are: what any
# endpoint costs through Gradio before it does any work (argv[1]: the port).
FLOOR_APP = """\
import sys
import gradio as gr
with gr.Blocks() as demo:
    text, out = gr.Textbox(), gr.Textbox()
    text.submit(lambda t: t, text, out, api_name="echo")
demo.queue().launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), quiet=True)
"""


# ----------------------------------------------------------------------------- cold start


def _run_s(code: str) -> float:
    """Seconds from starting a fresh `python -c CODE` to CODE done, interpreter exit left out
    (as app start leaves it out; `import gradio` then takes another ~0.3 s to exit). The child
    prints its wall clock when CODE is done."""
    t0 = time.time()  # wall clock: the same clock in both processes
    child = f"{code}\nimport time\nprint(f'DONE_AT={{time.time()}}')"
    r = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=_env(), capture_output=True,
                       text=True)
    m = re.search(r"DONE_AT=([\d.]+)", r.stdout)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"python -c {code!r} exited with {r.returncode}:\n{r.stderr[-2000:]}")
    return float(m[1]) - t0


ENGINE_LOAD = """\
import sys, time
t0 = time.perf_counter()
from mmdemo import Engine
t1 = time.perf_counter()
Engine.load(sys.argv[1])
t2 = time.perf_counter()
print(f"IMPORT_S={t1 - t0:.6f} LOAD_S={t2 - t1:.6f}")
"""


def _engine_load_s(bundle: Path) -> tuple[float, float]:
    """(import mmdemo, Engine.load) seconds, timed inside a fresh Python process."""
    r = subprocess.run([sys.executable, "-c", ENGINE_LOAD, str(bundle)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
    m = re.search(r"IMPORT_S=([\d.]+) LOAD_S=([\d.]+)", r.stdout)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"Engine.load({bundle}) in a subprocess exited with {r.returncode}:"
                           f"\n{r.stdout[-1000:]}{r.stderr[-2000:]}")
    return float(m[1]), float(m[2])


def cold_start(bundle: Path, repeats: int = 3, progress: Callable[[str], object] = print,
               log_dir: Path | None = None) -> dict:
    """Seconds to a served page, and what part of them is Python's and Gradio's, not ours.

    Each of `repeats` rounds runs, in fresh processes: `python -c "pass"`, `import gradio`,
    `import onnxruntime, hnswlib`, `Engine.load(bundle)` (timed inside the process around the
    call only), then `python app.py` until the first HTTP 200 (then stopped). Medians over the
    rounds. The first round warms the file cache for the others; the rounds interleave so that
    every figure sees the same cache.

    `ours_s` = app start - import gradio is an estimate of what mmdemo's own start costs
    (its imports, building the Blocks twice, loading the Engine, launching): it assumes the app
    spends the time of a bare `import gradio` (which includes Python's own start) importing it.
    """
    if repeats < 1:
        raise ValueError(f"repeats is {repeats}; expected at least 1")
    bundle = Path(bundle).resolve()
    log_dir = Path(log_dir) if log_dir else LOG_DIR
    runs: dict[str, list[float]] = {k: [] for k in (
        "python_s", "import_gradio_s", "import_ort_hnswlib_s", "import_mmdemo_s",
        "engine_load_s", "app_start_s")}
    for r in range(repeats):
        progress(f"cold start {r + 1}/{repeats}: python, import gradio, import onnxruntime + "
                 "hnswlib, Engine.load, app.py")
        runs["python_s"].append(_run_s("pass"))
        runs["import_gradio_s"].append(_run_s("import gradio"))
        runs["import_ort_hnswlib_s"].append(_run_s("import onnxruntime, hnswlib"))
        imp, load = _engine_load_s(bundle)
        runs["import_mmdemo_s"].append(imp)
        runs["engine_load_s"].append(load)
        proc, secs = start_app(bundle, free_port(), log_dir / f"cold-start-{r + 1}.log")
        stop_app(proc)
        runs["app_start_s"].append(secs)
    out: dict = {k: statistics.median(v) for k, v in runs.items()}
    out["ours_s"] = out["app_start_s"] - out["import_gradio_s"]
    out["repeats"] = repeats
    out["runs"] = runs  # every round's seconds, to see the spread behind each median
    out["bundle"] = str(bundle)
    return out


# ----------------------------------------------------------------------------- endpoints


def _endpoints(manifest: dict, handle_file) -> dict[str, dict]:
    """The read-only endpoints this bundle serves, each with fixed arguments: the UI's defaults
    where the UI has one. `gradio` is the predict() arguments; `engine(e)` makes a call that
    does on an Engine what app.py's handler does (read the upload with open_image, the text
    with read_text, then the Engine method(s)), without Gradio and without drawing the
    outputs (gallery captions, classify's overlay, resizing generated images)."""
    from mmdemo.preprocess import open_image

    img = handle_file(str(SCENE))

    def text(e, t):
        return e.read_text(t)[0]

    def read():
        return open_image(SCENE, name="The upload")

    eps = {
        "search_by_text": {
            "args": f"{TEXT!r}, k 12",
            "gradio": (TEXT, 12),
            "engine": lambda e: lambda: e.search_by_text(text(e, TEXT), 12)},
        "search_by_image": {
            "args": f"{SCENE.name}, k 12",
            "gradio": (img, 12),
            "engine": lambda e: lambda: e.search_by_image(read(), 12)},
        "search_captions": {
            "args": f"{SCENE.name}, k 10",
            "gradio": (img, 10),
            "engine": lambda e: lambda: e.search_captions(read(), 10)},
        "search_composed": {
            "args": f"{SCENE.name} + 'a yellow star', alpha 0.5, k 12",
            "gradio": (img, "a yellow star", 0.5, 12),
            "engine": lambda e: lambda: e.search_composed(read(), text(e, "a yellow star"),
                                                          0.5, 12)},
    }
    fusion = manifest.get("fusion")
    if fusion:
        methods = fusion["methods"]
        method = "cross_attention" if "cross_attention" in methods else fusion["default"]
        base = [m for m in ("image_only", "text_only") if m in methods]

        def classify(e):
            def call():
                i, q = read(), text(e, QUESTION)
                return [e.classify(i, q, method, 0.5)] + [e.classify(i, q, m) for m in base]
            return call

        eps["classify"] = {
            "args": f"{SCENE.name} + {QUESTION!r}, {method}, a 0.5"
                    + (f" (engine: + {', '.join(base)})" if base else ""),
            "gradio": (img, QUESTION, method, 0.5),
            "engine": classify}
    if manifest.get("captioning"):
        eps["caption"] = {
            "args": f"{SCENE.name}, beam width 3, max length 32 (UI defaults)",
            "gradio": (img, "beam", 3, 1.0, 0.9, 32, 0),
            "engine": lambda e: lambda: e.caption(read(), "beam", 3, 0.9, 1.0, 32, seed=0)}
    if manifest.get("generator"):
        eps["generate_image"] = {
            "args": f"{PROMPT!r}, 4 samples, seed 0, temperature 1 (UI defaults)",
            "gradio": (PROMPT, 4, 0, False, 1.0),
            "engine": lambda e: lambda: e.generate_image(text(e, PROMPT), 4, 0, 1.0)}
    return eps


def _gradio_run(pool: list, calls: int, args: tuple, api: str, late: Callable[[], bool]
                ) -> dict | None:
    """Each client in `pool` in its own thread makes `calls` calls (fewer once `late()`);
    p50/p95 over all calls, and calls/s when there are several clients."""
    lock = threading.Lock()
    times: list[float] = []

    def worker(c) -> None:
        for _ in range(calls):
            if late():
                return
            t = time.perf_counter()
            c.predict(*args, api_name=api)
            dt = (time.perf_counter() - t) * 1e3
            with lock:
                times.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(pool)) as ex:
        list(ex.map(worker, pool))  # list(): a worker's error is raised here
    wall = time.perf_counter() - t0
    if not times:
        return None
    s = summary(times)
    fig = {"p50_ms": s["median_ms"], "p95_ms": s["p95_ms"], "calls": s["reps"]}
    if len(pool) > 1:
        fig["throughput_per_s"] = len(times) / wall
    return fig


def _http_run(url: str, api: str, args: tuple, calls: int) -> dict:
    """One client calling Gradio's REST API directly (POST /gradio_api/call/<api>, then read
    the event stream to its end), as curl or a browser does: gradio_client polls its message
    queue every 50 ms, which this leaves out. p50/p95 over `calls` after 2 warm-up calls."""
    import httpx

    def call(client: httpx.Client) -> None:
        r = client.post(f"{url}gradio_api/call/{api}", json={"data": list(args)})
        r.raise_for_status()
        with client.stream("GET", f"{url}gradio_api/call/{api}/{r.json()['event_id']}") as s:
            event = None
            for line in s.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    if event == "error":
                        raise RuntimeError(f"/{api} answered an error: {line[5:200]}")
                    return
        raise RuntimeError(f"/{api}: the event stream ended without a result")

    with httpx.Client(timeout=60) as client:
        s = timed(lambda: call(client), warmup=2, min_reps=calls, max_reps=calls, budget_s=0)
    return {"p50_ms": s["median_ms"], "p95_ms": s["p95_ms"], "calls": s["reps"]}


def _gradio_phase(url: str, eps: dict[str, dict], calls: int, clients: tuple[int, ...],
                  result: dict, late: Callable[[str], bool],
                  progress: Callable[[str], object]) -> None:
    """endpoints()'s calls through Gradio, figures written into `result`."""
    from gradio_client import Client

    pool = [Client(url, verbose=False, download_files=False) for _ in range(max(clients))]
    for name, ep in eps.items():
        api = f"/{name}"
        for _ in range(2):
            if late(f"gradio {name} warm-up"):
                return
            pool[0].predict(*ep["gradio"], api_name=api)
        if not any(isinstance(a, dict) for a in ep["gradio"]):  # no upload: plain HTTP too
            if late(f"http {name}"):
                return
            progress(f"http {name}, 1 client x {calls} calls")
            result["endpoints"][name]["http"] = _http_run(url, name, ep["gradio"], calls)
        for n in clients:
            if late(f"gradio {name}, {n} client(s)"):
                return
            progress(f"gradio {name}, {n} client(s) x {calls} calls")
            result["endpoints"][name]["gradio"][str(n)] = _gradio_run(
                pool[:n], calls, ep["gradio"], api,
                functools.partial(late, f"gradio {name}, {n} client(s)"))


def endpoints(bundle: Path, calls: int = 20, clients: tuple[int, ...] = (1, 8),
              progress: Callable[[str], object] = print, timeout_s: float = 600.0,
              log_dir: Path | None = None) -> dict:
    """Latency of every read-only endpoint the bundle serves, through Gradio and in the Engine.

    Engine: `Engine.load(bundle)` in this process, each endpoint's handler work timed with
    `timed` (2 warm-up calls, then `calls`), before the app starts (2 cores: no competition).
    Gradio: app.py on a free 127.0.0.1 port, gradio_client Clients (download_files=False, so
    results are not fetched; uploads are sent on every call, as a browser would). For each
    count n in `clients`: n threads, each with its own Client, each making `calls` calls
    after 2 warm-up calls on one client; p50/p95 over all calls and, for n > 1, calls/s.
    `gradio_overhead_ms` = Gradio's 1-client p50 - the Engine's median. "floor": the same
    1-client figures, through gradio_client and the HTTP API, for a Gradio app (FLOOR_APP)
    whose one endpoint returns its text: what Gradio costs before any work.

    After `timeout_s` no further call is issued; `stopped_early` then says where it stopped,
    and figures cover the calls made. The app is stopped whatever happens.
    """
    for k, v in NO_PHONE_HOME.items():  # gradio_client in this process too
        os.environ.setdefault(k, v)
    from gradio_client import handle_file

    from mmdemo import Engine, read_manifest

    bundle = Path(bundle).resolve()
    log_dir = Path(log_dir) if log_dir else LOG_DIR
    deadline = time.perf_counter() + timeout_s
    eps = _endpoints(read_manifest(bundle), handle_file)
    result: dict = {"calls": calls, "clients": list(clients), "bundle": str(bundle),
                    "image": SCENE.name, "stopped_early": None, "endpoints": {}}

    late_lock = threading.Lock()

    def late(where: str) -> bool:
        if time.perf_counter() < deadline:
            return False
        with late_lock:
            if result["stopped_early"] is None:
                result["stopped_early"] = f"timeout of {timeout_s:.0f} s reached at {where}"
                progress(result["stopped_early"] + "; no further calls")
        return True

    for name, ep in eps.items():
        result["endpoints"][name] = {"args": ep["args"], "gradio": {}, "engine": None,
                                     "gradio_overhead_ms": None}

    engine = Engine.load(bundle)
    for name, ep in eps.items():
        if late(f"engine {name}"):
            break  # every later step asks late() too, and stops at once
        progress(f"engine {name}: {ep['args']}")
        s = timed(ep["engine"](engine), warmup=2, min_reps=1, max_reps=calls,
                  budget_s=max(0.0, deadline - time.perf_counter()))
        result["endpoints"][name]["engine"] = {"median_ms": s["median_ms"], "p95_ms": s["p95_ms"],
                                               "calls": s["reps"]}
    del engine

    result["port"] = result["app_start_s"] = None
    if not late("the app's start"):
        port = result["port"] = free_port()
        proc, result["app_start_s"] = start_app(bundle, port, log_dir / "endpoints.log")
        try:
            _gradio_phase(f"http://127.0.0.1:{port}/", eps, calls, clients, result, late,
                          progress)
        finally:
            stop_app(proc)
    result["floor"] = None
    if not late("the floor app's start"):
        from gradio_client import Client

        port = free_port()
        proc, _ = _start([sys.executable, "-c", FLOOR_APP, str(port)], "the floor app", port,
                         log_dir / "floor.log")
        try:
            url = f"http://127.0.0.1:{port}/"
            progress(f"floor: an endpoint that returns its text, 1 client x {calls} calls")
            client = Client(url, verbose=False, download_files=False)
            for _ in range(2):
                client.predict("hi", api_name="/echo")
            result["floor"] = {"gradio": _gradio_run([client], calls, ("hi",), "/echo",
                                                     functools.partial(late, "floor")),
                               "http": _http_run(url, "echo", ("hi",), calls),
                               "port": port}
        finally:
            stop_app(proc)
    for r in result["endpoints"].values():
        one, eng = r["gradio"].get("1"), r["engine"]
        if one and eng:
            r["gradio_overhead_ms"] = one["p50_ms"] - eng["median_ms"]
    return result


# ----------------------------------------------------------------------------- report


def table(cold: dict | None, ends: dict | None) -> str:
    """Markdown tables of cold_start() and endpoints() results (either may be None)."""
    parts = []
    if cold:
        rows = [["python app.py to first page", cold["app_start_s"]],
                ["python -c pass", cold["python_s"]],
                ["import gradio", cold["import_gradio_s"]],
                ["import onnxruntime, hnswlib", cold["import_ort_hnswlib_s"]],
                ["import mmdemo (in-process)", cold.get("import_mmdemo_s")],
                ["Engine.load (in-process)", cold["engine_load_s"]],
                ["ours (app start - import gradio, an estimate)", cold["ours_s"]]]
        parts.append(f"Cold start, median of {cold['repeats']}, seconds\n\n"
                     + md_table(["step", "s"], rows))
    if ends:
        ns = [str(n) for n in ends.get("clients", [1, 8])]
        many = [n for n in ns if n != "1"]
        headers = (["endpoint", "engine p50 ms", "engine p95 ms", "gradio p50 ms (1 client)",
                    "gradio p95 ms (1 client)", "gradio overhead ms", "HTTP p50 ms (1 client)"]
                   + [h for n in many for h in (f"p50 ms ({n} clients)", f"p95 ms ({n} clients)",
                                                f"calls/s ({n} clients)")])
        rows = []
        for name, r in ends["endpoints"].items():
            eng, g = r["engine"] or {}, r["gradio"]
            one = g.get("1") or {}
            row = [name, eng.get("median_ms"), eng.get("p95_ms"), one.get("p50_ms"),
                   one.get("p95_ms"), r["gradio_overhead_ms"], (r.get("http") or {}).get("p50_ms")]
            for n in many:
                f = g.get(n) or {}
                row += [f.get("p50_ms"), f.get("p95_ms"), f.get("throughput_per_s")]
            rows.append(row)
        floor = ends.get("floor")
        if floor:
            f = floor.get("gradio") or {}
            rows.append(["(floor: returns its text)", None, None, f.get("p50_ms"),
                         f.get("p95_ms"), None, (floor.get("http") or {}).get("p50_ms")]
                        + [None] * (3 * len(many)))
        args = "\n".join(f"- {name}: {r['args']}" for name, r in ends["endpoints"].items())
        note = f"\n\nStopped early: {ends['stopped_early']}" if ends.get("stopped_early") else ""
        parts.append(f"Endpoints, {ends['calls']} calls per client after 2 warm-up calls; "
                     "gradio: through gradio_client; HTTP: Gradio's REST API called directly "
                     "(endpoints without uploads)\n\n"
                     + md_table(headers, rows) + "\n\nArguments:\n\n" + args + note)
    return "\n\n".join(parts)

