"""echo: a harness for sequence echo experiments (README).

Importing Lightning imports torchmetrics, which imports `scipy.signal` for its audio metrics and
`matplotlib.pyplot` for its plots: together about a second and a half, a fifth of a default run's
whole process, for nothing echo uses. `scipy.signal` loads the first time anything reads from
it; torchmetrics is told that matplotlib is not there (echo/deferred.py).
"""

from echo.deferred import defer_scipy_signal, keep_torchmetrics_from_pyplot

defer_scipy_signal()
keep_torchmetrics_from_pyplot()
