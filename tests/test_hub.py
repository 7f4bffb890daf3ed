"""Share and host: `push_bundle` / `--push-to-hub` and `resolve_bundle` / `app.py --bundle hf://`
through huggingface_hub's own client code, against a local stand-in for the Hub.

huggingface_hub has no local-file backend, so `FakeHub` is a small HTTP server on 127.0.0.1
that answers the routes its client calls for create_repo, create_branch, upload_folder (preupload,
commit, validate-yaml, tree listing) and snapshot_download (repo info, tree, HEAD/GET resolve),
backed by a temporary directory. Every file is uploaded inline ("regular" mode), so the LFS/Xet
transfer that the real Hub uses for large files is the one part not exercised here. Nothing
leaves 127.0.0.1; the server stops with its fixture and, at the latest, after 10 minutes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from mmdemo.bundle import MANIFEST, read_manifest
from mmdemo.hub import HubError, local_folder, parse_spec, resolve_bundle
from tests.conftest import copy_bundle, serve_app

TOKEN = "hf_local_test_token"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The Hub's HTTP API, as far as huggingface_hub's upload and download code uses it.

    Model repos only. Repos, branches and commits live in memory; file contents in `root`,
    addressed by sha256. Writes need `Authorization: Bearer TOKEN`; private repos are invisible
    without it (404 RepoNotFound, as on the Hub). `unknown` lists requests it could not answer.
    """

    def __init__(self, root: Path, lifetime_s: float = 600):
        self.root = root
        self.repos: dict[str, dict] = {}
        self.log: list[tuple[str, str]] = []
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 30  # a client that stops mid-request does not hold a thread for ever

            def do_GET(self):
                hub.handle(self, "GET")

            def do_HEAD(self):
                hub.handle(self, "HEAD")

            def do_POST(self):
                hub.handle(self, "POST")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime_s, self.server.shutdown)
        self.timer.daemon = True

    def __enter__(self) -> FakeHub:
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    # ------------------------------------------------------------------------- storage

    def put_blob(self, data: bytes) -> dict:
        sha = hashlib.sha256(data).hexdigest()
        (self.root / sha).write_bytes(data)
        return {"blob": sha, "size": len(data), "oid": git_oid(data)}

    def new_commit(self, repo: dict, parent: str | None, tree: dict, message: str) -> str:
        sha = hashlib.sha1(json.dumps([parent, sorted(tree.items()), message, time.time_ns()],
                                      default=str).encode()).hexdigest()
        repo["commits"][sha] = {"tree": tree, "message": message, "parent": parent}
        return sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The repo's files at a revision (for assertions)."""
        repo = self.repos[repo_id]
        tree = repo["commits"][repo["refs"].get(revision, revision)]["tree"]
        return {p: (self.root / f["blob"]).read_bytes() for p, f in tree.items()}

    def messages(self, repo_id: str) -> list[str]:
        """Commit messages on main, newest first."""
        repo, out = self.repos[repo_id], []
        sha = repo["refs"]["main"]
        while sha is not None:
            out.append(repo["commits"][sha]["message"])
            sha = repo["commits"][sha]["parent"]
        return out

    def corrupt(self, repo_id: str, path: str) -> None:
        """Flip a byte of a stored file, as a broken disk or transfer would."""
        blob = self.root / self.repos[repo_id]["commits"][self.repos[repo_id]["refs"]["main"]][
            "tree"][path]["blob"]
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))

    # ------------------------------------------------------------------------- HTTP

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path, query = url.path, parse_qs(url.query)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else b""
        authed = h.headers.get("Authorization") == f"Bearer {TOKEN}"
        with self.lock:
            self.log.append((method, path))
            try:
                status, headers, payload = self.route(method, path, query, body, authed)
            except KeyError as e:  # a missing field in a request: the client's fault
                status, headers, payload = 400, {}, {"error": f"bad request: {e}"}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        if not isinstance(payload, bytes):
            h.send_header("Content-Type", "application/json")
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(data)

    def route(self, method, path, query, body, authed):
        def error(status, code, message):
            return status, {"X-Error-Code": code, "X-Error-Message": message}, {"error": message}

        if method == "POST" and path == "/api/repos/create":
            if not authed:
                return 401, {"X-Error-Message": "Invalid username or password."}, {
                    "error": "Invalid username or password."}
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}"
            if req.get("type", "model") != "model":
                return 400, {}, {"error": "this stand-in holds model repos only"}
            if repo_id in self.repos:
                return 409, {}, {"error": "You already created this model repo",
                                 "url": f"{self.url}/{repo_id}"}
            repo = {"private": req.get("visibility") == "private" or bool(req.get("private")),
                    "refs": {}, "commits": {}}
            attrs = self.put_blob(b"*.onnx filter=lfs diff=lfs merge=lfs -text\n")
            repo["refs"]["main"] = self.new_commit(repo, None, {".gitattributes": attrs},
                                                   "initial commit")
            self.repos[repo_id] = repo
            return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id}

        if method == "POST" and path == "/api/validate-yaml":
            import yaml

            text = json.loads(body)["content"]
            m = re.match(r"---\n(.*?)\n---\n", text, re.S)
            try:
                meta = yaml.safe_load(m[1]) if m else None
            except yaml.YAMLError as e:
                return 400, {}, {"errors": [{"message": str(e)}]}
            warnings = [] if isinstance(meta, dict) else [{"message": "empty or missing yaml"}]
            return 200, {}, {"errors": [], "warnings": warnings}

        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree|preupload|commit|branch)"
                         r"/([^/]+)(/.*)?)?", path)
        r = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo_id = (m or r)[1] if (m or r) else None
        repo = self.repos.get(repo_id) if repo_id else None
        if repo_id and (repo is None or (repo["private"] and not authed)):
            return error(404, "RepoNotFound", "Repository not found")
        if m:
            kind, rev = m[2], unquote(m[3] or "main")
            if kind == "branch" and method == "POST":
                if not authed:
                    return 403, {}, {"error": "no write access"}
                if rev in repo["refs"]:
                    return 409, {}, {"error": "Reference already exists"}
                start = (json.loads(body) if body else {}).get("startingPoint") or "main"
                repo["refs"][rev] = repo["refs"].get(start, start)
                return 200, {}, {}
            sha = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
            if sha is None:
                return error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            tree = repo["commits"][sha]["tree"]
            if kind in (None, "revision") and method == "GET":
                return 200, {}, {"id": repo_id, "modelId": repo_id, "sha": sha,
                                 "private": repo["private"],
                                 "siblings": [{"rfilename": p} for p in sorted(tree)]}
            if kind == "tree" and method == "GET":
                return 200, {}, self.tree(tree, (m[4] or "/")[1:],
                                          query.get("recursive", ["false"])[0].lower() == "true")
            if kind == "preupload" and method == "POST":
                if not authed:
                    return 403, {}, {"error": "no write access"}
                return 200, {}, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": tree[f["path"]]["oid"] if f["path"] in tree else None}
                    for f in json.loads(body)["files"]]}
            if kind == "commit" and method == "POST":
                if not authed:
                    return 403, {}, {"error": "no write access"}
                return self.commit(repo_id, repo, rev, sha, body)
        if r and method in ("GET", "HEAD"):
            rev, file = unquote(r[2]), unquote(r[3])
            sha = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
            if sha is None:
                return error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            entry = repo["commits"][sha]["tree"].get(file)
            if entry is None:
                return error(404, "EntryNotFound", f"{file} does not exist at {rev}")
            data = (self.root / entry["blob"]).read_bytes()
            return 200, {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"',
                         "Content-Type": "application/octet-stream"}, data
        self.unknown.append(f"{method} {path}")
        return 404, {}, {"error": f"this stand-in does not answer {method} {path}"}

    @staticmethod
    def tree(tree: dict, prefix: str, recursive: bool) -> list[dict]:
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        entries, folders = [], set()
        for p in sorted(tree):
            if not p.startswith(base):
                continue
            parts = p[len(base):].split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(base + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                f = tree[p]
                entries.append({"type": "file", "path": p, "size": f["size"], "oid": f["oid"]})
        entries += [{"type": "directory", "path": d, "oid": git_oid(d.encode())}
                    for d in sorted(folders)]
        return entries

    def commit(self, repo_id: str, repo: dict, rev: str, sha: str, body: bytes):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        parent = header.get("parentCommit")
        if parent and parent != sha:
            return 412, {}, {"error": "A commit has happened since. Please refresh and try again."}
        tree = dict(repo["commits"][sha]["tree"])
        for op in lines:
            key, value = op["key"], op["value"]
            if key == "file":
                tree[value["path"]] = self.put_blob(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    return 404, {"X-Error-Code": "EntryNotFound"}, {
                        "error": "A file with this name doesn't exist"}
            elif key == "deletedFolder":
                for p in [p for p in tree if p.startswith(value["path"].rstrip("/") + "/")]:
                    del tree[p]
            elif key != "header":  # lfsFile: never asked for, every preupload said "regular"
                return 400, {}, {"error": f"this stand-in does not accept {key}"}
        message = header["summary"] + ("\n\n" + header["description"]
                                       if header.get("description") else "")
        new = self.new_commit(repo, sha, tree, message)
        repo["refs"][rev] = new
        return 200, {}, {"commitUrl": f"{self.url}/{repo_id}/commit/{new}", "commitOid": new,
                         "success": True, "pullRequestUrl": None}


# ----------------------------------------------------------------------------- fixtures


def _loopback_only(request) -> None:
    if request.url.host not in ("127.0.0.1", "localhost"):
        raise AssertionError(f"a test tried to reach {request.url}")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A FakeHub, with huggingface_hub online (conftest sets HF_HUB_OFFLINE=1 for the session)
    and pointed at it as if HF_ENDPOINT named it; its HTTP client refuses any other host."""
    from huggingface_hub import close_session, constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def client():
        c = default_client_factory()
        c.event_hooks["request"].append(_loopback_only)
        return c

    (tmp_path / "hub").mkdir()
    with FakeHub(tmp_path / "hub") as h:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", h.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            h.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        set_client_factory(client)
        try:
            yield h
        finally:
            set_client_factory(default_client_factory)
            close_session()
    assert not h.unknown, f"requests the stand-in could not answer: {h.unknown}"


def _search(engine, text="a red circle", k=5) -> list[tuple[int, float]]:
    return [(h.id, round(h.score, 5)) for h in engine.search_by_text(text, k)]


# ----------------------------------------------------------------------------- specs


def test_parse_spec():
    assert parse_spec("hf://alice/shapes") == ("alice/shapes", None)
    assert parse_spec("hf://alice/shapes-v1.2@v1") == ("alice/shapes-v1.2", "v1")
    assert parse_spec("hf://org/x@refs/pr/3") == ("org/x", "refs/pr/3")
    for bad in ("hf://alice", "hf://alice/shapes/extra", "hf://a/b@", "hf:/alice/shapes",
                "hf://alice/sha pes", "hf://-alice/shapes", "alice/shapes"):
        with pytest.raises(HubError, match="expected hf://OWNER/NAME"):
            parse_spec(bad)
    assert resolve_bundle(Path("bundles/x")) == Path("bundles/x")  # a path: as is
    assert resolve_bundle("bundles/x") == Path("bundles/x")
    assert local_folder("hf://o/n@refs/pr/3", "/c") == Path("/c/o--n/refs--pr--3")


def test_clear_errors_without_a_bundle(tmp_path, hub, monkeypatch):
    """A missing repo, a missing revision, no Hub to reach, and offline with nothing cached: a
    HubError each, with a message that says which."""
    with pytest.raises(HubError, match="no model repo alice/nothing"):
        resolve_bundle("hf://alice/nothing", tmp_path / "c", endpoint=hub.url)
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.url, token=TOKEN).create_repo("alice/empty")
    with pytest.raises(HubError, match="has no revision 'v9'"):
        resolve_bundle("hf://alice/empty@v9", tmp_path / "c", endpoint=hub.url)
    with pytest.raises(HubError, match="manifest.json is missing"):  # a repo but no bundle
        resolve_bundle("hf://alice/empty", tmp_path / "c", endpoint=hub.url)
    closed = FakeHub(tmp_path / "hub")  # bound, never started: nothing answers
    closed.server.server_close()
    with pytest.raises(HubError, match="cannot reach http://127.0.0.1"):
        resolve_bundle("hf://alice/empty", tmp_path / "d", endpoint=closed.url)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and the bundle was not downloaded"):
        resolve_bundle("hf://alice/empty", tmp_path / "e", endpoint=hub.url)


# ----------------------------------------------------------------------------- push and serve


@pytest.mark.slow
def test_push_then_serve(tiny_bundle, tmp_path, hub, monkeypatch):
    """A real bundle pushed with push_bundle comes back through resolve_bundle byte for byte and
    answers queries exactly as the original; an unchanged re-push makes no commit; a changed
    bundle's push removes the repo's stale files and the next resolve follows it; a pinned
    revision still serves the first push; offline, the downloaded folder is served."""
    from export.hub import push_bundle
    from mmdemo import Engine, store

    manifest = read_manifest(tiny_bundle)
    url = push_bundle(tiny_bundle, "alice/shapes", token=TOKEN, endpoint=hub.url)
    first = url.rsplit("/", 1)[1]
    assert url.startswith(f"{hub.url}/alice/shapes/commit/")
    files = hub.files("alice/shapes")
    assert set(files) == {*manifest["files"], MANIFEST, "README.md", ".gitattributes"}
    for rel, want in manifest["files"].items():
        assert hashlib.sha256(files[rel]).hexdigest() == want, rel
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: onnx\n") and "hf://alice/shapes" in card
    t2i = manifest["metrics"]["bundle"]["t2i_R@1"]
    assert f"| t2i_R@1 | {t2i:.4f} |" in card and "Fused classification" in card
    title = hub.messages("alice/shapes")[0]
    assert title.startswith(f"mmdemo bundle {manifest['name']}: t2i_R@1 {t2i:.3f}"), title

    cache = tmp_path / "cache"
    got = resolve_bundle("hf://alice/shapes", cache, endpoint=hub.url)
    assert got == local_folder("hf://alice/shapes", cache)
    assert read_manifest(got) == manifest
    original = Engine.load(tiny_bundle)
    served = Engine.load(got)
    assert _search(served) == _search(original)
    image = original.gallery_image(min(original.gallery))
    assert [(h.id, round(h.score, 5)) for h in served.search_captions(image, 3)] == \
        [(h.id, round(h.score, 5)) for h in original.search_captions(image, 3)]

    n_commits = len(hub.messages("alice/shapes"))
    push_bundle(tiny_bundle, "alice/shapes", token=TOKEN, endpoint=hub.url)
    assert len(hub.messages("alice/shapes")) == n_commits, "an unchanged push made a commit"

    changed = copy_bundle(tiny_bundle, tmp_path / "changed")
    engine = Engine.load(changed)
    uploads, skipped = store.collect([Path(__file__).parents[1] / "examples" / "scene_1.png"])
    assert uploads and not skipped
    store.add(engine, uploads)
    new_manifest = read_manifest(changed)
    assert new_manifest["gallery"]["file"] != manifest["gallery"]["file"]
    push_bundle(changed, "alice/shapes", token=TOKEN, endpoint=hub.url)
    assert set(hub.files("alice/shapes")) == {*new_manifest["files"], MANIFEST, "README.md",
                                              ".gitattributes"}  # the old gallery.json is gone
    again = resolve_bundle("hf://alice/shapes", cache, endpoint=hub.url)
    assert read_manifest(again) == new_manifest
    assert len(Engine.load(again).gallery) == len(original.gallery) + 1

    pinned = resolve_bundle(f"hf://alice/shapes@{first}", cache, endpoint=hub.url)
    assert pinned != again and read_manifest(pinned) == manifest

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert read_manifest(resolve_bundle("hf://alice/shapes", cache, endpoint=hub.url)) == \
        new_manifest


@pytest.mark.slow
def test_corrupted_download_is_refused(tiny_bundle, tmp_path, hub):
    from export.hub import push_bundle

    push_bundle(tiny_bundle, "alice/shapes", token=TOKEN, endpoint=hub.url)
    hub.corrupt("alice/shapes", "index_images.bin")
    with pytest.raises(HubError, match=r"refused: .*index_images.bin has sha256") as e:
        resolve_bundle("hf://alice/shapes", tmp_path / "cache", endpoint=hub.url)
    assert "Delete " in str(e.value)


@pytest.mark.slow
def test_push_refuses_a_damaged_bundle_and_a_bad_token(tiny_bundle, tmp_path, hub):
    from export.hub import PushError, push_bundle
    from mmdemo.bundle import BundleError

    damaged = copy_bundle(tiny_bundle, tmp_path / "damaged")
    (damaged / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match="tokenizer.json has sha256"):
        push_bundle(damaged, "alice/shapes", token=TOKEN, endpoint=hub.url)
    assert not hub.log, "a damaged bundle reached the Hub"
    with pytest.raises(PushError, match="refused the push.*hf auth login"):
        push_bundle(tiny_bundle, "alice/shapes", token="hf_wrong", endpoint=hub.url)
    with pytest.raises(ValueError, match="expected OWNER/NAME"):
        push_bundle(tiny_bundle, "shapes", token=TOKEN, endpoint=hub.url)


@pytest.mark.slow
def test_private_branch_push_and_cli(tiny_run, tiny_fusion, tiny_bundle, tmp_path, hub,
                                     monkeypatch, capsys):
    """`python -m export RUN OUT --push-to-hub OWNER/NAME@BRANCH --private` (token from
    $HF_TOKEN, Hub from $HF_ENDPOINT, as huggingface_hub reads them); the private repo is hidden
    without the token and served with it."""
    from export.__main__ import main

    with pytest.raises(SystemExit):
        main([str(tiny_run), str(tmp_path / "x"), "--push-to-hub", "no-owner"])
    assert "expected OWNER/NAME" in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "a bad repo id should fail before the export"

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = main([str(tiny_run), str(tmp_path / "out"), "--fusion", str(tiny_fusion),
                "--push-to-hub", "bob/private@exp", "--private"])
    assert "pushed" in capsys.readouterr().out
    assert hub.repos["bob/private"]["private"]
    assert read_manifest(out)["files"].keys() <= hub.files("bob/private", "exp").keys()
    assert set(hub.files("bob/private", "main")) == {".gitattributes"}

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no model repo bob/private"):
        resolve_bundle("hf://bob/private@exp", tmp_path / "c", endpoint=hub.url, token=False)
    got = resolve_bundle("hf://bob/private@exp", tmp_path / "c", endpoint=hub.url, token=TOKEN)
    assert got.name == "exp" and read_manifest(got)["name"] == "out"


@pytest.mark.slow
def test_app_serves_a_hub_bundle(tiny_bundle, tmp_path, hub):
    """python app.py --bundle hf://OWNER/NAME, in a subprocess without torch, with $HF_ENDPOINT
    at the stand-in: downloads, verifies, serves; a wrong repo is a one-line error."""
    import subprocess
    import sys

    from gradio_client import Client

    from export.hub import push_bundle
    from tests.conftest import ROOT, torch_blocked_env

    push_bundle(tiny_bundle, "alice/shapes", token=TOKEN, endpoint=hub.url)
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    with serve_app("hf://alice/shapes", tmp_path, env=env) as (url, log, _):
        folder = tmp_path / "hf" / "mmdemo" / "alice--shapes" / "main"
        assert f"serving {folder}" in log.read_text()
        gallery = Client(url, verbose=False).predict("a red circle", 3,
                                                     api_name="/search_by_text")
        assert len(gallery) == 3
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--bundle", "hf://alice/none"],
                         env={**torch_blocked_env(tmp_path / "block"), **env,
                              "GRADIO_ANALYTICS_ENABLED": "False"},
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and "no model repo alice/none" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr

