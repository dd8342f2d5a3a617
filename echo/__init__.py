"""echo: a harness for sequence echo experiments (README.md). `echo.train.train(cfg)` runs one."""


def load_run(run_id: str):
    """(network, config) of finished run `run_id`, from `MLFLOW_TRACKING_URI` or ./mlflow.db:
    the network ready to predict (eval mode, CPU), loaded weights-only (echo/reuse.py; imported
    when called: `import echo` loads no torch)."""
    from echo.reuse import load_run

    return load_run(run_id)
