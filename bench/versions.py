"""The packages the GPU check needs, checked before anything runs; missing or too old ones installed
from a folder of wheels without network (``bench/gpu_check.sh --wheels DIR``).

    python -m bench.versions [--wheels DIR] [--no_device]

Prints one line naming each package's version and where it came from (the image, or the wheels),
then the CUDA device. Exits 1 when a requirement is still unmet or no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys

# name -> the oldest version accepted (None: any). triton 3.6 is the oldest the kernels were compiled
# with (bench/NOTES.md); timm 1.0.23 the oldest whose ViT the model code was checked against.
REQUIREMENTS = {"torch": None, "triton": (3, 6), "timm": (1, 0, 23), "pytest": None}


def parse_version(text: str) -> tuple[int, ...]:
    """``3.6.0+git1234`` -> (3, 6, 0): the leading dotted numbers."""
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(x) for x in match.group(0).split(".")) if match else ()


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet(requirements: dict) -> dict[str, str]:
    """``{name: why}`` for each package missing or older than required."""
    out = {}
    for name, oldest in requirements.items():
        version = installed(name)
        if version is None:
            out[name] = "missing"
        elif oldest is not None and parse_version(version) < oldest:
            out[name] = f"{version} < {'.'.join(map(str, oldest))}"
    return out


def spec(name: str, oldest) -> str:
    return name if oldest is None else f"{name}>={'.'.join(map(str, oldest))}"


def install_from_wheels(specs: list[str], wheels: str) -> int:
    """pip install ``specs`` from ``wheels`` only (``--no-index``: never the network)."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index"]
    return subprocess.run([*command, "--find-links", wheels, *specs]).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", help="folder of wheels to install missing or too old packages from (offline)")
    parser.add_argument("--no_device", action="store_true", help="skip the CUDA device check")
    args = parser.parse_args(argv)
    if args.wheels is not None and not os.path.isdir(args.wheels):
        parser.error(f"--wheels must be an existing folder, got {args.wheels!r}")

    before = unmet(REQUIREMENTS)
    if before and args.wheels:
        install_from_wheels([spec(name, REQUIREMENTS[name]) for name in before], args.wheels)
    after = unmet(REQUIREMENTS)
    parts = []
    for name in REQUIREMENTS:
        source = f"wheels {args.wheels}" if name in before and name not in after else "image"
        parts.append(f"{name} {installed(name)} ({source})" if name not in after else f"{name} {after[name]}")
    line = "versions: " + ", ".join(parts)
    if after:
        hint = "" if args.wheels else "; pass --wheels DIR to install them offline"
        print(f"{line}; UNMET: {', '.join(after)}{hint}", flush=True)
        return 1
    print(line, flush=True)
    if args.no_device:
        return 0
    import torch

    if not torch.cuda.is_available():
        print("device: no CUDA device visible", flush=True)
        return 1
    print(f"device: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
