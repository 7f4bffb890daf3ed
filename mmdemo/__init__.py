"""mmdemo serving: load an exported bundle and answer queries with ONNX Runtime. No torch here."""

from mmdemo.bundle import BundleError, read_manifest
from mmdemo.engine import Answer, CaptionHit, Engine, ImageHit

__all__ = ["Answer", "BundleError", "CaptionHit", "Engine", "ImageHit", "read_manifest"]
