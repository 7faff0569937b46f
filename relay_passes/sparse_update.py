"""SplitPartialWeights: a layer that updates k of its C_out output channels gets
two weights, the k trainable channels and the C_out − k frozen ones.

Only the trainable slice then has a gradient, and Relax's Gradient computes it
from the slice of the output gradient it needs (the adjoint of ``concat`` is a
split): the gradient of the k channels, never a full gradient then a slice.
The trainable slice lives in SRAM; the frozen rest stays in flash.

Before (``{"conv3.weight": 4}``, a 1×1 conv with 16 output channels)::

    y = R.nn.conv2d(x, conv3.weight)                    # conv3.weight: (16, 8, 1, 1)

After::

    y0 = R.nn.conv2d(x, conv3.weight[:4])               # (4, 8, 1, 1), trainable
    y1 = R.nn.conv2d(x, conv3.weight[4:])               # (12, 8, 1, 1), frozen
    y = R.concat((y0, y1), axis=1)

A grouped or depthwise conv is split at a group boundary (k rounds up to a
whole number of groups) and its input is sliced to match; a linear layer
splits its ``matmul`` the same way along the output features. The function's
attribute ``tinytrain.split`` maps each split weight to k.
"""

from __future__ import annotations

from dataclasses import replace

import tvm
from tvm import relax
from tvm.relax import op as R
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import int8_ops


def trainable_slice_name(weight: str, k: int) -> str:
    return f"{weight}[:{k}]"


def frozen_slice_name(weight: str, k: int) -> str:
    return f"{weight}[{k}:]"


