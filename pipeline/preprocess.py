"""The one preprocessing definition every stage uses: uint8 RGB frames → normalised network input.

It is split in two so each half runs where it is cheapest. ``resize_frames`` is geometric and works
on uint8 (torchvision's vectorised uint8 path); it runs in the decoding workers, so only
``size``×``size`` uint8 frames travel to the device, and frames of any size or count can be batched.
``normalize_frames`` converts to float and normalises on the device. ``preprocess`` is both.

The resize equals torchvision's v2 ``Resize`` on uint8 bit for bit. ``weights.transforms()`` (v1)
resizes in float: one uint8 level apart at most for bilinear; for bicubic the uint8 kernel clips
the filter's overshoot between its two passes, so hard edges differ by more (3-7 levels on 0.06 %
of a photo's pixels, 20 on a checkerboard). Resizing in float would cost 7x the resize time, on
the cores the network shares.

Decoders write pixels interleaved (H, W, 3); ``stack_frames`` keeps that layout, which is PyTorch's
channels_last, so frames reach the network without a transposing copy anywhere on the way.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .config import FrameSpec


def resize_frames(frames: torch.Tensor, spec: FrameSpec) -> torch.Tensor:
    """(N, 3, H, W) or (3, H, W) uint8 → same rank, spatial size ``spec.size``×``spec.size``, uint8.

    ``crop``: the short side to ``spec.resize_size`` (long side scaled and truncated as
    torchvision's ``Resize(int)`` does), then a centre crop rounded as ``center_crop`` rounds it;
    ``squash``: both sides to ``spec.resize_size``, then the same centre crop (none where it is
    ``spec.size``); ``border``: the long side to ``spec.resize_size`` (sides rounded as timm's
    ``ResizeKeepRatio``), padded with the mean colour where shorter than ``spec.size`` and centre
    cropped, as timm's ``CenterCropOrPad``. Antialiased ``spec.interpolation``, exactly as
    ``torchvision.transforms.v2.functional.resize``.
    """
    if frames.dtype != torch.uint8:
        raise TypeError(f"resize_frames expects uint8 frames, got {frames.dtype}")
    h, w = frames.shape[-2:]
    s, mode = spec.size, spec.interpolation
    r = spec.resize_size or s
    if spec.resize == "squash":
        if (h, w) != (r, r):
            frames = _resize(frames, r, r, mode)
    elif spec.resize == "border":
        ratio = max(h / r, w / r)
        if max(h, w) != r:
            frames = _resize(frames, round(h / ratio), round(w / ratio), mode)
        frames = _pad_to(frames, s, tuple(round(255 * m) for m in spec.mean))
    elif min(h, w) != r:
        frames = _resize(frames, r, int(r * w / h), mode) if h <= w else _resize(frames, int(r * h / w), r, mode)
    h, w = frames.shape[-2:]
    top, left = round((h - s) / 2.0), round((w - s) / 2.0)  # as TF.center_crop rounds (half to even)
    return frames[..., top:top + s, left:left + s]  # a view: the caller's stack makes the one copy


def _pad_to(frames: torch.Tensor, s: int, fill: tuple[int, ...]) -> torch.Tensor:
    """Frames padded to at least ``s`` on each side with the colour ``fill``, centred as timm's
    ``center_crop_or_pad`` pads (the odd pixel at the right and bottom); in (…, H, W, 3) memory."""
    h, w = frames.shape[-2:]
    if h >= s and w >= s:
        return frames
    ph, pw = max(s, h), max(s, w)
    top, left = (ph - h) // 2, (pw - w) // 2
    out = torch.empty((*frames.shape[:-3], ph, pw, 3), dtype=frames.dtype, device=frames.device).movedim(-1, -3)
    out.copy_(torch.tensor(fill, dtype=frames.dtype).view(3, 1, 1).expand_as(out))
    out[..., top:top + h, left:left + w] = frames
    return out


def nhwc_view(frames: torch.Tensor) -> torch.Tensor | None:
    """(3, H, W) or (N, 3, H, W) frames whose memory is (…, H, W, 3) (decoders write that), as a
    4-d view that interpolate and the network read as channels_last; None for any other layout."""
    c, h, w = frames.shape[-3:]
    if frames.stride()[-3:] != (1, w * c, c):
        return None
    if frames.ndim == 3 or frames.shape[0] == 1:
        # Batch stride numel, not 1 or 3: with a size-1 batch interpolate could not tell
        # channels_last from contiguous and would write a contiguous output, then repack it.
        return frames.as_strided((1, c, h, w), (h * w * c, 1, w * c, c))
    return frames if frames.ndim == 4 and frames.stride(0) >= h * w * c else None


def _interpolate(x: torch.Tensor, new_h: int, new_w: int, mode: str = "bilinear") -> torch.Tensor:
    """The call torchvision's resize makes, on (N, 3, H, W) uint8."""
    if mode == "nearest":
        return F.interpolate(x, size=(new_h, new_w), mode="nearest")
    return F.interpolate(x, size=(new_h, new_w), mode=mode, align_corners=False, antialias=True)


@functools.cache
def _direct_is_torchvision(mode: str = "bilinear") -> bool:
    """Whether the direct call gives torchvision's own bits here, for one frame and a batch.
    torchvision resizes uint8 natively only on the CPUs it lists (a list that changed between
    releases) and through float32 elsewhere, so one probe per mode, against the installed version,
    decides."""
    import torchvision.transforms.v2.functional as TF

    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 256, (2, 37, 53, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    want = TF.resize(probe, [16, 23], interpolation=TF.InterpolationMode(mode), antialias=True)
    return (torch.equal(_interpolate(nhwc_view(probe[0]), 16, 23, mode)[0], want[0])
            and torch.equal(_interpolate(probe, 16, 23, mode), want))


def _resize(frames: torch.Tensor, new_h: int, new_w: int, mode: str = "bilinear") -> torch.Tensor:
    """Antialiased resize, torchvision's. Decoders hand over frames in (H, W, 3) memory, one or a
    batch at a time; those, the hot case, skip torchvision's per-call dispatch (~20 us of Python
    per call, on the threads that decode) when the result is the same."""
    x = nhwc_view(frames) if frames.device.type == "cpu" else None
    if x is not None and _direct_is_torchvision(mode):
        out = _interpolate(x, new_h, new_w, mode)
        return out[0] if frames.ndim == 3 else out
    import torchvision.transforms.v2.functional as TF

    return TF.resize(frames, [new_h, new_w], interpolation=TF.InterpolationMode(mode), antialias=True)


def stack_frames(frames: list[torch.Tensor]) -> torch.Tensor:
    """(3, S, S) frames or (k, 3, S, S) batches → (N, 3, S, S) in channels_last memory, one copy.

    Decoded and resized frames are (H, W, 3) in memory, so this copies whole pixel rows; the result
    feeds a channels_last network as it is.
    """
    rows = [f.permute(1, 2, 0)[None] if f.ndim == 3 else f.permute(0, 2, 3, 1) for f in frames]  # (k, S, S, 3)
    return torch.cat(rows).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 - mean) / std  ==  x * scale + shift, per channel, as (1, 3, 1, 1) tensors."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale, shift = 1.0 / (255.0 * s), -m / s
    return (scale.to(device, torch.float32).view(1, 3, 1, 1), shift.to(device, torch.float32).view(1, 3, 1, 1))


def normalize_frames(
    frames: torch.Tensor, spec: FrameSpec, *, channels_last: bool = False
) -> torch.Tensor:
    """(B, 3, S, S) uint8 on any device → float32 normalised, optionally channels_last."""
    scale, shift = _affine(spec.mean, spec.std, frames.device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = frames.to(dtype=torch.float32, memory_format=memory_format)
    return per_channel_(x, scale, shift)  # two passes instead of three (div, sub, mul)


def per_channel_(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
    """``x · scale + shift`` in place, with (1, C, 1, 1) per-channel constants (``scale`` optional).

    On channels_last memory it runs along whole (W·C) pixel rows: broadcasting the constants over
    the innermost dimension of C = 3 vectorises badly (measured 3x slower at batch 64). Same values.
    """
    if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
        return (x if scale is None else x.mul_(scale)).add_(shift)
    c, w = x.shape[1], x.shape[-1]
    rows = x.permute(0, 2, 3, 1).view(-1, w * c)
    if scale is not None:
        rows.mul_(scale.reshape(c).repeat(w))
    rows.add_(shift.reshape(c).repeat(w))
    return x


def preprocess(frames: torch.Tensor, spec: FrameSpec, *, channels_last: bool = False) -> torch.Tensor:
    """(B, 3, H, W) uint8 → (B, 3, S, S) float, the network input."""
    return normalize_frames(resize_frames(frames, spec), spec, channels_last=channels_last)
