"""ChunkBottlenecks: run a frozen conv → act → depthwise → act → 1×1 conv chain a few
channels at a time, so its wide middle tensors never exist whole.

The depthwise conv works channel by channel and the 1×1 projection is a sum over
its input channels, so the chain splits exactly along the middle channels:
``project(dw(expand(x))) = Σ_g project_g(dw_g(expand_g(x)))``. Each chunk's
expansion output dies as soon as its depthwise output exists. This is what
bounds the forward peak of a mobile network (MobileNetV2's first expansion is
48×64×64 floats, 768 KB, at 128×128); only frozen chains are chunked, so no
gradient or saved activation changes.

Before (middle channels C = 48, two chunks for the example)::

    e = R.clip(R.add(R.nn.conv2d(x, w1), R.reshape(b1, (1, 48, 1, 1))), 0, 6)
    d = R.clip(R.add(R.nn.conv2d(e, w2, groups=48), R.reshape(b2, (1, 48, 1, 1))), 0, 6)
    p = R.nn.conv2d(d, w3)

After::

    e0 = R.clip(R.add(R.nn.conv2d(x, w1[0:24]), b1[0:24]), 0, 6)
    d0 = R.clip(R.add(R.nn.conv2d(e0, w2[0:24], groups=24), b2[0:24]), 0, 6)
    p0 = R.nn.conv2d(d0, w3[:, 0:24])
    e1 = ...                                  # channels 24..48
    p = R.call_tir_inplace(conv1x1_accumulate, (p0, d1, w3[:, 24:48]), [0])   # p0 += ...

(``w[a:b]`` is ``R.strided_slice`` of the frozen weight: a view in flash.) Only
chains whose middle tensor is wide and far larger than their weights, and that no
gradient reaches, are chunked (their input depends on no learning
parameter), as the in-place accumulation has no registered gradient.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import op as R
from tvm.relax.op import register_gradient
from tvm.script import tirx as T  # noqa: F401  (the namespace the TVMScript below uses)

from .exprs import learning_reach, tensor_bytes, use_counts

CONV = "relax.nn.conv2d"
ACTS = ("relax.nn.relu", "relax.clip")


def _op(value) -> str:
    return getattr(getattr(value, "op", None), "name", "") if isinstance(value, relax.Call) else ""


def _chunks(channels: int, nbytes: int, target: int) -> int:
    """The fewest chunks (a divisor of ``channels``) that bring one chunk under ``target``."""
    for g in range(1, channels + 1):
        if channels % g == 0 and nbytes // g <= target:
            return g
    return channels


class _Chain:
    """expand conv → bias → act → depthwise conv → bias → act → 1×1 conv, matched by vars."""

    def __init__(self, defs: dict, uses: dict, frozen: set, project_binding):
        self.ok = False
        c3 = project_binding.value
        if _op(c3) != CONV or int(c3.attrs.groups) != 1 or c3.args[1] not in frozen:
            return
        if [int(d) for d in c3.args[1].ty.shape][2:] != [1, 1]:
            return
        a = c3.attrs
        if [int(v) for v in a.strides] != [1, 1] or any(int(v) for v in a.padding):
            return
        steps = []
        var = c3.args[0]
        for _ in range(2):  # walk down: act ← add ← conv (+ reshape of a bias)
            act = defs.get(var)
            if act is None or _op(act) not in ACTS or uses.get(var) != 1:
                return
            add = defs.get(act.args[0])
            if add is None or _op(add) != "relax.add" or uses.get(act.args[0]) != 1:
                return
            conv_var, shaped = add.args
            conv, reshape = defs.get(conv_var), defs.get(shaped)
            if conv is None or _op(conv) != CONV or uses.get(conv_var) != 1:
                return
            if reshape is None or _op(reshape) != "relax.reshape" or reshape.args[0] not in frozen:
                return
            if conv.args[1] not in frozen:
                return
            steps.append((var, act, act.args[0], conv_var, conv, shaped, reshape.args[0]))
            var = conv.args[0]
        (self.d, self.act2, _, _, self.dw, _, self.b2), (self.e, self.act1, _, _, self.c1, _, self.b1) = steps
        channels = int(self.e.ty.shape[1])
        w2 = self.dw.args[1]
        if int(self.dw.attrs.groups) != channels or int(w2.ty.shape[0]) != channels:
            return
        if int(self.c1.attrs.groups) != 1:
            return
        self.x, self.project = self.c1.args[0], c3
        self.skip = {s[i] for s in steps for i in (0, 2, 3, 5)}
        self.ok = True


_ACCUMULATE = """
@T.prim_func(private=True, s_tir=True)
def conv1x1_accumulate(acc: T.Buffer(({n}, {o}, {h}, {w}), "{dt}"), d: T.Buffer(({n}, {c}, {h}, {w}), "{dt}"),
                       k: T.Buffer(({o}, {c}, 1, 1), "{dt}")):
    T.func_attr({{"tirx.noalias": True}})
    for n, o, h, x, c in T.grid({n}, {o}, {h}, {w}, {c}):
        with T.sblock("acc"):
            vn, vo, vh, vx, vc = T.axis.remap("SSSSR", [n, o, h, x, c])
            T.reads(acc[vn, vo, vh, vx], d[vn, vc, vh, vx], k[vo, vc, 0, 0])
            T.writes(acc[vn, vo, vh, vx])
            acc[vn, vo, vh, vx] = acc[vn, vo, vh, vx] + d[vn, vc, vh, vx] * k[vo, vc, 0, 0]
