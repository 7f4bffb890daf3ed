"""Push a bundle to the Hugging Face Hub as a model repo, with a model card of its metrics.

    push_bundle("bundles/shapes-default", "me/mmdemo-shapes")   # then: python app.py --bundle
                                                                #   hf://me/mmdemo-shapes

The repo mirrors the bundle: exactly the files its manifest lists (plus README.md, the card);
files left from an earlier push are deleted in the same commit. The token comes from `token`,
$HF_TOKEN or `hf auth login`; the Hub from `endpoint` or $HF_ENDPOINT.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mmdemo.bundle import MANIFEST, read_manifest
from mmdemo.hub import REPO_TYPE, SCHEME, HubError, error_text, parse_spec, transport_errors

HEADLINE = ("t2i_R@1", "i2t_R@1", "rsum")  # metrics named in the commit message


class PushError(RuntimeError):
    """The Hub refused the push or could not be reached."""


def push_bundle(bundle_dir: Path | str, repo_id: str, private: bool = False,
                token: str | None = None, revision: str | None = None,
                endpoint: str | None = None) -> str:
    """Upload a verified bundle to the model repo `repo_id` (created if missing); returns the
    commit's URL.

    revision: a branch to push to (created from main if missing; default main). Raises
    BundleError when the bundle does not verify (nothing is uploaded), ValueError for a bad
    repo id, PushError when the Hub refuses or cannot be reached.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)  # every hash, before anything leaves the machine
    try:
        repo_id, at = parse_spec(SCHEME + repo_id.removeprefix(SCHEME))
    except HubError as e:
        raise ValueError(f"repo id {repo_id!r}: expected OWNER/NAME or OWNER/NAME@BRANCH") from e
    revision = revision or at

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    title, description = commit_message(manifest)
    with tempfile.TemporaryDirectory(prefix="mmdemo-push-") as tmp:
        stage = Path(tmp)
        for rel in [*manifest["files"], MANIFEST]:
            _link(bundle_dir / rel, stage / rel)
        (stage / "README.md").write_text(model_card(manifest, repo_id), encoding="utf-8")
        try:
            api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, repo_type=REPO_TYPE, branch=revision, exist_ok=True)
            info = api.upload_folder(folder_path=stage, repo_id=repo_id, repo_type=REPO_TYPE,
                                     revision=revision, commit_message=title,
                                     commit_description=description, delete_patterns="*")
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            hint = (" (log in with `hf auth login`, set HF_TOKEN, or pass a token with write "
                    "access)" if status in (401, 403) else "")
            raise PushError(f"the Hub at {api.endpoint} refused the push to {repo_id}: "
                            f"{error_text(e)}{hint}") from None
        except (OSError, *transport_errors()) as e:
            raise PushError(f"cannot push to {repo_id} on {api.endpoint}: "
                            f"{error_text(e)}") from None
    return str(info.commit_url)


def commit_message(manifest: dict) -> tuple[str, str]:
    """(title, description): the bundle's name and headline metrics, then all of them."""
    metrics = manifest.get("metrics", {})
    scores = metrics.get("bundle", {})
    head = ", ".join(f"{k} {scores[k]:.3f}" for k in HEADLINE if isinstance(scores.get(k), float))
    title = f"mmdemo bundle {manifest.get('name', '?')}" + (f": {head}" if head else "")
    lines = [f"{k}: {v:.4f}" for k, v in scores.items() if isinstance(v, float)]
    fusion = metrics.get("fusion")
    if fusion:
        score = fusion["score"]
        lines += [f"fusion {name} {score}: {r[score]:.4f}" for name, r in fusion["methods"].items()
                  if isinstance(r.get(score), float)]
    split = metrics.get("split", "?")
    return title, f"Metrics on the {split} split (ONNX Runtime + hnswlib):\n" + "\n".join(lines)


def model_card(manifest: dict, repo_id: str) -> str:
    """README.md for the repo: Hub front matter, what the bundle is, its metrics, how to serve."""
    mc, gal = manifest.get("model_config", {}), manifest.get("gallery", {})
    metrics = manifest.get("metrics", {})
    split = metrics.get("split", "?")
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.get("bundle", {}).items()
                     if isinstance(v, float))
    card = f"""---
library_name: onnx
tags:
- mmdemo
- onnx
- multimodal
- image-text-retrieval
- hnswlib
---

# mmdemo bundle `{manifest.get("name", "?")}`

A joint image-text space exported to ONNX with its gallery and hnswlib indexes, served by
mmdemo's Gradio app with ONNX Runtime (no torch needed):

```bash
python app.py --bundle hf://{repo_id}
```

- Image encoder: {mc.get("image_encoder", "?")} ({mc.get("image_size", "?")} px); text encoder:
  {mc.get("text_encoder", "?")}; joint space d = {mc.get("embed_dim", "?")}
- Gallery: {gal.get("count", "?")} images, {gal.get("captions", "?")} captions
  ({gal.get("split", "?")} split); {manifest.get("trained_epochs", "?")} training epochs
- `manifest.json` holds the preprocessing, tokenizer settings, configs, package versions and the
  sha256 of every file; the app checks them all before it serves the bundle.

## Retrieval on the {split} split (ONNX Runtime + hnswlib)

| metric | value |
|---|---|
{rows}
"""
    fusion = metrics.get("fusion")
    if fusion:
        score = fusion["score"]
        card += (f"\n## Fused classification on the {split} split (best: {fusion['best']})\n\n"
                 f"| method | {score} |\n|---|---|\n"
                 + "".join(f"| {name} | {r[score]:.4f} |\n"
                           for name, r in fusion["methods"].items()
                           if isinstance(r.get(score), float)))
    return card


def _link(src: Path, dst: Path) -> None:
    """dst names src's content (a symlink; a copy where symlinks are not allowed)."""
    if not src.is_file():
        raise FileNotFoundError(f"{src} is listed in the manifest but missing")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)

