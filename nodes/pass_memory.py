"""What A&E says when its gradient pass does not fit in memory, also after freeing what it holds and retrying in the
lean form: the settings that make the pass smaller, in the order they help."""

from __future__ import annotations

import torch


class GradientPassOutOfMemory(torch.OutOfMemoryError):
    """The gradient pass ran out of memory also in its lean form (eager, transformer blocks recomputed). ComfyUI
    handles it as the out-of-memory error it is: it unloads its models and shows its own tips after this message."""


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (CUDA's out-of-memory messages run on for lines)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def out_of_memory_message(node: str, latent_shape: tuple[int, ...], attention_blocks: str,
                          target_hw: tuple[int, int], finest_side: int | None, error: str,
                          joint_family: str | None = None) -> str:
    """The message of :class:`GradientPassOutOfMemory`. ``finest_side``: the side of the finest attention level
    with encoder layers (``attention_resolution`` there and ``down_mid`` stop the pass soonest). ``joint_family``:
    the model's joint-attention family (Flux, SD3), whose pass stops after the last of the ``joint_blocks``."""
    batch, (h, w) = latent_shape[0], latent_shape[-2:]
    changes = []
    if joint_family is not None:
        changes.append(f"joint_blocks on the Attend-and-Excite Options node to fewer, earlier blocks ({joint_family}: "
                       f"the pass stops after the last block read)")
        attention_blocks = "joint blocks"
    elif attention_blocks == "all":
        changes.append("attention_blocks = down_mid on the Attend-and-Excite Options node (the pass stops before the "
                       "decoder: about half of its memory on SDXL)")
    if finest_side is not None and finest_side > max(target_hw):
        changes.append(f"attention_resolution = {finest_side} with down_mid (the level nearest the input, where the "
                       f"pass stops soonest)")
    changes.append("a smaller image" + (f" or batch (now {batch})" if batch > 1 else ""))
    changes.append("or scale_factor = 0 (plain sampling)")
    lean = "eagerly" if joint_family is not None else "eagerly with every transformer block recomputed"
    return (f"{node}: the Attend-and-Excite gradient pass ran out of GPU memory ({error}), also when retried {lean} "
            f"after A&E freed its CUDA graph and weight stand-ins ({batch} image{'s' if batch > 1 else ''}, latent "
            f"{h}x{w}, attention_blocks = {attention_blocks}, attention level {target_hw[0]}x{target_hw[1]}). "
            f"To make it fit, set " + "; ".join(changes) + ".")
