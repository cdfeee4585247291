"""Progress of a quantization run: what the CLI draws as a bar and the service stores per job."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class Progress:
    stage: str  # load | calibrate | encoder | decoder | save | evaluate | done
    layer: int = 0  # blocks finished
    layers_total: int = 0
    loss: float | None = None  # relative reconstruction error of the last block, |(W-Q)X|^2 / |WX|^2

    @property
    def fraction(self) -> float:
        return self.layer / self.layers_total if self.layers_total else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "fraction": self.fraction}


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]
