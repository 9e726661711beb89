"""How a student travels between server and site: fp16 (default), bf16 or fp32 on the wire.

A student's weights are sent both ways every round; at half precision that is
half the bytes for a cosine change far below the round-to-round noise.
Only floating tensors are cast (int/bool buffers such as BatchNorm's
`num_batches_tracked` go untouched) and everything is cast back to fp32 on
arrival, so local training and the server's aggregate stay fp32. Flower's
ArrayRecord has no bf16 (numpy has none), so bf16 travels as its int16 bit
pattern; the receiver knows which tensors to re-view from the dtype it sent in
`transfer-dtype` (config record) and from its own student's dtypes.
"""

from __future__ import annotations

from typing import Literal

import torch

TransferDtype = Literal["fp16", "bf16", "fp32"]
TRANSFER_KEY = "transfer-dtype"  # in the train/evaluate ConfigRecord: what the arrays were sent as
WIRE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def encode(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors to the wire dtype (bf16 as int16 bits); other tensors as they are."""
    wire = WIRE[dtype]
    out = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(wire)
            if wire is torch.bfloat16:
                value = value.view(torch.int16)
        out[key] = value.contiguous()
    return out


def decode(state: dict[str, torch.Tensor], dtype: str, like: dict[str, torch.Tensor] | None = None
           ) -> dict[str, torch.Tensor]:
    """Back to fp32 (or to `like`'s dtype per key). bf16 bits are recognised by `like` being floating
    and the tensor int16; without `like`, any int16 tensor under bf16 is taken for bf16 bits."""
    out = {}
    for key, value in state.items():
        target = like[key].dtype if like is not None and key in like else None
        if dtype == "bf16" and value.dtype == torch.int16 and (target is None or target.is_floating_point):
            value = value.view(torch.bfloat16)
        if value.is_floating_point():
            value = value.to(target if target is not None and target.is_floating_point else torch.float32)
        out[key] = value
    return out


def nbytes(state: dict[str, torch.Tensor]) -> int:
    """Payload bytes of a state dict as sent (array data only, no framing)."""
    return sum(v.numel() * v.element_size() for v in state.values())


__all__ = ["TRANSFER_KEY", "TransferDtype", "WIRE", "decode", "encode", "nbytes"]
