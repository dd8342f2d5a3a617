"""OmegaConf resolvers the presets use; importing this module registers them (cheap: no torch)."""

from omegaconf import OmegaConf

# `${add:${task.n_in},20}`: sums in presets, e.g. a sequence length that follows n_in
OmegaConf.register_new_resolver("add", lambda *terms: sum(terms), replace=True)


def _tracking_uri() -> str:
    from echo.tracking import tracking_uri

    return tracking_uri()


# `${tracking_uri:}`: where this process tracks runs, for jobs that do not inherit its environment (Ray's)
OmegaConf.register_new_resolver("tracking_uri", _tracking_uri, replace=True)
