"""Model identity without loading a model: names, the demo model's files, and identity comparison.

Kept free of torch/open_clip so that opening an index, checking its model and printing stats stay fast.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DEMO_MODEL = "demo"
RANDOM = "random"  # seeded random weights: plumbing tests and speed benchmarks


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: an architecture (name or OpenCLIP config .json) and where its weights are."""

    name: str = DEFAULT_MODEL
    pretrained: str | None = None  # an OpenCLIP tag, or "random"
    checkpoint: str | None = None  # a local weights file

    @classmethod
    def from_identity(cls, identity: dict[str, Any]) -> ModelSpec:
        return cls(identity["name"], identity.get("pretrained"), identity.get("checkpoint"))

    def resolved(self) -> tuple[str, str | None, str | None]:
        """(architecture name or config path, tag, checkpoint path) with the demo model and defaults filled in."""
        if self.name == DEMO_MODEL:
            config, weights = demo_files()
            return str(config), None, str(weights)
        tag = self.pretrained
        if self.checkpoint is None and tag is None and self.name == DEFAULT_MODEL:
            tag = DEFAULT_PRETRAINED
        return self.name, (None if self.checkpoint else tag), self.checkpoint

    def expected_identity(self) -> dict[str, Any]:
        """The identity an embedder loaded from this spec will report (weights hashed, not loaded)."""
        arch_ref, tag, checkpoint = self.resolved()
        arch = Path(arch_ref).stem if arch_ref.endswith(".json") else arch_ref
        sha = None
        if checkpoint is not None:
            sha = sha256_file(Path(checkpoint)) if Path(checkpoint).is_file() else "missing"
        return {
            "name": self.name,
            "arch": arch,
            "pretrained": tag,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": sha,
        }


def demo_files() -> tuple[Path, Path]:
    """(config JSON, safetensors) of the demo model shipped in the package."""
    base = resources.files("mmsearch.demo").joinpath("weights")
    return Path(str(base.joinpath("mmsearch-demo.json"))), Path(
        str(base.joinpath("mmsearch-demo.safetensors"))
    )


def sha256_file(path: Path) -> str:
    """The sha256 of a regular file's bytes. Anything else at ``path`` (a FIFO or a device put there after a
    folder was scanned: reading one never ends) is an OSError, raised without waiting for a writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        h = hashlib.sha256()
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def describe_identity(identity: dict[str, Any]) -> str:
    if identity.get("checkpoint_sha256"):
        where = (
            "the bundled demo weights"
            if identity.get("name") == DEMO_MODEL
            else f"checkpoint {identity.get('checkpoint')}"
        )
        return f"{identity['name']} ({where}, sha256 {str(identity['checkpoint_sha256'])[:12]})"
    return f"{identity['name']}/{identity.get('pretrained')}"


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two identities embed into the same space: same architecture and same weights."""
    if a.get("arch") != b.get("arch"):
        return False
    if a.get("checkpoint_sha256") or b.get("checkpoint_sha256"):
        return a.get("checkpoint_sha256") == b.get("checkpoint_sha256")
    return a.get("pretrained") == b.get("pretrained")


def model_key(identity: dict[str, Any]) -> str:
    """A short, file-name-safe key naming a model in the catalog and under ``vectors/``: equal for two
    identities :func:`same_model` calls equal (architecture and weights), different otherwise."""
    weights = identity.get("checkpoint_sha256") or identity.get("pretrained")
    basis = json.dumps([identity.get("arch") or identity.get("name"), weights])
    digest = hashlib.sha256(basis.encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", Path(str(identity.get("name") or "model")).stem).strip("-.")
    return f"{slug[:32] or 'model'}-{digest}"


def registered(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity as the catalog records it: information-only fields (the image tower used) left out."""
    return {k: v for k, v in identity.items() if k != "image_tower"}


def speech_key(settings: dict[str, Any]) -> str:
    """A key naming the speech settings a transcript was made with (backend, model, language)."""
    basis = [settings.get("backend") or "faster-whisper", settings.get("model"), settings.get("language")]
    return hashlib.sha256(json.dumps(basis).encode()).hexdigest()[:12]
