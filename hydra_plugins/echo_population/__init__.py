"""echo's population launcher for Hydra: `python run.py -m hydra/launcher=population ...`."""
