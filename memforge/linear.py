"""``Linear``: an ``nn.Linear`` whose large CPU float32 products run through oneDNN.

PyTorch computes a CPU float32 ``F.linear`` with MKL's ``sgemm``, which on AMD processors runs
its AVX2 kernels even where the processor has AVX-512. Measured here (one AMD EPYC Zen 5 core,
torch 2.13), a 1024 x 1024 x 1024 product ran at 114 GFLOP/s through ``F.linear`` and at 264
through oneDNN, the library PyTorch sends CPU convolutions to, which picks its kernels by
instruction set rather than by vendor. A linear map over ``R`` rows is a 1 x 1 convolution over
channels-last images of ``R`` pixels in all (a view of the rows, no copy), so :func:`linear` takes
that route where it pays and ``F.linear`` everywhere else. On two cores, forward plus backward of
the memory layer's projections at 8192 rows ran 2.0x faster that way, and a training step of the
memory layer about 12% faster. For small products the convolution's fixed cost loses, so the
route needs :data:`MIN_ROWS` rows, both widths of at least :data:`MIN_WIDTH` and
:data:`MIN_MACS` multiply-adds (rows x in x out): at 2 threads, forward plus backward of
1024 x 64 -> 64 ran at 130 GFLOP/s through ``F.linear`` and 110 as a convolution, of
512 x 128 -> 128 (the threshold's size) at 150 and 167, of 4096 x 128 -> 128 at 163 and 332.

The rows are cut into at least :data:`MIN_IMAGES` images of equal size where they divide so:
PyTorch sends a 1 x 1 convolution of fewer images on one thread to its own im2col-and-``sgemm``
path rather than to oneDNN (``use_mkldnn`` in ATen's ``Convolution.cpp``, whose comment finds its
own path faster single-threaded), which would make the route worth nothing in single-threaded
runs. With 16 images, on one core of an AMD EPYC with AVX-512, forward plus backward of
4096 x 512 -> 1536 ran at 173 GFLOP/s against ``F.linear``'s 74-79, and of 1024 x 128 -> 128 at
142 against 83; at 2 threads 16 images and one ran at the same rate. Rows with no divisor from
:data:`MIN_IMAGES` to ``4 * MIN_IMAGES`` (1030, say) go as one image, which on one thread runs
PyTorch's own path at about ``F.linear``'s rate.

The choice depends on the device, dtype and shapes alone, so an input always takes the same path
and runs repeat exactly; the two paths agree to float32 rounding (``tests/test_linear.py``, which
also checks gradients). Set ``MEMFORGE_ONEDNN_LINEAR=0`` before importing memforge to use
``F.linear`` throughout.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Set to ``0`` to always use ``F.linear``.
OPT_OUT = "MEMFORGE_ONEDNN_LINEAR"
#: Fewest rows (product of the leading dimensions) that take the oneDNN route.
MIN_ROWS = 512
#: Narrowest input or output width that takes the oneDNN route (a 256 -> 4 gate does not gain).
MIN_WIDTH = 32
#: Fewest multiply-adds (rows x input width x output width) that take the oneDNN route.
MIN_MACS = 2**23
#: Fewest images the rows are cut into: PyTorch's own threshold (``input.size(0) >= 16``) for
#: sending a one-thread 1 x 1 convolution to oneDNN; lower, one thread never reaches oneDNN.
MIN_IMAGES = 16

# oneDNN's x86 kernels are what the route is for; elsewhere (Arm builds use other backends) the
# plain product is the one PyTorch tunes.
_ENABLED = (os.environ.get(OPT_OUT, "1") != "0" and torch.backends.mkldnn.is_available()
            and platform.machine().lower() in {"x86_64", "amd64"})


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` computes ``x @ weight.T`` through oneDNN (see the module docstring)."""
    # The row count first: it is the cheapest test and the one a decoding step (a few rows) fails.
    return (_ENABLED and x.dim() >= 2 and x.numel() >= MIN_ROWS * x.shape[-1]
            and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and min(weight.shape) >= MIN_WIDTH and x.numel() * weight.shape[0] >= MIN_MACS)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, as a 1 x 1 oneDNN convolution where :func:`uses_onednn`."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    width_in, width_out = x.shape[-1], weight.shape[0]
    rows = x.numel() // width_in
    images = next((n for n in range(MIN_IMAGES, 4 * MIN_IMAGES + 1) if rows % n == 0), 1)
    # [*lead, in] -> [images, in, 1, rows / images] images whose memory is the rows as they are
    # (channels last).
    image = x.reshape(images, 1, -1, width_in).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight[:, :, None, None], bias)
    # oneDNN answers channels-last for a channels-last input, so this is a view again.
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], width_out)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and state-dict keys) computed by
    :func:`linear`; a drop-in for plugin authors whose layers see long CPU sequences."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
