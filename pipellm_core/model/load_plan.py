"""Where each part of the model lives: the object that `load` hooks annotate before weights move."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerPlacement:
    device: str | None = None  # the device that computes this layer ("meta": another process)
    resident: bool = True  # False: weights stay in pinned host memory and stream in before use
    stage: int = 0  # pipeline stage the layer belongs to


@dataclass
class LoadPlan:
    n_layers: int
    layers: list[LayerPlacement] = field(default_factory=list)
    embedding_device: str | None = None
    head_device: str | None = None

    @classmethod
    def empty(cls, n_layers: int) -> "LoadPlan":
        return cls(n_layers, [LayerPlacement() for _ in range(n_layers)])

    @property
    def stages(self) -> list[list[int]]:
        """Layer indices of each stage, stages in order."""
        out: dict[int, list[int]] = {}
        for i, p in enumerate(self.layers):
            out.setdefault(p.stage, []).append(i)
        return [out[s] for s in sorted(out)]

    def fill_defaults(self, device: str) -> None:
        """Put everything no plugin placed on `device`."""
        for p in self.layers:
            if p.device is None:
                p.device = device
        if self.embedding_device is None:
            self.embedding_device = self.layers[0].device if self.layers else device
        if self.head_device is None:
            self.head_device = self.layers[-1].device if self.layers else device
