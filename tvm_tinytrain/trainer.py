"""The host trainer: a TinyTrain IRModule compiled by TVM for this machine.

Used for accuracy runs, the scheme search and as the numerical reference of
the C path. Samples come in the model file's own layout and dtype, batch 1.

For the scheme search, one build serves many schemes: ``export_library`` / ``library=`` skip
the compile, and ``mask`` keeps the updates of the parameters (and output channels) a scheme
trains and drops the rest (``tvm_tinytrain.search.masks``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from relay_passes.attrs import LEARNING_RATE, attr_names, updated_state
from relay_passes.sparse_update import frozen_slice_name, trainable_slice_name

from .errors import InputError, NonFiniteError, TinyTrainError
from .quantize import input_quantization, reconstruction_target


def split_params(params: dict[str, np.ndarray], splits: dict[str, int]) -> dict[str, np.ndarray]:
    """The parameter dict as a module with partial updates takes it (split weights)."""
    if not splits:
        return params
    out = {n: v for n, v in params.items() if n not in splits}
    for name, k in splits.items():
        out[trainable_slice_name(name, k)] = params[name][:k]
        out[frozen_slice_name(name, k)] = params[name][k:]
    return out


LR_SCHEDULES = ("constant", "cosine")


def cosine_learning_rate(base: float, step: int, total: int) -> float:
    """The learning rate of step ``step`` (0-based) of ``total`` under cosine decay from
    ``base`` towards 0: ``base · ½(1 + cos(π · step / total))``."""
    return 0.5 * base * (1.0 + math.cos(math.pi * step / max(total, 1)))


def checked_learning_rate(lr) -> float:
    """``lr`` as a float, or an InputError when it is not a finite number >= 0."""
    lr = float(lr)
    if not (np.isfinite(lr) and lr >= 0):
        raise InputError(f"learning rate must be a finite number >= 0, got {lr}")
    return lr


def checked_sample(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` as a contiguous array of the model's input ``dtype``, or an InputError for what a
    cast would silently change: inf / NaN, float data for an int8 model, integers out of range."""
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise InputError(f"input has dtype {x.dtype}; expected {dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        where = np.argwhere(~np.isfinite(x))[0].tolist()
        raise InputError(f"input holds {int(np.size(x) - np.count_nonzero(np.isfinite(x)))} inf/NaN "
                         f"values (first at index {where}); clean or drop the sample")
    if np.issubdtype(np.dtype(dtype), np.integer):
        if np.issubdtype(x.dtype, np.floating):
            raise InputError(f"input is {x.dtype} data for a model that takes {dtype}: quantize it with "
                             "tt.quantize_input(mod, x) (the model's own input scale)")
        info = np.iinfo(dtype)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise InputError(f"input values {x.min()}..{x.max()} do not fit {dtype} "
                             f"({info.min}..{info.max}); quantize float data with tt.quantize_input(mod, x)")
    return np.ascontiguousarray(x, dtype)


def nonfinite_message(step: int, tensor: str, count: int, lr: float) -> str:
    """What NonFiniteError says: which step, which tensor, and the way out."""
    what = {"loss": "the loss is", "input": "the sample is"}.get(tensor) or \
        f"{count or 'some'} value(s) of the update of {tensor} are"
    return (f"step {step}: {what} inf/NaN; the step was not applied (parameters and optimizer state "
            f"unchanged): lower the learning rate (now {lr:g})")


class HostTrainer:
    """``step(x, y) -> loss``, ``predict(x)``, ``evaluate(xs, ys)``, ``params()``."""

    def __init__(self, train_mod: tvm.IRModule, params: dict[str, np.ndarray], target: str = "llvm",
                 library: str | Path | None = None, hand_kernels: bool = True):
        """``library``: a file ``export_library`` wrote for this same ``train_mod``, loaded
        instead of compiling (``compile_seconds`` is then 0). ``hand_kernels``: the int8 forward
        runs the hand-written C kernels the C artifact runs (compiled once with the host C
        compiler, ``codegen.host_library``), else TVM's own kernels of the same ops."""
        names = {gv.name_hint for gv in train_mod.get_global_vars()}
        if not {"train_step", "predict"} <= names:
            raise TinyTrainError(
                "build() takes the module TinyTrain returns (with train_step and predict); "
                "run tvm_tinytrain.relay.transform.TinyTrain(...)(mod) first"
            )
        step = train_mod["train_step"]
        predict = train_mod["predict"]
        self.predict_function = predict
        self.trainable = attr_names(step, "tinytrain.trainable")
        self.state_names = attr_names(step, "tinytrain.state")
        self.updated_state = updated_state(step)  # all but the learning rate
        self.loss_kind = str(step.attrs["tinytrain.loss"])
        self.param_names = [p.name for p in predict.params[1:]]
        self.splits = {str(k): int(v) for k, v in predict.attrs["tinytrain.split"].items()} \
            if "tinytrain.split" in predict.attrs else {}
        params = split_params(params, self.splits)
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise TinyTrainError(f"params lacks {', '.join(missing[:5])}: pass the dict load_model returned")
        self.frozen = [p.name for p in step.params[2 + len(self.trainable) + len(self.state_names):]]
        x_ty = predict.params[0].ty
        self.input_shape = tuple(int(d) for d in x_ty.shape)
        self.input_dtype = str(x_ty.dtype)
        self.label_shape = tuple(int(d) for d in step.params[1].ty.shape)
        self.output_shape = tuple(int(d) for d in predict.ret_ty.shape)
        self.num_classes = self.output_shape[-1]
        self.device = tvm.cpu()
        t0 = time.perf_counter()
        if hand_kernels:
            from .codegen.host_library import with_hand_kernels  # codegen imports this module

            train_mod = with_hand_kernels(train_mod)  # before a compile or a load: their symbols
        if library is None:
            from .codegen.set_aside import tir_pipeline

            self.executable = tvm.compile(train_mod, target=target, tir_pipeline=tir_pipeline())
            self.compile_seconds = time.perf_counter() - t0
            self.vm = relax.VirtualMachine(self.executable, self.device)
        else:
            self.executable, self.vm = _load_library(library, step, predict, self.device)
            self.compile_seconds = 0.0
        dtypes = {p.name: str(p.ty.dtype) for p in predict.params[1:]}
        self._values = {n: tvm.runtime.tensor(np.asarray(params[n], dtypes[n]), self.device)
                        for n in self.param_names}
        init = step.attrs["tinytrain.state_init"] if self.state_names else {}
        for name, var in zip(self.state_names,
                             step.params[2 + len(self.trainable):][:len(self.state_names)]):
            shape = tuple(int(d) for d in var.ty.shape)
            fill = np.full(shape, float(init[name]), np.float32)
            self._values[name] = tvm.runtime.tensor(fill, self.device)
        if library is not None:
            self._probe(library)
        self._initial = {n: v.numpy() for n, v in self._values.items()}
        self.steps_done = 0  # training steps applied
        self._mask: dict[str, int | None] | None = None
        self._kept: dict[str, int | None] = {}  # output name → rows kept (None: all, 0: none)

    def _probe(self, library) -> None:
        """Run the loaded ``predict`` once on a zero sample: a library built for a model whose
        parameters have other shapes fails here, in one line, and not in the first step."""
        x = tvm.runtime.tensor(np.zeros(self.input_shape, self.input_dtype), self.device)
        try:
            out = self.vm["predict"](x, *[self._values[n] for n in self.param_names])
            shape = tuple(out.shape)
        except Exception as err:  # TVM names the argument whose shape or dtype differs
            first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(" when calling")[0]
            raise TinyTrainError(f"library {library} was built for another model ({first[:160]}); "
                                 "rebuild it from this module") from None
        if shape != self.output_shape:
            raise TinyTrainError(f"library {library} was built for another model (its predict gives "
                                 f"{shape}, this module {self.output_shape}); rebuild it from this module")

    def export_library(self, path: str | Path) -> Path:
        """Write the compiled step to ``path`` (a shared library) for ``HostTrainer(..., library=path)``."""
        self.executable.export_library(str(path))
        return Path(path)

    def reset(self) -> None:
        """Back to the parameters it was built with and a fresh optimizer state (no recompile)."""
        self._values = {n: tvm.runtime.tensor(v, self.device) for n, v in self._initial.items()}
        self.steps_done = 0

    # ---- update mask -------------------------------------------------------
    @property
    def mask(self) -> dict[str, int | None] | None:
        """Which updates a step keeps: ``{trainable name: channels | None}``, or None (all).

        A trainable parameter not in the mask keeps its value and its optimizer state; one
        with k channels takes the update of its first k output channels (rows along axis 0,
        the output channels of every conv, depthwise and linear weight inside) and of their
        optimizer state, the other rows as they were; None takes the whole update. The
        learning rate is not masked; ``reset()`` keeps the mask."""
        return None if self._mask is None else dict(self._mask)

    @mask.setter
    def mask(self, mask: dict[str, int | None] | None) -> None:
        if mask is None:
            self._mask, self._kept = None, {}
            return
        if not isinstance(mask, dict):
            raise InputError(f"mask must be a dict {{trainable name: channels or None}} or None, "
                             f"not {type(mask).__name__}")
        checked: dict[str, int | None] = {}
        for name, channels in dict(mask).items():
            if name not in self.trainable:
                more = " ..." if len(self.trainable) > 6 else ""
                raise InputError(f"mask names {name!r}, which this step does not train; it trains "
                                 f"{', '.join(self.trainable[:6])}{more}")
            rows = int(self._values[name].shape[0]) if self._values[name].shape else 1
            if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int)
                                         or not 1 <= channels <= rows):
                raise InputError(f"mask of {name!r} is {channels!r}; give None (all) or a number of "
                                 f"output channels in 1..{rows}")
            checked[name] = None if channels == rows else channels
        kept = {name: checked.get(name, 0) for name in self.trainable}
        for state in self.updated_state:
            owner, _ = state.rsplit(".", 1)  # optimizer state is named "<parameter>.<kind>"
            rows = kept[owner]
            kept[state] = None if rows and not self._values[state].shape else rows  # a scalar: whole
        self._mask, self._kept = checked, kept

    # ---- input checks ------------------------------------------------------
    def _sample(self, x) -> tvm.runtime.Tensor:
        x = np.asarray(x)
        if x.shape == self.input_shape[1:]:
            x = x[None]
        if x.shape != self.input_shape:
            raise InputError(
                f"input has shape {x.shape}; this model takes {self.input_shape} "
                f"({self.input_dtype}, the model file's own layout), batch 1"
            )
        return tvm.runtime.tensor(checked_sample(x, self.input_dtype), self.device)

    def _label(self, y) -> tvm.runtime.Tensor:
        if self.loss_kind == "cross_entropy":
            y_arr = np.asarray(y).reshape(-1)
            if y_arr.size != 1 or not np.issubdtype(y_arr.dtype, np.integer):
                raise InputError(f"label {y!r} must be one integer class index")
            if not 0 <= int(y_arr[0]) < self.num_classes:
                raise InputError(
                    f"label {int(y_arr[0])} is out of range: the model has {self.num_classes} "
                    f"classes (0..{self.num_classes - 1})"
                )
            return tvm.runtime.tensor(y_arr.astype(np.int64), self.device)
        y_arr = np.asarray(y, np.float32).reshape(-1)
        if not np.all(np.isfinite(y_arr)):
            raise InputError("target holds inf/NaN values; clean or drop the sample")
        if y_arr.size != int(np.prod(self.label_shape)):
            raise InputError(f"target has {y_arr.size} values; the model outputs {self.label_shape}")
        return tvm.runtime.tensor(y_arr.reshape(self.label_shape), self.device)

    # ---- training ----------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        """The learning rate of the next steps: the optimizer's ``lr`` until set (a schedule
        sets it between steps; no recompile)."""
        return float(self._values[LEARNING_RATE].numpy())

    @learning_rate.setter
    def learning_rate(self, lr: float) -> None:
        lr = checked_learning_rate(lr)
        self._values[LEARNING_RATE] = tvm.runtime.tensor(np.array(lr, np.float32), self.device)

    def step(self, x, y=None) -> float:
        """One training step on one sample; returns the loss before the update. With the
        ``mse`` loss and no ``y``, the target is the input itself (an autoencoder)."""
        args = [self._sample(x), self._label(self.reconstruction_target(x) if y is None else y)]
        args += [self._values[n] for n in (*self.trainable, *self.state_names, *self.frozen)]
        return self._apply(self.vm["train_step"](*args))

    def _apply(self, out) -> float:
        """Keep a step's new parameters and state (what the mask keeps of them), or raise
        NonFiniteError and keep the old ones."""
        names = ("loss", *self.trainable, *self.updated_state)
        updates = {}
        for name, value in zip(names, out, strict=True):
            rows = self._kept.get(name)  # None: all (no mask, the loss), 0: none, k: rows [:k]
            if rows == 0:
                continue
            new = value.numpy()
            kept = new if rows is None else new[:rows]
            bad = int(kept.size - np.count_nonzero(np.isfinite(kept)))
            if bad:
                raise NonFiniteError(nonfinite_message(self.steps_done, name, bad, self.learning_rate))
            if rows is not None:  # a partial update: the first rows new, the rest as they were
                merged = self._values[name].numpy()
                merged[:rows] = new[:rows]
                value = tvm.runtime.tensor(merged, self.device)
            updates[name] = value
        loss = float(updates.pop("loss").numpy())
        self._values.update(updates)
        self.steps_done += 1
        return loss

    def predict(self, x) -> np.ndarray:
        """The logits for one sample, shape (1, classes)."""
        out = self.vm["predict"](self._sample(x), *[self._values[n] for n in self.param_names]).numpy()
        if not np.all(np.isfinite(out)):
            bad = [n for n in self.param_names if not np.all(np.isfinite(self._values[n].numpy()))]
            raise NonFiniteError(f"the logits are inf/NaN ({', '.join(bad[:5]) or 'no parameter'} holds "
                                 "inf/NaN): the model's parameters or this sample are out of range")
        return out

    def reconstruction_target(self, x) -> np.ndarray:
        """What an autoencoder reproduces: its input, as float (an int8 input dequantized with
        the model's input scale), shaped like the output."""
        if self.loss_kind != "mse":
            raise InputError(f"a {self.loss_kind} step needs a label; only an mse model trains on its "
                             "own input (an autoencoder)")
        return reconstruction_target(x, self.output_shape, input_quantization(self))

    def anomaly_score(self, x) -> float:
        """An autoencoder's reconstruction error of one sample, ``mean((predict(x) − x)²)``: what
        an anomaly-detection device reports (high = unlike what it learned)."""
        target = self.reconstruction_target(x)
        return float(np.mean((self.predict(x).astype(np.float64) - target) ** 2))

    def evaluate(self, xs, ys) -> float:
        """Top-1 accuracy over a stack of samples (xs[i] is one sample)."""
        xs, ys = np.asarray(xs), np.asarray(ys).reshape(-1)
        if len(xs) != len(ys):
            raise InputError(f"{len(xs)} samples but {len(ys)} labels")
        if len(ys) == 0:
            raise InputError("evaluate() needs at least one sample")
        if not np.issubdtype(ys.dtype, np.integer):
            raise InputError(
                f"labels must be integer class indices; got dtype {ys.dtype} (first: {ys[0]!r})"
            )
        if ys.min() < 0 or ys.max() >= self.num_classes:
            raise InputError(
                f"labels must be in 0..{self.num_classes - 1}; got {ys.min()}..{ys.max()}"
            )
        hits = sum(int(np.argmax(self.predict(x)) == y) for x, y in zip(xs, ys))
        return hits / len(ys)

    def fit(self, xs, ys, epochs: int = 1, seed: int = 0,
            progress: Callable[[int, int, float], None] | None = None,
            lr_schedule: str = "constant", steps: int | None = None) -> list[float]:
        """Loop over the samples, shuffled each epoch; returns the losses.

        ``lr_schedule``: ``"constant"`` (the learning rate as it is) or ``"cosine"`` (from the
        current learning rate down to 0 over the run, as the paper trains; set back after).
        ``steps``: train on this many samples instead of ``epochs × len(ys)``, the last
        epoch cut short."""
        if lr_schedule not in LR_SCHEDULES:
            raise InputError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {lr_schedule!r}")
        rng = np.random.default_rng(seed)
        losses, total = [], epochs * len(ys) if steps is None else steps
        base = self.learning_rate
        while len(losses) < total:
            for i in rng.permutation(len(ys))[:total - len(losses)]:
                if lr_schedule == "cosine":
                    self.learning_rate = cosine_learning_rate(base, len(losses), total)
                losses.append(self.step(xs[i], ys[i]))
                if progress:
                    progress(len(losses), total, losses[-1])
        self.learning_rate = base
        return losses

    def params(self) -> dict[str, np.ndarray]:
        """Current values of every model parameter (trainable and frozen), as imported:
        a weight split for a partial update comes back whole."""
        values = {n: self._values[n].numpy() for n in self.param_names}
        for name, k in self.splits.items():
            head, tail = values.pop(trainable_slice_name(name, k)), values.pop(frozen_slice_name(name, k))
            values[name] = np.concatenate([head, tail])
        return values


def _load_library(path: str | Path, step: relax.Function, predict: relax.Function, device):
    """(module, VM) of a library ``export_library`` wrote for a module with this ``step`` and
    ``predict``, or a TinyTrainError naming the file and the way out."""
    if not Path(path).is_file():
        raise TinyTrainError(f"library {path} does not exist; write it with HostTrainer.export_library")
    try:
        module = tvm.runtime.load_module(str(path))
        vm = relax.VirtualMachine(module, device)
    except Exception as err:  # TVM's loader raises several kinds: one line with the last of its text
        last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise TinyTrainError(f"library {path} is not a training step HostTrainer.export_library "
                             f"wrote ({last[:160]}); rebuild it") from None
    for name, func in (("train_step", step), ("predict", predict)):
        expected = [p.name for p in func.params]
        try:
            arity = int(vm._get_function_arity(name))
            got = [str(vm._get_function_param_name(name, i)) for i in range(arity)]
        except Exception:
            raise TinyTrainError(f"library {path} has no function {name}: it is not a training step "
                                 "HostTrainer.export_library wrote; rebuild it") from None
        if got != expected:
            diff = next((f"{g!r} where the module has {e!r}" for g, e in zip(got, expected) if g != e),
                        f"{len(got)} parameters where the module has {len(expected)}")
            raise TinyTrainError(f"library {path} was built for another model or scheme ({name} takes "
                                 f"{diff}): rebuild it from this module")
    return module, vm


def build(train_mod: tvm.IRModule, params: dict[str, np.ndarray], target: str = "llvm",
          budget: str | int | None = None, model: str | Path = "model"):
    """Compile a TinyTrain module, like ``tvm.compile``.

    ``target="llvm"`` gives a :class:`HostTrainer` (TVM's host build, for search and
    accuracy runs). ``target="c"`` gives a :class:`tvm_tinytrain.codegen.Artifact`:
    the training step as standalone C over one static arena, to ``export(path)`` and
    build with a template of ``tvm_tinytrain.micro``. ``budget`` (``"256KB"``) makes
    the C build fail, before any C is generated, when the planned SRAM exceeds it.
    ``model`` names the model in the C; when it is the path of the model file, the artifact
    keeps a copy of that file (``tvm_tinytrain.export_tuned`` writes the learned values into it).
    """
    if target in ("llvm", "host"):
        if budget is not None:
            raise TinyTrainError("budget= applies to target='c' (the host build has no SRAM limit)")
        return HostTrainer(train_mod, params, "llvm")
    if target == "c":
        from .codegen.build import build_c

        artifact = build_c(train_mod, params, budget=budget, model=str(model))
        if Path(model).is_file():  # a model file: keep it, for export_tuned to write the learned values into
            from .source_map import attach_source

            attach_source(artifact, model, params)
        return artifact
    raise TinyTrainError(f"unknown target {target!r}; choose 'llvm' (TVM's host build) or 'c' (standalone C)")
