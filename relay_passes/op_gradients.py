"""Gradients for the Relax ops TVM 0.27 ships without one.

Importing this module registers them (``relax.transform.Gradient`` then handles
every op the frontend emits). Each is the derivative of the op as a real
function; a boundary point (``x == lo`` for clip) takes the gradient of the
inside, as PyTorch does.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax import op as R
from tvm.relax.op import register_gradient


def _clip_grad(orig_var, orig_call, output_grad, ctx):
    """clip(x, lo, hi)' = g where lo < y < hi, else 0 (y = the output, as PyTorch's hardtanh).

    The mask is read off the output, not the input: the pre-activation need not be
    kept for the backward pass, and the mask is a 1-byte bool tensor the reorder
    pass computes as soon as y exists, so a float activation is not kept either.
    """
    _, lo, hi = orig_call.args
    inside = R.logical_and(R.greater(orig_var, lo), R.less(orig_var, hi))
    zero = relax.const(0.0, orig_call.ty.dtype)
    return [R.where(inside, output_grad, zero), R.grad.no_grad(lo), R.grad.no_grad(hi)]


def _relu_grad(orig_var, orig_call, output_grad, ctx):
    """relu(x)' = g where y > 0, else 0: a bool mask of the output (see clip)."""
    zero = relax.const(0.0, orig_call.ty.dtype)
    return [R.where(R.greater(orig_var, zero), output_grad, zero)]


def _pad_grad(orig_var, orig_call, output_grad, ctx):
    """pad(x)' = the un-padded window of g."""
    x = orig_call.args[0]
    widths = [int(v) for v in orig_call.attrs.pad_width]
    shape = [int(d) for d in x.ty.shape]
    begin = widths[0::2]
    end = [b + n for b, n in zip(begin, shape)]
    grad = R.strided_slice(output_grad, axes=list(range(len(shape))), begin=begin, end=end)
    return [grad] + [R.grad.no_grad(arg) for arg in orig_call.args[1:]]


def _strided_slice_grad(orig_var, orig_call, output_grad, ctx):
    """slice(x)' = g placed back in a zero tensor of x's shape (unit strides)."""
    x, axes, begin, end = orig_call.args[:4]
    shape = [int(d) for d in x.ty.shape]
    widths = [0] * (2 * len(shape))
    for axis, b, e in zip(axes, begin, end):
        axis, b, e = int(axis.value), int(b.value), int(e.value)
        widths[2 * axis], widths[2 * axis + 1] = b, shape[axis] - min(e, shape[axis])
    return [R.nn.pad(output_grad, widths)] + [R.grad.no_grad(a) for a in orig_call.args[1:]]


register_gradient("relax.clip", _clip_grad, level=20)
register_gradient("relax.nn.relu", _relu_grad, level=20)
register_gradient("relax.strided_slice", _strided_slice_grad, level=20)
register_gradient("relax.nn.pad", _pad_grad, level=20)
