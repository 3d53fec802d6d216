"""mpdp's use of a vLLM release, checked without a GPU (scripts/vllm_api_check.py says how).

The release is ``MPDP_VLLM_CHECK_VERSION`` (CI sets the newest whose torch is the CPU torch CI
installs); unset, the check is skipped, since its first run downloads the release's wheel
(about 330 MB; its unpacked Python layer is kept under ~/.cache/mpdp/vllm-check).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "vllm_api_check.py"
VERSION = os.environ.get("MPDP_VLLM_CHECK_VERSION", "").strip()


def _script():
    spec = importlib.util.spec_from_file_location("vllm_api_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)
@pytest.mark.skipif(not VERSION, reason="set MPDP_VLLM_CHECK_VERSION (e.g. 0.32.0) to check mpdp against "
                                        "that vLLM release (downloads its ~330 MB wheel once)")
def test_mpdp_fits_the_vllm_release():
    r = subprocess.run([sys.executable, str(SCRIPT), VERSION], cwd=REPO, capture_output=True, text=True,
                       timeout=880)
    if r.returncode == _script().SKIP:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-4000:]
    assert f"vllm {VERSION}: every check passed" in r.stdout


def test_no_version_is_a_skip_with_its_reason(monkeypatch):
    monkeypatch.delenv("MPDP_VLLM_CHECK_VERSION", raising=False)
    check = _script()
    assert check.main([]) == check.SKIP


def test_a_release_this_python_cannot_run_is_a_skip():
    check = _script()
    with pytest.raises(check.Skip, match=r"vllm 9.9 needs Python >=3.99; this is Python 3\."):
        check._python_fits(["Name: vllm", "Requires-Python: >=3.99"], "9.9")
    check._python_fits(["Requires-Python: >=3.8"], "0.1")
