"""echo: a harness for sequence echo experiments (README).

Importing Lightning imports torchmetrics, whose `__init__` imports `scipy.signal` for its audio
metrics: about a second, a sixth of a default run's whole process. echo uses no scipy, so
`scipy.signal` is deferred: it loads the first time anything reads from it (echo/deferred.py).
"""

from echo.deferred import defer_scipy_signal

defer_scipy_signal()
