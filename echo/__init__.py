"""echo: a harness for sequence echo experiments (README.md). `echo.train.train(cfg)` runs one."""


def load_run(run_id: str):
    """(network in eval mode on the CPU, config) of finished run `run_id` from `MLFLOW_TRACKING_URI` or
    ./mlflow.db, loaded weights-only (echo/reuse.py, imported when called: `import echo` loads no torch)."""
    from echo.reuse import load_run

    return load_run(run_id)
