"""The conv and linear layers of a backbone, numbered from the input.

This numbering is the one the sparse-update scheme uses (as in the paper). It
is read off the IR, so it holds for any module built from the supported ops,
not only the ones this project's frontend wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from relay_passes.int8_ops import qconv_params, qop_name


@dataclass
class Layer:
    index: int
    kind: str  # "conv", "dwconv" or "linear"
    weight: str  # parameter name
    bias: str | None
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    macs: int
    source: str  # the node's name in the model file
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]


def _shape(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def backbone(mod: tvm.IRModule) -> relax.Function:
    names = [gv.name_hint for gv in mod.get_global_vars()]
    for name in ("predict", "main"):
        if name in names:
            return mod[name]
    raise ValueError(f"the module has no main or predict function (it has {', '.join(names)})")


def layer_table(mod: tvm.IRModule) -> list[Layer]:
    func = backbone(mod)
    params = {p: p.name for p in func.params[1:]}
    sources = dict(func.attrs["tinytrain.sources"]) if "tinytrain.sources" in func.attrs else {}
    bindings = [b for block in func.body.blocks for b in block.bindings]
    transposed = {  # lv = permute_dims(param): a linear layer's weight
        b.var: b.value.args[0] for b in bindings
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.permute_dims"
        and b.value.args[0] in params
    }
    layers: list[Layer] = []
    for b in bindings:
        call = b.value
        if not isinstance(call, relax.Call):
            continue
        weight = None
        qop = qop_name(call)
        if qop in ("tinytrain_qconv", "tinytrain_qlinear") and call.args[1][1] in params:
            weight = call.args[1][1]
            w_shape, out = _shape(weight), _shape(b.var)
            groups = qconv_params(call).groups
            if qop == "tinytrain_qlinear":
                kind, macs = "linear", int(np.prod(out)) * w_shape[1]
            else:
                kind = "dwconv" if groups > 1 and w_shape[1] == 1 else "conv"
                macs = int(np.prod(out)) * int(np.prod(w_shape[1:]))
        elif not isinstance(call.op, tvm.ir.Op) or qop is not None:
            continue
        elif call.op.name == "relax.nn.conv2d" and call.args[1] in params:
            weight = call.args[1]
            w_shape, out = _shape(weight), _shape(b.var)
            groups = int(call.attrs.groups)
            kind = "dwconv" if groups > 1 and w_shape[1] == 1 else "conv"
            macs = int(np.prod(out)) * int(np.prod(w_shape[1:]))
        elif call.op.name == "relax.matmul" and call.args[1] in transposed:
            weight = transposed[call.args[1]]
            w_shape, out = _shape(weight), _shape(b.var)
            kind, macs = "linear", int(np.prod(out)) * w_shape[1]
        if weight is None:
            continue
        if qop is None:
            groups = int(call.attrs.groups) if kind != "linear" else 1
        name = params[weight]
        prefix = name.rsplit(".", 1)[0]
        bias = prefix + ".bias" if prefix + ".bias" in params.values() else None
        layers.append(Layer(len(layers), kind, name, bias, w_shape, out, macs,
                            str(sources.get(prefix, prefix)), groups))
    return layers


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def format_table(layers: list[Layer], params: dict[str, np.ndarray] | None = None) -> str:
    rows = [f"{'#':>3}  {'kind':<7}{'weight':<18}{'weight shape':<18}{'output':<18}"
            f"{'MACs':>10}  source"]
    for layer in layers:
        rows.append(
            f"{layer.index:>3}  {layer.kind:<7}{layer.weight:<18}"
            f"{'x'.join(map(str, layer.weight_shape)):<18}"
            f"{'x'.join(map(str, layer.output_shape)):<18}{layer.macs:>10,}  {layer.source}"
        )
    total = sum(layer.macs for layer in layers)
    rows.append(f"{len(layers)} layers, {total:,} MACs")
    if params is not None:
        n = sum(int(v.size) for v in params.values())
        size = sum(int(np.asarray(v).nbytes) for v in params.values())
        kinds = "/".join(sorted({str(np.asarray(v).dtype) for v in params.values()}))
        rows[-1] += f", {n:,} parameters ({size / 1024:.1f} KB, {kinds})"
    return "\n".join(rows)
