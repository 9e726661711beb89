"""How a student travels between server and site: fp16 (default), bf16 or fp32 on the wire.

A student's weights are sent both ways every round; at half precision that is
half the bytes for a cosine change far below the round-to-round noise.
Only floating tensors are cast (int/bool buffers such as BatchNorm's
`num_batches_tracked` go untouched) and everything is cast back to fp32 on
arrival, so local training and the server's aggregate stay fp32. Flower's
ArrayRecord has no bf16 (numpy has none), so bf16 travels as its int16 bit
pattern; the receiver knows which tensors to re-view from the dtype it sent in
`transfer-dtype` (config record) and from its own student's dtypes.

`int8-delta` (opt-in) quarters the upload: the server still sends fp16, a site
sends back per float tensor the int8 delta to what it received, with an fp32
scale per output channel (>= 2-D weights) or per tensor (1-D), and keeps the
rounding error to add to its next delta (error feedback: nothing is lost for
good, only delayed). Tensors under `MIN_QUANTISED` elements (biases, norm
parameters and running stats: < 0.3 % of a ResNet's bytes) and integer buffers
go as they are (fp32 / int). The server rebuilds received + scale * q in fp32.

On the wire a student is *packed*: one flat array per dtype (`pack`), not one
array per tensor. Flower moves every array as its own content-addressed
object, one HTTP request per object per hop (server -> SuperLink -> SuperNode
-> ClientApp and back), and a ClientApp that asks before its SuperNode has them
backs off 1, 2, 4 ... s. `bench/wire_objects.py` (Flower alone, 24 MB each way):
a round trip took a median 6.5 s as 1 array, 13.5 s as 150 and 31.7 s as 300.
The message's config says how to read it back (`LAYOUT_KEY`: key, shape,
dtype per tensor, in key order); a reply is packed in the layout the server
derives from what it sent (`reply_layouts`), so it carries none. SecAgg+
(server/secure_aggregation.py) still sends Flower's legacy arrays by name.
"""

from __future__ import annotations

import json
from typing import Literal

import torch

TransferDtype = Literal["fp16", "bf16", "fp32", "int8-delta"]
TRANSFER_KEY = "transfer-dtype"  # in the train/evaluate ConfigRecord: what the arrays were sent as
INT8_DELTA = "int8-delta"
# server -> site dtype; under int8-delta the download is fp16 (a site needs the weights, not a delta)
WIRE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, INT8_DELTA: torch.float16}
LAYOUT_KEY = "wire-layout"  # in the config record: how the packed arrays split into the student's tensors
SCALES_RECORD = "delta-scales"  # the reply's second ArrayRecord under int8-delta: key -> fp32 scale(s)
MIN_QUANTISED = 1024  # float tensors with fewer elements go as fp32 values (no scale, no residual)


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


def quantised(value: torch.Tensor) -> bool:
    """Whether int8-delta quantises this tensor (float, at least `MIN_QUANTISED` elements)."""
    return value.is_floating_point() and value.numel() >= MIN_QUANTISED


def scale_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """One scale per output channel (dim 0) of a >= 2-D weight, one per 1-D tensor: rows of a
    conv / linear weight move by different amounts, and a shared scale would round the quiet ones to 0."""
    return (shape[0],) if len(shape) >= 2 else ()


def _broadcast(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim))


def quantise(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 (-127..127) with absmax scale(s): |delta - scale * q| <= scale / 2 per element."""
    delta = delta.float()
    dims = tuple(range(1, delta.ndim)) if delta.ndim >= 2 else tuple(range(delta.ndim))
    scale = delta.abs().amax(dim=dims) / 127 if dims else delta.abs() / 127
    safe = _broadcast(torch.where(scale > 0, scale, torch.ones_like(scale)), delta.ndim)
    q = torch.round(delta / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale.reshape(scale_shape(delta.shape)).contiguous()


def dequantise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * _broadcast(scale.float(), q.ndim)


def encode_delta(new: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                 residual: dict[str, torch.Tensor] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(payload, scales, residual): `payload` has `new`'s keys (int8 for quantised tensors, else as they
    are), `scales` the quantised keys' fp32 scales, `residual` what rounding left out this time. `base` is
    the student as the site received it (fp32); `residual` the last round's (a missing or mis-shaped entry
    counts as zero: a fresh process starts from zero)."""
    payload, scales, left = {}, {}, {}
    for key, value in new.items():
        value = value.detach().cpu()
        if not quantised(value):
            payload[key] = (value.float() if value.is_floating_point() else value).contiguous()
            continue
        delta = value.float() - base[key].float()
        carried = (residual or {}).get(key)
        if carried is not None and carried.shape == delta.shape:
            delta = delta + carried.float()
        payload[key], scales[key] = quantise(delta)
        left[key] = delta - dequantise(payload[key], scales[key])
    return payload, scales, left


def decode_delta(payload: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
                 base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The site's student in fp32: base + scale * q where a scale came, else the value sent (base's dtype).
    A malformed reply (a float tensor sent as int8 without its scale, a scale of the wrong shape or for
    a key that was not quantised) raises ValueError."""
    if set(scales) - set(payload):
        raise ValueError("int8-delta scales for tensors that were not sent")
    out = {}
    for key, value in payload.items():
        like = base.get(key)
        if key in scales:
            if value.dtype != torch.int8 or like is None or tuple(scales[key].shape) != scale_shape(value.shape):
                raise ValueError(f"int8-delta tensor '{key}' does not match its scale")
            out[key] = like.float() + dequantise(value, scales[key])
        elif like is not None and like.is_floating_point() and not value.is_floating_point():
            raise ValueError(f"int8-delta tensor '{key}' came without its scale")
        else:
            out[key] = value.to(like.dtype) if like is not None and value.is_floating_point() else value
    return out


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def layout_of(state: dict[str, torch.Tensor]) -> str:
    """JSON [[key, shape, dtype], ...] in key order: what `unpack` needs to rebuild `pack(state)`."""
    return json.dumps([[k, list(state[k].shape), _dtype_name(state[k])] for k in sorted(state)], separators=(",", ":"))


def pack(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One flat tensor per dtype (named by it), the tensors concatenated in key order: sorted, not the
    dict's, since a model's own order and a checkpoint's differ and both ends must agree."""
    groups: dict[str, list[torch.Tensor]] = {}
    for key in sorted(state):
        groups.setdefault(_dtype_name(state[key]), []).append(state[key].detach().cpu().reshape(-1))
    return {name: torch.cat(parts) for name, parts in groups.items()}


def unpack(packed: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """`pack`'s inverse given the layout; ValueError when the arrays do not fit it (other dtypes, sizes)."""
    try:
        entries = [(str(k), tuple(int(d) for d in shape), str(dtype)) for k, shape, dtype in json.loads(layout)]
    except (ValueError, TypeError) as err:
        raise ValueError(f"unreadable wire layout ({err})") from None
    sizes: dict[str, list[int]] = {}
    for _, shape, dtype in entries:
        sizes.setdefault(dtype, []).append(int(torch.Size(shape).numel()))
    if set(packed) != set(sizes):
        raise ValueError(f"packed arrays {sorted(packed)} do not match the layout's dtypes {sorted(sizes)}")
    parts = {}
    for dtype, counts in sizes.items():
        flat = packed[dtype]
        if _dtype_name(flat) != dtype or flat.dim() != 1 or flat.numel() != sum(counts):
            raise ValueError(f"packed '{dtype}' array: {_dtype_name(flat)} of {tuple(flat.shape)}, "
                             f"expected {sum(counts)} elements")
        parts[dtype] = iter(torch.split(flat, counts))
    return {key: next(parts[dtype]).reshape(shape) for key, shape, dtype in entries}


def to_wire(state: dict[str, torch.Tensor], dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The student as a message carries it: packed wire arrays, and the config entries saying how to read them."""
    named = encode(state, dtype)
    return pack(named), {TRANSFER_KEY: dtype, LAYOUT_KEY: layout_of(named)}


def from_wire(packed: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], str]:
    """(the student in fp32, the wire dtype) from a message's packed arrays and its config."""
    if LAYOUT_KEY not in config:
        raise ValueError(f"the message's config has no '{LAYOUT_KEY}': not a fedus student")
    dtype = str(config.get(TRANSFER_KEY, "fp32"))
    return decode(unpack(packed, str(config[LAYOUT_KEY])), dtype), dtype


def reply_layouts(received: dict[str, torch.Tensor], dtype: str) -> tuple[str, str | None]:
    """How a site packs its reply to `received` (the student as it arrived, fp32): the arrays' layout and,
    under int8-delta, the scales'. Both ends derive it from the same student, so replies carry none."""
    if dtype == INT8_DELTA:
        payload, scales, _ = encode_delta(received, received)
        return layout_of(payload), layout_of(scales)
    return layout_of(encode(received, dtype)), None


__all__ = ["INT8_DELTA", "LAYOUT_KEY", "MIN_QUANTISED", "SCALES_RECORD", "TRANSFER_KEY", "TransferDtype", "WIRE", "decode",
           "decode_delta", "dequantise", "encode", "encode_delta", "from_wire", "layout_of", "nbytes", "pack", "quantise",
           "quantised", "reply_layouts", "scale_shape", "to_wire", "unpack"]
