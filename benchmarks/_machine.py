"""Machine facts every benchmark records beside its figures (scripts run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_flags() -> list[str]:
    """The CPU's vector-instruction flags (AVX, AVX-512, VNNI, AMX): what int8 and fp32 speed depend on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return [
                    x for x in line.split(":", 1)[1].split() if x.startswith(("avx", "amx")) or "vnni" in x
                ]
    except OSError:
        pass
    return []


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed distribution versions; None for a package that is not installed."""
    versions: dict[str, str | None] = {}
    for pkg in packages:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions
