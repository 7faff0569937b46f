"""ReorderForMemory: each update runs as soon as its gradient exists, and a layer's
weight gradient runs before its input gradient, so gradient buffers and saved
activations die early (the paper's operator reordering).

The schedule is a topological sort of the train step's one dataflow block
that always picks, among the bindings whose inputs are ready, an *update
binding* first (one whose every consumer is an update binding or an updated
output: a weight gradient, the optimizer arithmetic), then the earliest in the
original order. An update that reads a parameter also waits for every other
reader of that parameter, so the new value can overwrite the old one in place
and the numbers are those of the unordered graph.

The pass works on any single-block ``train_step``: run again after FuseOps (which
places a fused group where its last member was), it restores the order on kernels.

Before (what Gradient + ApplyOptimizer emit: all gradients, then all updates)::

    gx2 = conv2d_transpose(g2, w2)      # input gradient of layer 2
    gw2 = conv2d(x2, g2)                # weight gradient of layer 2 (x2 alive until here)
    gw1 = conv2d(x1, gx2)
    w2_new = w2 - lr * gw2              # gw2 alive until here
    w1_new = w1 - lr * gw1

After::

    gw2 = conv2d(x2, g2)                # x2 dies
    gx2 = conv2d_transpose(g2, w2)
    w2_new = w2 - lr * gw2              # gw2 dies
    gw1 = conv2d(x1, gx2)
    w1_new = w1 - lr * gw1
"""

from __future__ import annotations

import heapq

import tvm
from tvm import relax

from .attrs import attr_names, updated_state
from .exprs import tensor_bytes


def _used_vars(expr) -> set:
    return set(relax.analysis.free_vars(expr))


def _shrinks(binding, bindings, deps) -> bool:
    """Its output is a bool mask, or smaller than an input it reads."""
    if str(getattr(binding.var.ty, "dtype", "")) == "bool":
        return True
    out = tensor_bytes(binding.var.ty)
    return any(tensor_bytes(bindings[j].var.ty) > out for j in deps)


def schedule(bindings: list, outputs: dict, params: set, loss) -> list[int]:
    """The new order of ``bindings`` (indices).

    ``outputs``: updated-value var → its parameter's group id (a weight and its
    optimizer state share one); ``params``: the trainable parameters; ``loss``:
    the loss var (what comes after it is the backward pass).
    """
    index = {b.var: i for i, b in enumerate(bindings)}
    deps = [{index[v] for v in _used_vars(b.value) if v in index} for b in bindings]
    reads = [{v for v in _used_vars(b.value) if v in params} for b in bindings]
    last = len(bindings) - 1  # the returned tuple: scheduled last, not a consumer
    consumers: list[set[int]] = [set() for _ in bindings]
    for i, d in enumerate(deps):
        for j in d:
            consumers[j].add(i)
    loss_at = index[loss]
    feeds: list[set] = [set() for _ in bindings]  # the parameter groups each binding serves
    feeds_loss = [False] * len(bindings)
    feeds_loss[loss_at] = True
    for i in range(last - 1, -1, -1):
        if bindings[i].var in outputs:
            feeds[i].add(outputs[bindings[i].var])
        for u in consumers[i] - {last}:
            feeds[i] |= feeds[u]
            feeds_loss[i] = feeds_loss[i] or feeds_loss[u]
    is_update = [len(feeds[i]) == 1 and not feeds_loss[i] for i in range(len(bindings))]
    for i in range(last):  # the binding that overwrites a parameter waits for the other
        if bindings[i].var not in outputs:  # readers of what its update work reads (that work
            continue  # itself may read it early: it writes elsewhere, e.g. new rows of a weight)
        read, stack, seen = set(), [i], {i}
        while stack:
            k = stack.pop()
            read |= reads[k]
            for j in deps[k]:
                if is_update[j] and j not in seen:
                    seen.add(j)
                    stack.append(j)
        for p in read:
            deps[i] |= {j for j in range(last) if p in reads[j] and not is_update[j]}
    backward = [False] * len(bindings)  # carries a gradient (the seed is ones_like(loss))
    for i in range(loss_at + 1, last):
        backward[i] = (not deps[i] and not is_update[i]) or any(backward[j] for j in deps[i])
    # priority: the original position, except that update work runs as soon as its
    # gradient inputs exist, and work after the loss that reads only forward values:
    # a mask (smaller than what it reads) runs as soon as its inputs exist so the
    # activation can die; anything else (a transpose of a saved activation) just
    # before its first consumer
    forward_reading = [i > loss_at and not backward[i] for i in range(len(bindings))]
    early = [forward_reading[i] and _shrinks(bindings[i], bindings, deps[i]) for i in range(len(bindings))]
    late = [forward_reading[i] and not early[i] for i in range(len(bindings))]
    base = [float(i) for i in range(len(bindings))]
    for i in range(last):
        if early[i]:
            base[i] = max((base[j] for j in deps[i]), default=base[i])
        elif is_update[i] and backward[i]:
            base[i] = max([base[j] for j in deps[i] if not late[j]], default=base[i])
    for i in range(last - 1, -1, -1):
        if late[i]:
            base[i] = min((base[c] for c in consumers[i] if c != last), default=base[i])
    waiting = [len(d) for d in deps]
    users = [set() for _ in bindings]
    for i, d in enumerate(deps):
        for j in d:
            users[j].add(i)
    ready = [(base[i], i) for i in range(last) if waiting[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0 and u != last:
                heapq.heappush(ready, (base[u], u))
    if len(order) != last:
        raise RuntimeError("ReorderForMemory: the dataflow block has a cycle")
    return order + [last]


@tvm.transform.module_pass(opt_level=0, name="ReorderForMemory")
class ReorderForMemory:
    def __init__(self, func: str = "train_step"):
        self.func = func

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = mod[self.func]
        block = func.body.blocks[0]
        bindings = list(block.bindings)
        result = bindings[-1]
        fields = list(result.value.fields)
        trainable = attr_names(func, "tinytrain.trainable")
        state = updated_state(func)
        params = set(func.params[2:2 + len(trainable)])
        groups = {v: k for k, v in enumerate(fields[1:1 + len(trainable)])}
        for name, var in zip(state, fields[1 + len(trainable):]):
            groups[var] = max(k for k, p in enumerate(trainable) if name.startswith(p + "."))
        order = schedule(bindings, groups, params, fields[0])
        new_block = relax.DataflowBlock([bindings[i] for i in order])
        body = relax.SeqExpr([new_block], func.body.body)
        out = tvm.IRModule(dict(mod.functions))
        new = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
        out[self.func] = new.with_attr("tinytrain.reordered", True)
        return out
