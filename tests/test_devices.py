"""Models split over two (emulated) accelerators: ``devices_cases.py``, run in a process of its own.

The emulation registers torch's PrivateUse1 backend as ``vgpu``; that cannot be
undone, and afterwards torch.accelerator and accelerate report ``vgpu`` as the
machine's accelerator, which would change what later tests in the same process
see. So the cases run in a fresh interpreter and this test reports their result.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_device_cases_in_a_fresh_process():
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "devices_cases.py")],
                         capture_output=True, text=True, cwd=HERE.parent, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]
