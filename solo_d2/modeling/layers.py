"""Small building blocks shared by the SOLO heads and postprocessing."""
import math

import torch
from torch import nn
from torchvision.ops import deform_conv2d

__all__ = [
    "linspace_unit", "coordinate_maps", "coord_features", "DeformConv", "DeformConv3x3", "masks_to_boxes",
    "as_uint8", "host_reads_are_free", "device_paths_on_cpu", "read_on_host", "solo_cfg_args",
]


def solo_cfg_args(cfg, *keys: str) -> dict:
    """Constructor arguments of a ``from_config``: the value of each ``cfg.MODEL.SOLO`` key
    under its lower-case name (``NUM_GRIDS`` -> ``num_grids``)."""
    return {key.lower(): cfg.MODEL.SOLO[key] for key in keys}


def as_uint8(masks: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 without a copy (reductions over uint8 are much faster than over
    bool on CPU); a copy while tracing or exporting (the JIT tracer cannot record dtype views,
    the ONNX exporter cannot translate them)."""
    if masks.dtype == torch.bool and not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
        return masks.view(torch.uint8)
    return masks.to(torch.uint8)


def linspace_unit(steps, like: torch.Tensor) -> torch.Tensor:
    """``torch.linspace(-1, 1, steps)`` in ``like``'s dtype and device.

    When exporting, ``steps`` is a symbolic size and ``linspace`` would fix it to the example's
    value; the same values are then computed from ``arange`` with linspace's own formula (from
    both ends, a fused multiply-add), which equals ``linspace`` bit for bit in float32 on CPU
    (tests/test_export.py).
    """
    if not torch.compiler.is_exporting():
        return torch.linspace(-1, 1, steps, device=like.device, dtype=like.dtype)
    idx = torch.arange(steps, device=like.device)
    pos = idx.to(like.dtype)
    step = torch.full((), 2.0, device=like.device, dtype=like.dtype) / torch.sym_max(steps - 1, 1)
    one = torch.ones((), device=like.device, dtype=like.dtype)
    first_half = (2 * idx < steps - 1) | (idx == 0)
    return torch.where(
        first_half, torch.addcmul(-one, pos, step), torch.addcmul(one, steps - 1 - pos, -step)
    )


def coordinate_maps(x: torch.Tensor) -> torch.Tensor:
    """The normalised coordinates of a feature map's pixels, as two channels.

    Args:
        x: (N, C, H, W) float tensor (only its shape, dtype and device are used).
    Returns:
        (N, 2, H, W): channel 0 the x coordinate (varies along W), channel 1 the y coordinate
        (varies along H), both ``linspace(-1, 1)`` from the first to the last pixel, as in the
        reference heads (the official repository's and mmdetection's ``generate_coordinate``).
    """
    n, _, h, w = x.shape
    xs = linspace_unit(w, x)
    ys = linspace_unit(h, x)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy]).expand(n, 2, h, w)


def coord_features(x: torch.Tensor, channels: str = "xy") -> torch.Tensor:
    """CoordConv input: append coordinate channels (:func:`coordinate_maps`) to a feature map.

    Args:
        x: (N, C, H, W) float tensor.
        channels: which coordinates to append, in this order: "xy" (both; vanilla SOLO and
            Decoupled SOLO light), "x" or "y" (one; the X and Y towers of Decoupled SOLO).
    Returns:
        (N, C + len(channels), H, W): ``x`` followed by the requested coordinate channels.
    """
    if channels not in ("xy", "x", "y"):
        raise ValueError(f"coord_features: channels must be 'xy', 'x' or 'y', got {channels!r}")
    coords = coordinate_maps(x)
    if channels != "xy":
        coords = coords[:, :1] if channels == "x" else coords[:, 1:]
    return torch.cat([x, coords], dim=1)


class DeformConv(nn.Module):
    """A k x k deformable convolution (one deformable group) on ``torchvision.ops.deform_conv2d``,
    DCN v1 or, with ``modulated``, DCN v2; optionally strided and followed by a norm and an
    activation. Padding k // 2.

    Detectron2's compiled ``DeformConv`` is unavailable in the pure-Python detectron2 build, so
    the SOLO towers, SOLOv2's mask feature branch and
    :func:`~solo_d2.modeling.deformable_resnet.build_solo_resnet_fpn_backbone` use torchvision's
    op, which runs on CPU and GPU. The offsets come from a k x k conv (``conv_offset``) with the
    layout of mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack`` (and of mmdetection
    1.x's ``DeformConvPack`` / ``ModulatedDeformConvPack``, the official SOLO repository's):

    - DCN v1: 2 k^2 channels, (dy, dx) for each of the k^2 kernel positions, row-major (the
      offset layout of torchvision's op).
    - DCN v2 (``modulated``): 3 k^2 channels, split into three equal chunks ``a, b, m``: the
      offsets are ``cat(a, b)`` (2 k^2 channels, the v1 layout) and the modulation of kernel
      position p is ``sigmoid(m[p])``, which scales the sampled value (torchvision's ``mask``).

    ``conv_offset`` is initialised to zero, so at initialisation a v1 layer equals a plain conv
    and a v2 layer equals a plain conv with its kernel (not its bias) halved.

    Input (N, in_channels, H, W) float; output (N, out_channels, ceil(H / stride),
    ceil(W / stride)). Parameters: ``weight`` (out, in, k, k), ``bias`` (if any),
    ``conv_offset.weight`` / ``.bias``, ``norm.*`` (if any).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        stride: int = 1,
        norm=None,
        activation=None,
        modulated: bool = False,
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"DeformConv: kernel_size must be a positive odd number, got {kernel_size}")
        self.stride = stride
        self.kernel_size = kernel_size
        self.modulated = modulated
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        per_position = 3 if modulated else 2
        self.conv_offset = nn.Conv2d(
            in_channels, per_position * kernel_size * kernel_size, kernel_size=kernel_size,
            stride=stride, padding=kernel_size // 2,
        )
        self.norm = norm
        self.activation = activation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_offset(x)
        mask = None
        if self.modulated:
            a, b, m = torch.chunk(out, 3, dim=1)
            out = torch.cat([a, b], dim=1)
            mask = torch.sigmoid(m)
        pad = self.kernel_size // 2
        x = deform_conv2d(
            x, out, self.weight, self.bias, stride=self.stride, padding=(pad, pad), mask=mask
        )
        if self.norm is not None:
            x = self.norm(x)
        return self.activation(x) if self.activation is not None else x


class DeformConv3x3(DeformConv):
    """:class:`DeformConv` with a 3x3 kernel (the towers' and the backbone's): ``conv_offset`` has
    18 channels (DCN v1) or 27 (DCN v2, ``modulated``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        stride: int = 1,
        norm=None,
        modulated: bool = False,
    ):
        super().__init__(
            in_channels, out_channels, 3, bias=bias, stride=stride, norm=norm, modulated=modulated
        )


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes around boolean masks, vectorised (no per-mask loop).

    Same convention as Detectron2's ``BitMasks.get_bounding_boxes``: (x0, y0, x1, y1) with
    x1 = last foreground column + 1; an empty mask gets an all-zero box.

    Args:
        masks: (N, H, W) bool tensor.
    Returns:
        (N, 4) float32 tensor on the masks' device.
    """
    n, h, w = masks.shape  # n may be 0 (no branch on it, so that the function exports)
    u8 = as_uint8(masks)  # amax over uint8 is much faster than any() over bool on CPU
    cols = u8.amax(dim=1) > 0  # (N, W)
    rows = u8.amax(dim=2) > 0  # (N, H)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y0 = torch.where(rows, ys, h).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)
    return boxes * cols.any(dim=1, keepdim=True)


# ---- where reading a tensor's values on the host is free ----------------------------------------
_DEVICE_PATHS_ON_CPU = [False]


def host_reads_are_free(device) -> bool:
    """Whether code on ``device``'s tensors may read their values on the host (``nonzero``,
    ``unique``, ``int(t)``, ``tolist``) without a cost: True on the CPU, where the host is the
    device (the post-processing and the heads then take their CPU-tuned paths: per-class Matrix
    NMS products, per-mask paste windows, de-duplicated SOLOv2 cells); False on an accelerator,
    where each read waits for every queued kernel (a host-device sync), so the paths with a
    bounded number of reads are taken. :func:`device_paths_on_cpu` makes the CPU take the
    accelerator's paths (to count their syncs, or compare their results, on a CPU)."""
    return torch.device(device).type == "cpu" and not _DEVICE_PATHS_ON_CPU[0]


class device_paths_on_cpu:
    """Context manager: inside it, :func:`host_reads_are_free` is False on the CPU too."""

    def __enter__(self):
        self._old = _DEVICE_PATHS_ON_CPU[0]
        _DEVICE_PATHS_ON_CPU[0] = True
        return self

    def __exit__(self, *exc):
        _DEVICE_PATHS_ON_CPU[0] = self._old
        return False


def read_on_host(t: torch.Tensor) -> list:
    """``t``'s values as a Python list, through one explicit copy to the host (on an accelerator
    a blocking device-to-host copy: one sync). The copy is explicit on the CPU too, so that a
    sync census (:mod:`solo_d2.utils.sync_census`) counts it there."""
    return t.to("cpu", copy=True).tolist()
