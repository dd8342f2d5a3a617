"""Start-up: what a run loads before it trains."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each starts Python processes that import torch and Lightning

IMPORT_THEN_USE = """
import sys
from echo.compat import defer_unused_imports
defer_unused_imports()  # as run.py does
import echo.train  # Lightning, and torchmetrics with it
stand_in = sys.modules["scipy.signal"]
print(type(stand_in).__name__, "scipy.signal._signal_api" in sys.modules, "matplotlib" in sys.modules)
import scipy.signal
from scipy.signal import butter
print(callable(butter), scipy.signal.hamming(4).round(2).tolist(), scipy.signal.windows.hann(3).tolist())
real = sys.modules["scipy.signal"]
print(real is scipy.signal and real is not stand_in, stand_in.butter is real.butter is butter)
import matplotlib.pyplot, torchmetrics.utilities.imports as flags
print(callable(matplotlib.pyplot.subplots), bool(flags._MATPLOTLIB_AVAILABLE))
"""


def python(code: str) -> subprocess.CompletedProcess:
    """`python -c code` in the checkout, as a fresh process."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)


def test_lightning_loads_without_scipy_signal_and_pyplot_which_work_when_used():
    """torchmetrics imports scipy.signal and matplotlib.pyplot (together about 1.5 s), which echo
    never uses in training: neither loads. scipy.signal loads when something reads from it, and
    then works through every reference to it (torchmetrics' `scipy.signal.hamming` included);
    matplotlib imports as usual, and only torchmetrics' own plots are off."""
    result = python(IMPORT_THEN_USE)
    assert result.stdout.splitlines() == [
        "Deferred False False",
        "True [0.08, 0.77, 0.77, 0.08] [0.0, 1.0, 0.0]",
        "True True",
        "True False",
    ], result.stderr


def test_importing_echo_leaves_other_libraries_alone():
    """Only the command line defers imports: `import echo` (a notebook, a test) does not."""
    code = "import echo, echo.train, scipy.signal, sys; print(type(sys.modules['scipy.signal']).__name__)"
    result = python(code)
    assert result.stdout.strip() == "module", result.stderr


IMPORTED_FOR_NOTHING = """
import sys
from echo.compat import defer_unused_imports
defer_unused_imports()  # as run.py does
import echo.train  # Lightning, and torchmetrics with it
import torchmetrics.utilities.imports as flags
print("torchvision" in sys.modules, "transformers" in sys.modules, bool(flags._TRANSFORMERS_GREATER_EQUAL_4_4))
import torchvision, transformers  # whoever needs them still imports them
print(torchvision.__version__, transformers.__version__)
"""


def _installed(site: Path, name: str, version: str) -> None:
    """A package `name` as pip would leave it: its module and its metadata."""
    (site / name).mkdir()
    (site / name / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (site / f"{name}-{version}.dist-info").mkdir()
    (site / f"{name}-{version}.dist-info" / "METADATA").write_text(f"Name: {name}\nVersion: {version}\n")


def test_torchmetrics_loads_no_torchvision_or_transformers_where_they_are_installed(tmp_path):
    """On a machine with torchvision and transformers installed (a typical GPU machine), torchmetrics
    imports both when Lightning loads, for image and text metrics echo never uses: about 10 s of a
    run's start-up. Here stand-ins of both are installed: neither loads with Lightning, and both
    import when asked for."""
    _installed(tmp_path, "torchvision", "0.26.0")
    _installed(tmp_path, "transformers", "5.0.0")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + IMPORTED_FOR_NOTHING
    result = python(code)
    assert result.stdout.splitlines() == ["False False False", "0.26.0 5.0.0"], result.stderr
