"""What `make` runs, read with `make -n` (nothing is executed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _dry_run(*args: str) -> str:
    return subprocess.run(["make", "-n", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60, check=True).stdout


def test_make_airflow_takes_a_port() -> None:
    assert "-m infra.airflow_standalone --port 8081" in _dry_run("airflow", "PORT=8081")
    assert "--port" not in _dry_run("airflow")


def test_setup_prints_one_line_per_phase_not_pips_output() -> None:
    out = _dry_run("-B", ".venv/.installed")  # -B: as on a fresh clone
    phases = [ln for ln in out.splitlines() if ln.startswith('echo "[setup')]
    assert [p.split("]")[0] for p in phases] == [
        'echo "[setup 1/4', 'echo "[setup 2/4', 'echo "[setup 3/4', 'echo "[setup 4/4',
        'echo "[setup']
    install = next(ln for ln in out.splitlines() if "-e ./clients/python" in ln)
    assert " -q " not in install and "awk" in install  # progress lines, not silence
