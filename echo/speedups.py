"""A speed-up that is not about echoing: an epoch replayed as one CUDA graph. (Freed memory kept for
the next tensors, glibc's setting, is echo.compat.reuse_freed_memory.)"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from echo.windows import Draw

WARM_EPOCHS = 3  # eager epochs before an epoch is captured in a CUDA graph


class EpochGraph:
    """A training epoch as one CUDA graph replay: one launch per epoch instead of hundreds of small
    kernels. The first WARM_EPOCHS epochs run eagerly on a side stream (cuDNN, cuBLAS and Adam set
    themselves up), then one epoch is captured and replayed; drawing the sequences is inside the
    graph, from the data's own generator, so every replay trains on fresh sequences. The epoch needs
    static shapes and an optimizer with `capturable=True`."""

    def __init__(self):
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm_epochs = 0
        self.sums: Tensor | None = None

    def reset(self) -> None:
        """Capture the epoch again at the next call (what it updates has changed); no warm-up again."""
        self.graph = None

    def __call__(self, train_epoch: Callable[[list], Tensor], draw: Draw) -> Tensor:
        """`train_epoch(draw())`'s result, by replaying the captured epoch once it is captured."""
        if self.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            if self.warm_epochs < WARM_EPOCHS:
                self.warm_epochs += 1
                with torch.cuda.stream(stream):
                    sums = train_epoch(draw())
                torch.cuda.current_stream().wait_stream(stream)
                return sums
            graph = torch.cuda.CUDAGraph()
            for generator in draw.generators:
                graph.register_generator_state(generator)
            try:
                with torch.cuda.graph(graph, stream=stream):
                    self.sums = train_epoch(draw())
            except RuntimeError as error:
                message = f"capturing an epoch in a CUDA graph failed: run with cuda_graph=false ({error})"
                raise RuntimeError(message) from error
            self.graph = graph
        self.graph.replay()
        return self.sums.clone()
