"""echo's SLURM launcher for Hydra: `python run.py -m hydra/launcher=slurm ...` (submitit's, extended)."""
