"""ONNX as torch.onnx.export writes it (TorchScript exporter, opsets 11-21): imported, checked
against onnxruntime, and one SGD step checked against torch autograd on the same model.

The exporter writes Constant nodes, Identity of shared initializers, the shape arithmetic of
``x.view(x.size(0), -1)`` (Shape → Gather → Unsqueeze → Concat → Reshape with a dynamic
batch) and, with ``do_constant_folding=False``, BatchNormalization unfused. The reference
step trains torch's eval-mode model with BatchNormalization fused into the layer before it
(what the import does), a BatchNormalization with nothing to fuse into fixed.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import pytest

import tvm_tinytrain as tt
from tests.onnx_ops import ort_session

torch = pytest.importorskip("torch", reason="torch is needed to export models (CI installs it)")
nn = torch.nn
LR = 0.01


class PlainCNN(nn.Module):
    """The brief's network: Conv+BN+ReLU6, Dropout, AdaptiveAvgPool2d(1), view, Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.act, self.drop, self.pool = nn.ReLU6(), nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.pool(self.drop(x))
        return self.fc(x.view(x.size(0), -1))

    def fused(self):
        """Twin with each BN folded into its conv, as the import reads it."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        twin = copy.deepcopy(self)
        twin.conv1, twin.bn1 = fuse_conv_bn_eval(self.conv1, self.bn1), nn.Identity()
        twin.conv2, twin.bn2 = fuse_conv_bn_eval(self.conv2, self.bn2), nn.Identity()
        return twin.requires_grad_(True)  # the bias fusing made for conv2 trains too


class LooseBN(nn.Module):
    """A BN after a ReLU (a fixed affine), ReduceMean + Squeeze, Linear + BatchNorm1d (folded)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc, self.bn_fc = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.bn(torch.relu(self.conv(x)))
        x = x.mean(dim=(2, 3), keepdim=True).squeeze(3).squeeze(2)
        return self.bn_fc(self.fc(x))

    def fused(self):
        from torch.nn.utils.fusion import fuse_linear_bn_eval

        twin = copy.deepcopy(self)
        twin.fc, twin.bn_fc = fuse_linear_bn_eval(self.fc, self.bn_fc), nn.Identity()
        twin.bn.requires_grad_(False)
        return twin


class AutoEncoder(nn.Module):
    """MLPerf Tiny's anomaly-detection shape, narrowed: 640 → 128 → 8 → 128 → 640."""

    def __init__(self):
        super().__init__()
        sizes = [640, 128, 8, 128, 640]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.relu(x) if i < len(self.layers) - 1 else x
        return x

    def fused(self):
        return copy.deepcopy(self)


MODELS = {"plain_cnn": (PlainCNN, (1, 3, 8, 8)), "loose_bn": (LooseBN, (1, 2, 8, 8)),
          "autoencoder": (AutoEncoder, (1, 640))}
CASES = [("plain_cnn", v, mode) for v in (11, 13, 17, 18, 21) for mode in ("dynamic_batch", "unfolded")]
CASES += [("loose_bn", v, "unfolded") for v in (11, 13, 17, 18, 21)] + [("loose_bn", 18, "dynamic_batch")]
CASES += [("autoencoder", v, "dynamic_batch") for v in (11, 17, 21)]


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cls, shape = MODELS[name]
    model = cls()
    for m in model.modules():  # running statistics that are not the identity
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model.eval(), shape


def export(model, shape, opset: int, mode: str, path) -> onnx.ModelProto:
    kwargs = ({"dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}} if mode == "dynamic_batch"
              else {"do_constant_folding": False})
    data = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(shape), data, dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], **kwargs)
    proto = onnx.load_model_from_string(data.getvalue())
    onnx.save(proto, path)
    return proto


def _torch_step(model, x: np.ndarray, label, loss: str):
    """Loss and parameters after one plain SGD step of torch autograd on the fused twin."""
    twin = model.fused().eval()
    out = twin(torch.from_numpy(x))
    if loss == "cross_entropy":
        value = nn.functional.cross_entropy(out, torch.tensor([label]))
    else:
        value = nn.functional.mse_loss(out, torch.from_numpy(label))
    value.backward()
    with torch.no_grad():
        params = [p - LR * p.grad for p in twin.parameters() if p.requires_grad]
    return float(value.detach()), [p.numpy() for p in params]