"""


def _accumulate_func(acc_ty, d_ty):
    """``acc += conv1x1(d, k)`` written into ``acc`` (for ``call_tir_inplace``)."""
    n, o, h, w = (int(v) for v in acc_ty.shape)
    c = int(d_ty.shape[1])
    return tvm.script.from_source(_ACCUMULATE.format(n=n, o=o, h=h, w=w, c=c, dt=acc_ty.dtype))


def _slice(x, axis: int, lo: int, hi: int):
    return R.strided_slice(x, axes=[axis], begin=[lo], end=[hi])


def _act(original: relax.Call, x):
    if _op(original) == "relax.clip":
        return R.clip(x, original.args[1], original.args[2])
    return R.nn.relu(x)


def _conv(original: relax.Call, x, w, groups: int):
    a = original.attrs
    return R.nn.conv2d(x, w, strides=a.strides, padding=a.padding, dilation=a.dilation, groups=groups)


def _worth_it(chain: _Chain, target: int) -> bool:
    """A wide middle tensor and small weights: each chunk copies a slice of the
    weights, which only pays where activations dwarf them (the early layers)."""
    weights = sum(tensor_bytes(w.ty) for w in (chain.c1.args[1], chain.dw.args[1], chain.project.args[1]))
    return tensor_bytes(chain.e.ty) > max(target, 8 * weights)


FROZEN_INPLACE = ("conv1x1_accumulate", "write_rows")  # this pass's and BandFrozenChains' kernels


def _accumulate_grad(orig_var, orig_call, output_grad, ctx):
    """Only chains no gradient reaches are chunked or banded: their inputs need none."""
    name = orig_call.args[0].name_hint
    if not name.startswith(FROZEN_INPLACE):
        raise ValueError(f"no gradient is registered for call_tir_inplace of {name}")
    return [R.grad.no_grad(arg) for arg in orig_call.args]


register_gradient("relax.call_tir_inplace", _accumulate_grad, level=20)


@tvm.transform.module_pass(opt_level=0, name="ChunkBottlenecks")
class ChunkBottlenecks:
    def __init__(self, frozen: set[str], target_bytes: int = 16 * 1024, func: str = "main"):
        self.frozen_names, self.target, self.func = set(frozen), target_bytes, func

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        f = mod[self.func]
        if len(f.body.blocks) != 1:
            return mod
        bindings = list(f.body.blocks[0].bindings)
        frozen = {p for p in f.params if p.name in self.frozen_names}
        defs = {b.var: b.value for b in bindings}
        uses = use_counts(f)
        learning = learning_reach(f, frozen)
        chains, taken = {}, set()
        for b in bindings:
            chain = _Chain(defs, uses, frozen, b)
            if not chain.ok or chain.x in learning or not _worth_it(chain, self.target):
                continue
            if (chain.skip | {b.var}) & taken:  # MobileNetV1: a projection is also an expansion
                continue
            chains[b.var] = chain
            taken |= chain.skip | {b.var}
        if not chains:
            return mod
        skip = set().union(*(c.skip for c in chains.values()))
        bb = relax.BlockBuilder()
        with bb.function(self.func, list(f.params)):
            with bb.dataflow():
                for b in bindings:
                    if b.var in skip:
                        continue
                    if b.var in chains:
                        self._emit_chunks(bb, chains[b.var], b.var)
                    else:
                        bb.emit_normalized(b)
                out = f.body.body
            bb.emit_func_output(out)
        built = bb.get()
        result = tvm.IRModule(dict(mod.functions))
        for gv, func in built.functions.items():
            if gv.name_hint != self.func:
                result[gv] = func
        new = built[self.func]
        result[self.func] = relax.Function(new.params, new.body, new.ret_ty, new.is_pure, f.attrs)
        return result

    def _emit_chunks(self, bb, chain: _Chain, out_var) -> None:
        channels = int(chain.e.ty.shape[1])
        groups = _chunks(channels, tensor_bytes(chain.e.ty), self.target)
        step = channels // groups
        w1, w2, w3 = chain.c1.args[1], chain.dw.args[1], chain.project.args[1]
        acc = None
        for g in range(groups):
            lo, hi = g * step, (g + 1) * step
            e = bb.emit(_conv(chain.c1, chain.x, bb.emit(_slice(w1, 0, lo, hi)), 1))
            b1 = bb.emit(R.reshape(_slice(chain.b1, 0, lo, hi), (1, step, 1, 1)))
            e = bb.emit(_act(chain.act1, bb.emit(R.add(e, b1))))
            d = bb.emit(_conv(chain.dw, e, bb.emit(_slice(w2, 0, lo, hi)), step))
            b2 = bb.emit(R.reshape(_slice(chain.b2, 0, lo, hi), (1, step, 1, 1)))
            d = bb.emit(_act(chain.act2, bb.emit(R.add(d, b2))))
            k = bb.emit(_slice(w3, 1, lo, hi))
            if acc is None:
                acc = bb.emit(_conv(chain.project, d, k, 1))
            else:
                gv = bb.add_func(_accumulate_func(acc.ty, d.ty), "conv1x1_accumulate")
                acc = bb.emit(R.call_tir_inplace(gv, (acc, d, k), [0], acc.ty))
        bb.emit_normalized(relax.VarBinding(out_var, acc))
