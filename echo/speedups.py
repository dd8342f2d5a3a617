"""An epoch replayed as one CUDA graph."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from echo.windows import Draw

WARM_EPOCHS = 3  # eager epochs before an epoch is captured in a CUDA graph


class EpochGraph:
    """A training epoch as one CUDA graph replay instead of hundreds of small kernels, after WARM_EPOCHS
    eager ones on a side stream. Drawing the sequences is in the graph (the data's generators are
    registered), so every replay trains on fresh ones. Needs static shapes and a capturable optimizer."""

    def __init__(self):
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm_epochs = 0
        self.sums: Tensor | None = None

    def reset(self) -> None:
        """Capture the epoch again at the next call (no warm-up again)."""
        self.graph = None

    def __call__(self, train_epoch: Callable[[list], Tensor], draw: Draw) -> Tensor:
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
