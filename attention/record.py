"""Per-run record of cross-attention maps and A&E losses: what the visualizer, tests and metrics read."""

from __future__ import annotations

import functools
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
    Filled without waiting for the GPU; complete once the sampler has called :meth:`finish` (a read of ``maps`` or
    ``losses`` completes it too). The maps of a step stay on the device until the next step's first map, then go to
    the host as one tensor, into one host buffer made for the whole run (``num_steps`` slots): one copy per step
    instead of one per layer (SDXL reads 60) and one pinned allocation per run. Losses stay on the device until the
    run ends and go as one tensor: a pinned allocation per gradient pass (85 at the refinement cap) costs more than
    the pass's loss is worth. ``skipped_steps[b]`` lists the guided steps at which sample ``b``'s A&E update was
    skipped because it was not finite (it kept the unguided latent there); its masks travel with the losses.
    """

    subjects: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()
    slots: torch.Tensor | None = None
    smoothing: bool = True
    kernel_size: int = 3
    smoothing_sigma: float = 0.5
    num_steps: int = 0
    guided_steps: int = 0
    _maps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _losses: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _in_flight: torch.device | None = field(default=None, repr=False, compare=False)
    _pending: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _pending_step: int | None = field(default=None, repr=False, compare=False)
    _pending_losses: list[tuple[int, torch.Tensor]] = field(default_factory=list, repr=False, compare=False)
    _buffer: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _pending_skips: list[tuple[int, torch.Tensor]] = field(default_factory=list, repr=False, compare=False)
    _skipped: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def maps(self) -> dict[int, dict[str, torch.Tensor]]:
        self.finish()  # complete even if the run that filled it stopped early
        return self._maps

    @property
    def losses(self) -> dict[int, list[torch.Tensor]]:
        """``losses[step]``: the ``(B,)`` float32 CPU losses of that step's gradient passes, in order."""
        self.finish()
        return self._losses

    @property
    def skipped_steps(self) -> list[list[int]]:
        """Per sample, the guided steps whose A&E update was skipped as not finite (empty lists: none; an empty list
        of samples: no guided step was recorded)."""
        self.finish()
        return self._skipped

    def reset(self, **meta) -> None:
        self._maps, self._losses = {}, {}
        self._pending, self._pending_step, self._pending_losses = {}, None, []
        self._pending_skips, self._skipped = [], []
        self._buffer = None  # a new run gets a new buffer: maps handed out earlier stay valid
        for k, v in meta.items():
            if not hasattr(self, k):
                raise AttributeError(k)
            setattr(self, k, v)

    def _to_host(self, t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` on the CPU (in ``out`` when given). From a CUDA device without waiting for it (an asynchronous copy
        into pinned memory): a blocking copy per step would hold the host back. Valid after :meth:`finish`."""
        if t.device.type == "cuda":
            self._in_flight = t.device
        if out is not None:
            return out.copy_(t, non_blocking=t.device.type == "cuda")
        return t.to("cpu", non_blocking=t.device.type == "cuda")

    def _slot(self, step: int, stacked: torch.Tensor) -> torch.Tensor | None:
        """``step``'s slot in the run's host buffer for stacked maps like ``stacked`` (made at the first flush), or
        ``None`` where the buffer cannot hold it (no step count, a step out of range or seen before, another shape)."""
        if not 0 <= step < self.num_steps or step in self._maps:
            return None
        shape = (self.num_steps, *stacked.shape)
        if self._buffer is None:
            self._buffer = torch.empty(shape, dtype=stacked.dtype, pin_memory=stacked.device.type == "cuda")
        elif self._buffer.shape != shape or self._buffer.dtype != stacked.dtype:
            return None
        return self._buffer[step]

    def _send(self, tensors: list[torch.Tensor], slot=None) -> list[torch.Tensor]:
        """``tensors`` on the host: as one stacked copy when they share shape and device (into ``slot(stacked)``
        where that gives a place), else one by one."""
        if all(t.shape == tensors[0].shape and t.device == tensors[0].device for t in tensors):
            stacked = torch.stack(tensors)
            return list(self._to_host(stacked, None if slot is None else slot(stacked)).unbind(0))
        return [self._to_host(t) for t in tensors]

    def add_map(self, step: int, layer: str, probs: torch.Tensor) -> None:
        if step != self._pending_step:
            self._flush()
            self._pending_step = step
        self._pending[layer] = probs.detach().to(torch.float16)  # a later call for the same layer replaces it

    def _flush(self) -> None:
        """Send the held step's maps to the host, stacked when they share a shape (they do at one level)."""
        if not self._pending:
            return
        step = self._pending_step
        host = self._send(list(self._pending.values()), functools.partial(self._slot, step))
        self._maps.setdefault(step, {}).update(zip(self._pending, host))
        self._pending = {}

    def add_loss(self, step: int, loss: torch.Tensor) -> None:
        self._pending_losses.append((step, loss.detach().float()))

    def add_skipped(self, step: int, skipped: torch.Tensor) -> None:
        """``skipped`` ``(B,)`` bool: the samples whose update at guided ``step`` was skipped (kept on the device
        until the run ends, like the losses)."""
        self._pending_skips.append((step, skipped.detach().reshape(-1)))

    def finish(self) -> None:
        """Send the last step's maps and the run's losses, and wait for the copies still in flight (the sampler
        calls this when its run ends)."""
        self._flush()
        if self._pending_losses:
            steps, losses = zip(*self._pending_losses)
            self._pending_losses = []
            for step, v in zip(steps, self._send(list(losses))):
                self._losses.setdefault(step, []).append(v)
        skips = self._pending_skips
        if skips:
            self._pending_skips = []
            masks = self._send([m for _, m in skips])
        if self._in_flight is not None:
            torch.cuda.synchronize(self._in_flight)
            self._in_flight = None
        if skips:  # read on the host only once the copies have landed
            for (step, _), mask in zip(skips, masks):
                if not self._skipped:
                    self._skipped = [[] for _ in range(mask.numel())]
                for b in mask.nonzero().flatten().tolist():
                    self._skipped[b].append(step)

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
        return subject_max_attention(self.aggregate(steps, layers), self.subjects, self.slots, smoothing=self.smoothing,
                                     kernel_size=self.kernel_size, smoothing_sigma=self.smoothing_sigma)
