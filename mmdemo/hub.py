"""Bundles on the Hugging Face Hub: `hf://OWNER/NAME[@REVISION]` -> a verified local folder.

A bundle is pushed as a *model* repo (`python -m export RUN BUNDLE --push-to-hub OWNER/NAME`):
it holds ONNX models and a model card with their metrics. Serving fetches it with
`huggingface_hub.snapshot_download` into a plain folder (real files, not the cache's symlinks,
which Gradio would refuse to serve as gallery images), then checks every file against the
manifest's sha256, so a damaged or tampered download is refused, naming the file.

    resolve_bundle("bundles/shapes-default")          # a plain path: returned as is
    resolve_bundle("hf://me/mmdemo-shapes")           # branch main
    resolve_bundle("hf://me/mmdemo-shapes@v1")        # a branch, tag or commit sha

Offline (HF_HUB_OFFLINE=1), a bundle downloaded before is served from its folder; one never
downloaded is an error that says so. HF_ENDPOINT and HF_TOKEN are read by huggingface_hub.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmdemo.bundle import BundleError, read_manifest

SCHEME = "hf://"
REPO_TYPE = "model"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_SPEC = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s@]+))?")


class HubError(BundleError):
    """A hf:// bundle spec that is malformed, cannot be fetched, or does not verify."""


def is_hub_spec(spec: str | Path) -> bool:
    """True for a `hf://...` string (a Path is always a local folder)."""
    return isinstance(spec, str) and spec.startswith(SCHEME)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'hf://OWNER/NAME[@REVISION]' -> (repo_id, revision or None)."""
    m = _SPEC.fullmatch(spec[len(SCHEME):]) if is_hub_spec(spec) else None
    if m is None:
        raise HubError(f"{spec!r} is not a Hub bundle; expected hf://OWNER/NAME or "
                       f"hf://OWNER/NAME@REVISION (a model repo; REVISION: branch, tag or commit)")
    return m["repo"], m["revision"]


def default_cache_dir() -> Path:
    """Where hf:// bundles are downloaded: $HF_HOME/mmdemo (~/.cache/huggingface/mmdemo)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "mmdemo"


def local_folder(spec: str, cache_dir: Path | str | None = None) -> Path:
    """The folder a hf:// bundle is downloaded to: CACHE/OWNER--NAME/REVISION."""
    repo_id, revision = parse_spec(spec)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / repo_id.replace("/", "--") / (revision or "main").replace("/", "--")


def resolve_bundle(spec: str | Path, cache_dir: Path | str | None = None,
                   endpoint: str | None = None, token: str | bool | None = None) -> Path:
    """A local bundle folder for `spec`: a path as is; a hf:// repo downloaded and verified.

    cache_dir: where downloads go (default `default_cache_dir()`); endpoint: the Hub's URL
    (default $HF_ENDPOINT or https://huggingface.co); token: default $HF_TOKEN or the saved login.
    Raises HubError (a BundleError) with a message for a malformed spec, a missing repo or
    revision, no network or offline mode without an earlier download, and a file that does not
    match the manifest.
    """
    if not is_hub_spec(spec):
        return Path(spec)
    repo_id, revision = parse_spec(spec)
    local = local_folder(spec, cache_dir)

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint or constants.ENDPOINT
    try:
        path = Path(snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision,
                                      local_dir=local, endpoint=endpoint, token=token))
    except RevisionNotFoundError:
        raise HubError(f"{spec}: the repo {repo_id} on {where} has no revision "
                       f"{revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{spec}: there is no model repo {repo_id} on {where}, or it is private "
                       f"or gated and no token with access was given (log in with `hf auth "
                       f"login` or set HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{spec}: HF_HUB_OFFLINE is set and the bundle was not downloaded "
                           f"to {local} before; unset HF_HUB_OFFLINE to download it") from None
        raise HubError(f"{spec}: cannot reach {where} and the bundle was not downloaded to "
                       f"{local} before ({error_text(e)})") from None
    except HfHubHTTPError as e:
        raise HubError(f"{spec}: the Hub at {where} answered {error_text(e)}") from None
    except OSError as e:  # a connection reset mid-file, a full disk, ...
        raise HubError(f"{spec}: the download to {local} failed: {error_text(e)}") from None
    except transport_errors() as e:  # httpx's are not OSErrors (requests' are)
        raise HubError(f"{spec}: cannot reach {where}: {error_text(e)}") from None
    try:
        read_manifest(path)
    except BundleError as e:
        raise HubError(f"{spec} was downloaded but is refused: {e}. Delete {path} to download "
                       f"it again.") from None
    return path


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's base error classes (huggingface_hub 2 uses httpx2, 1 httpx)."""
    import importlib

    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def error_text(e: BaseException) -> str:
    """An exception's message on one line, at most 300 characters."""
    text = str(e).strip() or type(e).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:300]