@pytest.mark.parametrize("name,opset,mode", CASES)
def test_exported_model_trains_like_torch(name, opset, mode, tmp_path):
    model, shape = _model(name)
    proto = export(model, shape, opset, mode, tmp_path / f"{name}.onnx")
    ops = {n.op_type for n in proto.graph.node}
    if name == "plain_cnn" and mode == "dynamic_batch":
        assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= ops  # the shape arithmetic
    if mode == "unfolded":
        assert "BatchNormalization" in ops and ("Constant" in ops or name != "plain_cnn")

    loss_kind = "mse" if name == "autoencoder" else "cross_entropy"
    mod, params = tt.load_model(tmp_path / f"{name}.onnx")
    trainer = tt.build(tt.relay.transform.TinyTrain(scheme="full", loss=loss_kind,
                                                    optimizer=tt.SGD(lr=LR))(mod), params)
    rng = np.random.default_rng(opset)
    x = rng.normal(size=shape).astype(np.float32)
    ref = ort_session(proto).run(None, {"input": x})[0]
    ours = trainer.predict(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    label = 1 if loss_kind == "cross_entropy" else rng.normal(size=ref.shape).astype(np.float32)
    torch_loss, torch_params = _torch_step(model, x, label, loss_kind)
    loss = trainer.step(x, label)
    assert loss == pytest.approx(torch_loss, rel=1e-5)
    updated = trainer.params()
    names = list(params)
    assert len(names) == len(torch_params)
    for n, expected in zip(names, torch_params):
        np.testing.assert_allclose(updated[n], expected.reshape(updated[n].shape), rtol=1e-4, atol=1e-6,
                                   err_msg=n)
        moved = np.abs(updated[n] - params[n]).max()
        assert moved > 0 or n.endswith("bias")  # the step did change the weights


def test_autoencoder_input_is_a_feature_vector(tmp_path):
    model, shape = _model("autoencoder")
    export(model, shape, 17, "dynamic_batch", tmp_path / "ae.onnx")
    mod, params = tt.load_model(tmp_path / "ae.onnx")
    assert [int(d) for d in mod["main"].params[0].ty.shape] == [1, 640]
    assert [p for p in params if p.endswith("weight")] == [f"linear{i}.weight" for i in range(4)]


def test_exported_model_quantized_to_qdq_matches_onnxruntime(tmp_path, opset=21):
    """The QDQ reader folds the exporter's shape arithmetic too (the Reshape stays int8)."""
    import tvm
    from tvm import relax

    from relay_passes.plain_calls import PlainTIRCalls
    from tvm_tinytrain import zoo

    model, shape = _model("plain_cnn")
    qdq = zoo.quantize_qdq(export(model, shape, opset, "dynamic_batch", tmp_path / "f.onnx"))
    assert {"Shape", "Gather", "QuantizeLinear"} <= {n.op_type for n in qdq.graph.node}
    onnx.save(qdq, tmp_path / "q.onnx")
    mod, params = tt.load_model(tmp_path / "q.onnx", float_classifier=False)
    vm = relax.VirtualMachine(tvm.compile(PlainTIRCalls(mod), target="llvm"), tvm.cpu())
    weights = [tvm.runtime.tensor(params[p.name]) for p in mod["main"].params[1:]]
    session = ort_session(qdq)
    last = next(n for n in qdq.graph.node if n.output[0] == qdq.graph.output[0].name)
    scale = next(t for t in qdq.graph.initializer if t.name == last.input[1])
    step = float(onnx.numpy_helper.to_array(scale))
    for seed in range(3):
        x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
        ours = vm["main"](tvm.runtime.tensor(tt.quantize_input(mod, x)), *weights).numpy()
        assert np.abs(ours - session.run(None, {"input": x})[0]).max() <= step  # within one output step
