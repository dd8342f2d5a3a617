"""OmegaConf resolvers the presets use; importing this module registers them (cheap: no torch)."""

from omegaconf import OmegaConf

# `${add:${task.n_in},20}`: sums in presets, e.g. a sequence length that follows n_in
OmegaConf.register_new_resolver("add", lambda *terms: sum(terms), replace=True)

# `${tracking_uri:}`, for Ray's jobs, is registered by echo/tracking/naming.py, beside tracking_uri()
