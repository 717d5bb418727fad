"""Kill a `fast-steer` run with SIGKILL as soon as it has written its first checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def kill_after_first_checkpoint(args: list[str], out: Path, timeout: float = 240) -> int:
    """Run `python -m apps ARGS` (single-threaded), SIGKILL it once `out` holds a checkpoint; its step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "apps", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    latest = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + timeout
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "train_summary.json").exists(), "killed before it finished"
    return json.loads(latest.read_text())["step"]
