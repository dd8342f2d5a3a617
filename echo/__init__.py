"""echo: a harness for sequence echo experiments (README.md). `echo.train.train(cfg)` runs one."""