def rounded_channels(weight_shape, groups: int, k: int) -> int:
    """k rounded up to whole groups (a depthwise conv with multiplier m: multiples of m)."""
    if groups == 1:
        return k
    per_group = int(weight_shape[0]) // groups
    return -(-k // per_group) * per_group


@mutator
class _Splitter(PyExprMutator):
    def __init__(self, mod, channels: dict[str, int]):
        super().__init__(mod)
        self.channels = channels
        self.pieces: dict[relax.Var, tuple[relax.Var, relax.Var, int]] = {}
        self.transposed: dict[relax.Var, relax.Var] = {}

    def split_params(self, func: relax.Function) -> list[relax.Var]:
        params = [func.params[0]]
        for p in func.params[1:]:
            if p.name in self.channels:
                shape = [int(d) for d in p.ty.shape]
                k = self.channels[p.name]
                t_shape, f_shape = [k, *shape[1:]], [shape[0] - k, *shape[1:]]
                t = relax.Var(trainable_slice_name(p.name, k), relax.TensorType(t_shape, p.ty.dtype))
                f = relax.Var(frozen_slice_name(p.name, k), relax.TensorType(f_shape, p.ty.dtype))
                self.pieces[p] = (t, f, k)
                params += [t, f]
            else:
                params.append(p)
        return params

    def visit_var_binding_(self, binding) -> None:
        call = binding.value
        if isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.permute_dims") \
                and call.args[0] in self.pieces:
            self.transposed[binding.var] = call.args[0]  # rebuilt at the matmul
            return
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        if int8_ops.qop_name(call) in ("tinytrain_qconv", "tinytrain_qlinear") \
                and call.args[1][1] in self.pieces:
            return self._quantized(call)
        if call.op == tvm.ir.Op.get("relax.nn.conv2d") and call.args[1] in self.pieces:
            return self._conv(call)
        if call.op == tvm.ir.Op.get("relax.matmul") and call.args[1] in self.transposed:
            t, f, _ = self.pieces[self.transposed[call.args[1]]]
            x = self.visit_expr(call.args[0])
            y0 = self.builder_.emit(R.matmul(x, R.permute_dims(t)))
            y1 = self.builder_.emit(R.matmul(x, R.permute_dims(f)))
            return R.concat([y0, y1], axis=-1)
        return super().visit_call_(call)

    def _quantized(self, call):
        """An int8 layer: two kernels, each with its channels' bias and requantization."""
        t, f, k = self.pieces[call.args[1][1]]
        x, w, b = (self.visit_expr(call.args[1][i]) for i in range(3))
        q = int8_ops.qconv_params(call)
        c_out = int(w.ty.shape[0])
        b0 = self.builder_.emit(R.strided_slice(b, axes=[0], begin=[0], end=[k]))
        b1 = self.builder_.emit(R.strided_slice(b, axes=[0], begin=[k], end=[c_out]))
        q0, q1 = q.channels(0, k), q.channels(k, c_out)
        if int8_ops.qop_name(call) == "tinytrain_qlinear":
            y0 = int8_ops.emit_qlinear(self.builder_, x, t, b0, q0)
            y1 = int8_ops.emit_qlinear(self.builder_, x, f, b1, q1)
            return R.concat([y0, y1], axis=-1)
        x0 = x1 = x
        if q.groups > 1:
            per_group_out = c_out // q.groups
            groups_t = k // per_group_out
            split = groups_t * (int(x.ty.shape[1]) // q.groups)
            x0 = self.builder_.emit(R.strided_slice(x, axes=[1], begin=[0], end=[split]))
            x1 = self.builder_.emit(R.strided_slice(x, axes=[1], begin=[split], end=[int(x.ty.shape[1])]))
            q0, q1 = replace(q0, groups=groups_t), replace(q1, groups=q.groups - groups_t)
        y0 = int8_ops.emit_qconv(self.builder_, x0, t, b0, q0)
        y1 = int8_ops.emit_qconv(self.builder_, x1, f, b1, q1)
        return R.concat([y0, y1], axis=1)

    def _conv(self, call):
        t, f, k = self.pieces[call.args[1]]
        a = call.attrs
        x = self.visit_expr(call.args[0])
        kw = dict(strides=a.strides, padding=a.padding, dilation=a.dilation)
        groups = int(a.groups)
        if groups == 1:
            y0 = self.builder_.emit(R.nn.conv2d(x, t, groups=1, **kw))
            y1 = self.builder_.emit(R.nn.conv2d(x, f, groups=1, **kw))
        else:
            c_in = int(x.ty.shape[1])
            per_group_out = int(call.args[1].ty.shape[0]) // groups
            if k % per_group_out:
                raise ValueError(
                    f"{call.args[1].name}: {k} channels do not end on a group boundary "
                    f"({per_group_out} output channels per group); round k with rounded_channels()"
                )
            groups_t = k // per_group_out
            split = groups_t * (c_in // groups)
            x0 = self.builder_.emit(R.strided_slice(x, axes=[1], begin=[0], end=[split]))
            x1 = self.builder_.emit(R.strided_slice(x, axes=[1], begin=[split], end=[c_in]))
            y0 = self.builder_.emit(R.nn.conv2d(x0, t, groups=groups_t, **kw))
            y1 = self.builder_.emit(R.nn.conv2d(x1, f, groups=groups - groups_t, **kw))
        return R.concat([y0, y1], axis=1)


@tvm.transform.module_pass(opt_level=0, name="SplitPartialWeights")
class SplitPartialWeights:
    def __init__(self, channels: dict[str, int], func: str = "main"):
        self.channels, self.func = dict(channels), func

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not self.channels:
            return mod
        func = mod[self.func]
        splitter = _Splitter(mod, self.channels)
        params = splitter.split_params(func)
        body = splitter.visit_expr(func.body)
        new = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
        new = new.with_attr("tinytrain.split", {k: v for k, v in self.channels.items()})
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        existing = {gv.name_hint for gv in mod.functions}
        for gv, kernel in splitter.builder_.get().functions.items():  # the kernels an int8 split added
            if isinstance(kernel, tvm.tirx.PrimFunc) and gv.name_hint not in existing:
                out[gv] = kernel
        out[self.func] = new
        return relax.transform.Normalize()(out)
