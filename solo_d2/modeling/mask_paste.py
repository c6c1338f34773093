"""Pasting SOLO's soft masks into the output image: from the finest mask size to bool masks.

The reference operation (:func:`paste_masks_full`): upsample each (H0, W0) soft mask bilinearly
(``align_corners=False``) to the padded input size, crop to the image, resize bilinearly to the
requested output size (only when it differs from the image size) and threshold (``> thresh``).
It computes every output pixel of every mask; exportable (ONNX) and fast on a GPU.

:func:`paste_masks_in_boxes` returns the same bool masks while computing, per mask, only the
output window that can be ``True``: the pixels whose bilinear sources (through both resizes)
reach a mask cell above ``thresh - margin``. Every other output pixel mixes, with non-negative
weights summing to one (up to rounding), values at most ``thresh - margin``, so it is ``<=
thresh``: False. Inside the window each resize is done separably with the kernel's own indices
and weights (read from it by resizing an identity matrix). PyTorch's CPU kernel rounds its
sums of products in a way that depends on the tensor's layout (measured: the kernel's own
windows and separable passes do not reproduce its full resize bit for bit; this module's sums
differ from it by at most 1.8e-7), so the window's values may differ from the full paste's in
the last bits: where any value of a mask's window lies within
:data:`TIE_TOLERANCE` of ``thresh``, that mask is pasted by the kernel itself
(:func:`paste_masks_full`), so the threshold decision is always the kernel's; so is a mask
whose window covers most of the output (:data:`LARGE_WINDOW`). A test checks the equality on
random masks, masks touching the border, exact ties, odd and resized output sizes.

Contract of both: ``soft`` (R, H0, W0) float32 probabilities in [0, 1]; returns (R, height,
width) bool on ``soft``'s device.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

#: (height, width)
Size = Tuple[int, int]
#: an inclusive window of rows and columns: (first row, last row, first column, last column)
Window = Tuple[int, int, int, int]

__all__ = ["paste_masks_full", "paste_masks_in_boxes", "paste_masks"]

#: Largest difference between :func:`paste_masks_in_boxes`'s values and PyTorch's kernel's,
#: with a wide margin: both compute the same weighted sums with the same weights, in float32,
#: rounded differently (measured on random masks through both resizes: at most 1.8e-7).
TIE_TOLERANCE = 1e-6

#: A mask whose output window covers more than this fraction of the output is pasted by the full
#: kernel (the window saves little there).
LARGE_WINDOW = 0.5


def paste_masks_full(soft: torch.Tensor, padded_size: Size, image_size: Size, output_size: Size,
                     thresh: float, chunk: int = 16) -> torch.Tensor:
    """The reference paste: every pixel of every mask (see the module docstring). Chunked over
    masks to bound memory in eager; all at once while exporting (the chunk count depends on R)."""
    h, w = image_size
    exporting = torch.compiler.is_exporting()

    def paste(m):
        m = F.interpolate(m[:, None], size=tuple(padded_size), mode="bilinear")
        if exporting:  # the same crop; a slice would need h <= Hp proven for symbolic sizes
            m = m.index_select(2, torch.arange(h, device=m.device))
            m = m.index_select(3, torch.arange(w, device=m.device))
        else:
            m = m[:, :, :h, :w]
        if (h, w) != tuple(output_size):
            m = F.interpolate(m, size=tuple(output_size), mode="bilinear")
        return m[:, 0] > thresh

    if exporting:
        return paste(soft)
    out = torch.zeros((soft.shape[0], *output_size), dtype=torch.bool, device=soft.device)
    for start in range(0, soft.shape[0], chunk):
        out[start : start + chunk] = paste(soft[start : start + chunk])
    return out


class _Linear1d:
    """PyTorch's 1-D bilinear resize (``align_corners=False``) from ``in_size`` to ``out_size``:
    output i mixes input ``i0[i]`` (weight ``l0[i]``) and ``i1[i]`` (weight ``l1[i]``). The
    indices and weights are read from PyTorch's own kernel (resizing the identity matrix), so
    they are exactly the ones it uses; ``identity`` when the sizes are equal (it copies)."""

    def __init__(self, in_size: int, out_size: int, device):
        self.identity = in_size == out_size
        if self.identity:
            self.i0 = self.i1 = torch.arange(out_size, device=device)
            return
        eye = torch.eye(in_size, device=device)[:, None, None, :]
        w = F.interpolate(eye, size=(1, out_size), mode="bilinear")[:, 0, 0]  # (in, out)
        used = w > 0
        j = torch.arange(out_size, device=device)
        self.i0 = used.float().argmax(dim=0)  # first and last input with a weight
        self.i1 = in_size - 1 - used.flip(0).float().argmax(dim=0)
        self.l0 = w[self.i0, j]
        self.l1 = torch.where(self.i1 != self.i0, w[self.i1, j], torch.zeros_like(self.l0))

    def reach(self, lo: int, hi: int) -> Tuple[int, int]:
        """The output indices [a, b] (inclusive) with a source in inputs [lo, hi]; a > b when
        none. (Sources are non-decreasing in the output index.)"""
        a = int(torch.searchsorted(self.i1, torch.tensor([lo], device=self.i1.device)))
        b = int(torch.searchsorted(self.i0, torch.tensor([hi], device=self.i0.device), right=True)) - 1
        return a, b

    def apply(self, x: torch.Tensor, dim: int, lo: int, hi: int, offset: int) -> torch.Tensor:
        """Outputs [lo, hi] along ``dim`` of ``x``, whose index 0 along ``dim`` is input
        ``offset``: ``x[i0] * l0 + x[i1] * l1``."""
        i0, i1 = self.i0[lo : hi + 1] - offset, self.i1[lo : hi + 1] - offset
        if self.identity:
            return x.index_select(dim, i0)
        shape = [1] * x.dim()
        shape[dim] = -1
        l0, l1 = self.l0[lo : hi + 1].view(shape), self.l1[lo : hi + 1].view(shape)
        return x.index_select(dim, i0) * l0 + x.index_select(dim, i1) * l1


class _Resize2d:
    """PyTorch's 2-D bilinear resize from ``in_size`` to ``out_size`` (:class:`_Linear1d` per
    axis), on windows."""

    def __init__(self, in_size: Size, out_size: Size, device):
        self.y = _Linear1d(in_size[0], out_size[0], device)
        self.x = _Linear1d(in_size[1], out_size[1], device)

    def reach(self, window: Window, limit: Optional[Size] = None) -> Optional[Window]:
        """The output window whose sources lie in the input ``window`` (cut to rows and columns
        below ``limit``); None when it is empty."""
        ya, yb = self.y.reach(window[0], window[1])
        xa, xb = self.x.reach(window[2], window[3])
        if limit is not None:
            yb, xb = min(yb, limit[0] - 1), min(xb, limit[1] - 1)
        return None if ya > yb or xa > xb else (ya, yb, xa, xb)

    def sources(self, window: Window) -> Window:
        """The input window that the output ``window`` reads."""
        ya, yb, xa, xb = window
        return int(self.y.i0[ya]), int(self.y.i1[yb]), int(self.x.i0[xa]), int(self.x.i1[xb])

    def apply(self, m: torch.Tensor, window: Window, origin: Window) -> torch.Tensor:
        """The output ``window`` from ``m``, the input cut at ``origin`` (its first row and
        column are ``origin[0]`` and ``origin[2]``): width first, then height."""
        m = self.x.apply(m, 1, window[2], window[3], origin[2])
        return self.y.apply(m, 0, window[0], window[1], origin[0])


def _area(window: Window) -> int:
    return (window[1] - window[0] + 1) * (window[3] - window[2] + 1)


def paste_masks_in_boxes(soft: torch.Tensor, padded_size: Size, image_size: Size, output_size: Size,
                         thresh: float) -> torch.Tensor:
    """The same bool masks as :func:`paste_masks_full`, computing each mask only inside the
    output window its cells above ``thresh - margin`` can reach (see the module docstring)."""
    r, h0, w0 = soft.shape
    hp, wp = padded_size
    h, w = image_size
    oh, ow = output_size
    out = torch.zeros((r, oh, ow), dtype=torch.bool, device=soft.device)
    if r == 0:
        return out
    soft = soft.float()
    # Rounding slack of two convex combinations of values in [0, 1], with a wide safety factor.
    margin = 1e-5 * max(1.0, abs(thresh))
    above = soft > thresh - margin
    rows_any, cols_any = above.any(dim=2), above.any(dim=1)  # (R, H0), (R, W0)
    first = lambda a: a.float().argmax(dim=1).tolist()  # noqa: E731  first True per mask
    last = lambda a: (a.shape[1] - 1 - a.flip(1).float().argmax(dim=1)).tolist()  # noqa: E731
    has = rows_any.any(dim=1).tolist()
    r_lo, r_hi, c_lo, c_hi = first(rows_any), last(rows_any), first(cols_any), last(cols_any)

    dev = soft.device
    up = _Resize2d((h0, w0), (hp, wp), dev)  # mask size -> padded input
    second = (h, w) != (oh, ow)
    if second:
        resize = _Resize2d((h, w), (oh, ow), dev)  # image -> output size
    by_kernel = []  # masks pasted by the full kernel: near-ties and large windows
    for k in range(r):
        if not has[k]:
            continue
        # Window of the padded upsample (cropped to the image) reached by the cells above.
        window = up.reach((r_lo[k], r_hi[k], c_lo[k], c_hi[k]), limit=(h, w))
        if window is None:
            continue
        # Window of the output reached by that one, and (second resize) the rows/cols it needs.
        out_window = resize.reach(window) if second else window
        if out_window is None:
            continue
        if _area(out_window) > LARGE_WINDOW * oh * ow:
            by_kernel.append(k)
            continue
        if second:
            window = resize.sources(out_window)
        src = up.sources(window)
        m = up.apply(soft[k, src[0] : src[1] + 1, src[2] : src[3] + 1], window, src)
        if second:
            m = resize.apply(m, out_window, window)
        ya, yb, xa, xb = out_window
        if bool(((m - thresh).abs() <= TIE_TOLERANCE).any()):
            # A value within rounding distance of the threshold: the order of PyTorch's
            # kernel's products and sums decides it; let the kernel decide.
            by_kernel.append(k)
            continue
        out[k, ya : yb + 1, xa : xb + 1] = m > thresh
    if by_kernel:  # (the kernel's values of a mask do not depend on the masks beside it)
        idx = torch.tensor(by_kernel, device=dev)
        out[idx] = paste_masks_full(soft[idx], padded_size, image_size, output_size, thresh)
    return out


def paste_masks(soft: torch.Tensor, padded_size: Size, image_size: Size, output_size: Size,
                thresh: float, box_limited: Optional[bool] = None) -> torch.Tensor:
    """The paste used at inference: :func:`paste_masks_in_boxes` with ``box_limited`` (default:
    on the CPU, where the work saved dominates; it reads each mask's window on the host, a
    sync per mask elsewhere); :func:`paste_masks_full` otherwise (on a GPU the full paste is a
    few large kernels and no host read). Both give the same masks. Exporting (torch.export,
    ONNX, tracing) uses the full paste."""
    exporting = (
        torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.jit.is_scripting()
    )
    if box_limited is None:
        box_limited = soft.device.type == "cpu"
    if box_limited and not exporting:
        return paste_masks_in_boxes(soft, padded_size, image_size, output_size, thresh)
    return paste_masks_full(soft, padded_size, image_size, output_size, thresh)
