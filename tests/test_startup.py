"""Start-up: what a run loads before it trains."""

import subprocess
import sys
from pathlib import Path

LOAD_AND_USE_SCIPY_SIGNAL = """
import sys
import echo.train  # Lightning, and torchmetrics with it
stand_in = sys.modules["scipy.signal"]
print(type(stand_in).__name__, "scipy.signal._signal_api" in sys.modules)
import scipy.signal
from scipy.signal import butter
print(callable(butter), scipy.signal.hamming(4).round(2).tolist(), scipy.signal.windows.hann(3).tolist())
real = sys.modules["scipy.signal"]
print(real is scipy.signal and real is not stand_in, stand_in.butter is real.butter is butter)
"""


def test_lightning_loads_without_scipy_signal_which_loads_when_used():
    """torchmetrics imports scipy.signal (about a second) and echo never uses it: it stays
    unloaded until something reads from it, and then works as the real module, through every
    reference to it (torchmetrics' `scipy.signal.hamming` included)."""
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_USE_SCIPY_SIGNAL],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stdout.splitlines()
    assert lines == ["Deferred False", "True [0.08, 0.77, 0.77, 0.08] [0.0, 1.0, 0.0]", "True True"], result.stderr
