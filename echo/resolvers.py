"""OmegaConf resolvers the presets use; importing this module registers them (cheap: no torch)."""

from omegaconf import OmegaConf

from echo.task import windows_per_sequence

# `${add:${task.n_in},20}`: sums in presets, e.g. a sequence length that follows n_in
OmegaConf.register_new_resolver("add", lambda *terms: sum(terms), replace=True)

# `${windows_per_sequence:}`: the windows one sequence frames into (21 for the tutorial's), e.g. a
# stateful batch that is one whole sequence, whatever task.n_in, task.length and task.framing
OmegaConf.register_new_resolver(
    "windows_per_sequence", lambda *, _root_: windows_per_sequence(_root_.task), replace=True
)

# `${tracking_uri:}`, for Ray's jobs, is registered by echo/tracking/naming.py, beside tracking_uri()
