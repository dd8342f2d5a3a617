"""The module's speed-ups change nothing a run computes (the CUDA graph's are in tests/test_gpu.py)."""

from torch import nn

from echo.models import build_net
from echo.module import EchoModule


def test_plain_attributes_skip_nn_module_but_parameters_still_register():
    net = build_net("seq2seq", n_in=5, n_features=100, hidden_size=8, n_classes=100, n_out=5)
    module = EchoModule(net, 100, 1e-3, True, windows_per_epoch=21)
    module._current_fx_name = "training_step"
    assert module.__dict__["_current_fx_name"] == "training_step"  # stored directly
    module.extra = nn.Linear(2, 2)  # any other name goes through nn.Module: a submodule
    assert "extra" in module._modules and "extra" not in module.__dict__
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in net.parameters()) + 6
