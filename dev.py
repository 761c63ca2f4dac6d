#!/usr/bin/env python3
"""Set up the project's virtual environment (idempotent) and run a command in it.

    python3 dev.py demo [ARGS...]   # set up, then `semiseg demo ARGS...`
    python3 dev.py test [ARGS...]   # set up with test extras, then `pytest -n auto ARGS...`
    python3 dev.py setup            # set up only

The environment lives in `.venv/` next to this file and is reused: packages are installed only
when `pyproject.toml` changed since the last successful install (a stamp file records its hash).
Only packages are downloaded; no weights or datasets.
"""
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
# torch/torchvision pairs known to import together on the CPU here (see docs/install.md).
TORCH_PINS = {"x86_64": ["torch==2.14.1", "torchvision==0.29.1"], "aarch64": ["torch==2.9.1", "torchvision==0.24.1"]}


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def setup(extras: str) -> None:
    if not (BIN / "python").exists():
        _run([sys.executable, "-m", "venv", str(VENV)])
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".semiseg-installed-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
    pins = TORCH_PINS.get(platform.machine(), [])
    if pins and subprocess.run([str(BIN / "python"), "-c", "import torchvision"], capture_output=True).returncode:
        _run(pip + pins)
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    _run(pip + ["-e", target])
    stamp.write_text(digest)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    command, args = sys.argv[1], sys.argv[2:]
    setup("test" if command == "test" else "")
    if command == "demo":
        return subprocess.call([str(BIN / "semiseg"), "demo", *args])
    if command == "test":
        return subprocess.call([str(BIN / "python"), "-m", "pytest", "-n", "auto", *args], cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
