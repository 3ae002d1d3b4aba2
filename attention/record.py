"""Per-run record of cross-attention maps and A&E losses: what the visualizer, tests and metrics read."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .loss import subject_max_attention


@dataclass
class AttentionRecord:
    """Maps of one sampling run, filled while it runs and reset at its start.

    ``maps[step][layer]`` is ``(B, H, W, T)`` float16 on the CPU: cond-branch cross-attention probabilities of
    that layer averaged over heads, recorded in the denoising pass of ``step`` (so after that step's A&E update).
    ``losses[step]`` lists the ``(B,)`` losses of every gradient pass at that step (main pass, then refinement).
    Filled without waiting for the GPU; complete once the sampler has called :meth:`finish`. The maps of a step
    stay on the device until the next step's first map (or a read of ``maps``, which completes the record), then go
    to the host as one tensor: one copy and one host buffer per step instead of one per layer (SDXL reads 60).
    """

    subjects: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()
    slots: torch.Tensor | None = None
    smooth: bool = True
    kernel_size: int = 3
    sigma: float = 0.5
    num_steps: int = 0
    guided_steps: int = 0
    _maps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    losses: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    _in_flight: torch.device | None = field(default=None, repr=False, compare=False)
    _pending: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _pending_step: int | None = field(default=None, repr=False, compare=False)

    @property
    def maps(self) -> dict[int, dict[str, torch.Tensor]]:
        self.finish()  # complete even if the run that filled it stopped early
        return self._maps

    def reset(self, **meta) -> None:
        self._maps = {}
        self._pending, self._pending_step = {}, None
        self.losses = {}
        for k, v in meta.items():
            if not hasattr(self, k):
                raise AttributeError(k)
            setattr(self, k, v)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the CPU. From a CUDA device without waiting for it (an asynchronous copy into pinned memory):
        a blocking copy per layer and per pass would hold the host back at every step. Valid after :meth:`finish`."""
        if t.device.type != "cuda":
            return t.to("cpu")
        self._in_flight = t.device
        return t.to("cpu", non_blocking=True)

    def add_map(self, step: int, layer: str, probs: torch.Tensor) -> None:
        if step != self._pending_step:
            self._flush()
            self._pending_step = step
        self._pending[layer] = probs.detach().to(torch.float16)  # a later call for the same layer replaces it

    def _flush(self) -> None:
        """Send the held step's maps to the host, stacked when they share a shape (they do at one level)."""
        if not self._pending:
            return
        names, maps = list(self._pending), list(self._pending.values())
        per_layer = self._maps.setdefault(self._pending_step, {})
        if all(m.shape == maps[0].shape and m.device == maps[0].device for m in maps):
            per_layer.update(zip(names, self._to_host(torch.stack(maps)).unbind(0)))
        else:
            per_layer.update((n, self._to_host(m)) for n, m in zip(names, maps))
        self._pending = {}

    def add_loss(self, step: int, loss: torch.Tensor) -> None:
        self.losses.setdefault(step, []).append(self._to_host(loss.detach().float()))

    def finish(self) -> None:
        """Send the last step's maps and wait for the copies still in flight (the sampler calls this when its run
        ends)."""
        self._flush()
        if self._in_flight is not None:
            torch.cuda.synchronize(self._in_flight)
            self._in_flight = None

    @property
    def steps(self) -> list[int]:
        return sorted(self.maps)

    @property
    def layers(self) -> list[str]:
        names: list[str] = []
        for per_layer in self.maps.values():
            names += [n for n in per_layer if n not in names]
        return names

    def aggregate(self, steps: Iterable[int] | None = None, layers: Sequence[str] | None = None) -> torch.Tensor:
        """Mean ``(B, H, W, T)`` float32 map over the chosen steps and layers (all when ``None``)."""
        steps = self.steps if steps is None else [s for s in steps if s in self.maps]
        chosen = [self.maps[s][n].float() for s in steps for n in self.maps[s] if layers is None or n in layers]
        if not chosen:
            raise ValueError(f"no attention maps recorded for steps {list(steps)} and layers {layers}; recorded "
                             f"steps {self.steps}, layers {self.layers}")
        return torch.stack(chosen).mean(0)

    def subject_maxima(self, steps: Iterable[int] | None = None, layers: Sequence[str] | None = None) -> torch.Tensor:
        """``(B, S)`` A&E maxima ``m_s`` of the aggregated map (same processing as the loss)."""
        if self.slots is None:
            raise ValueError("record has no subject metadata")
        return subject_max_attention(self.aggregate(steps, layers), self.subjects, self.slots, smooth=self.smooth,
                                     kernel_size=self.kernel_size, sigma=self.sigma)
