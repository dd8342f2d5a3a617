"""echo: a harness for sequence echo experiments (README).

Importing Lightning imports torchmetrics, which imports `scipy.signal` for its audio metrics and
`matplotlib.pyplot` for its plots: together about a second and a half, a fifth of a default run's
whole process, for nothing echo uses. `scipy.signal` loads the first time anything reads from
it; torchmetrics is told that matplotlib is not there (echo/deferred.py).

`echo.load_run(run_id)` returns a finished run's trained network and its config (echo/reuse.py,
imported when called: `import echo` loads no torch).
"""

from echo.deferred import defer_scipy_signal, keep_torchmetrics_from_pyplot

defer_scipy_signal()
keep_torchmetrics_from_pyplot()


def load_run(run_id: str):
    """(network, config) of finished run `run_id`, from `MLFLOW_TRACKING_URI` or ./mlflow.db:
    the network ready to predict (eval mode, CPU), loaded weights-only (echo/reuse.py)."""
    from echo.reuse import load_run

    return load_run(run_id)
