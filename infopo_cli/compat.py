"""The library versions infopo is tested with, as data: `infopo doctor` compares the installed ones against them.

Each entry is (lowest, highest) tested. A bound is compared at its own precision: "5.25" covers every 5.25.x,
"5.25.0" only 5.25.0 (and its local builds, such as torch's 2.13.0+cpu).
"""

from __future__ import annotations

from packaging.version import Version

TESTED: dict[str, tuple[str, str]] = {
    "torch": ("2.11", "2.13.0"),
    "transformers": ("5.6", "5.25.0"),
    "peft": ("0.21", "0.22.0"),
    "bitsandbytes": ("0.48", "0.50.2"),
    "datasets": ("3.0", "5.2.0"),
    "unsloth": ("2026.10.9", "2026.10.9"),
}

BELOW, NEWER, OK = "below the tested range", "newer than tested", "tested"


def verdict(package: str, installed: str) -> str:
    """BELOW, NEWER or OK for `installed` (a version string) of a package in TESTED."""
    low, high = TESTED[package]
    release = Version(installed).release
    if release < Version(low).release:
        return BELOW
    top = Version(high).release
    return NEWER if release[:len(top)] > top else OK


def tested_range(package: str) -> str:
    """The tested versions of `package` as text: one version, or "LOW to HIGH"."""
    low, high = TESTED[package]
    return low if low == high else f"{low} to {high}"
