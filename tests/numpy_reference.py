"""float64 numpy references the tests check TVM's results against."""

from __future__ import annotations

import numpy as np


def conv2d_nchw(x: np.ndarray, w: np.ndarray, stride: int, pad: int, groups: int) -> np.ndarray:
    """Convolution of x (N, C, H, W) with w (O, C/groups, kH, kW), zero padding ``pad`` on
    every side, no bias, in float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, _, h, wd = x.shape
    o, i_g, kh, kw = w.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    out = np.zeros((n, o, oh, ow))
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        xs = x[:, g * i_g:(g + 1) * i_g]
        for yy in range(oh):
            for xx in range(ow):
                patch = xs[:, :, yy * stride:yy * stride + kh, xx * stride:xx * stride + kw]
                out[:, oc, yy, xx] = np.sum(patch * w[oc], axis=(1, 2, 3))
    return out
