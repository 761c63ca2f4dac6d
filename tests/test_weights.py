"""Weight files: the numpy-only unpickler, torch / safetensors round trips, corrupt files, atomic
saving, checked loading, and ResNet-50 weights in detectron2 and torchvision layouts."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from semiseg.errors import CheckpointError
from semiseg.models.backbones import BackboneConfig, build_backbone
from semiseg.models.backbones.resnet import torchvision_to_detectron2_names
from semiseg.weights import load_checkpoint_file, load_weights_into, save_safetensors_atomic


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g),
            "bn.num_batches_tracked": torch.tensor(7)}


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_style_pickle_loads(tmp_path, protocol):
    state = _state()
    numpy_state = {k: v.numpy() for k, v in state.items()}
    numpy_state["bn.num_batches_tracked"] = np.int64(7)  # a numpy scalar, not an array
    path = tmp_path / "model.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": numpy_state, "__author__": "torchvision", "matching_heuristics": True}, f,
                    protocol=protocol)
    _assert_same(load_checkpoint_file(path), state)


def test_pickle_written_by_numpy_1_loads(tmp_path):
    state = _state()
    data = pickle.dumps({"model": {k: v.numpy() for k, v in state.items()}}, protocol=2)
    assert b"numpy._core.multiarray\n" in data
    path = tmp_path / "R-50.pkl"
    path.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))  # numpy 1.x names
    _assert_same(load_checkpoint_file(path), state)


def test_bare_pickle_dict_loads(tmp_path):
    path = tmp_path / "bare.pkl"
    path.write_bytes(pickle.dumps({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    torch.testing.assert_close(load_checkpoint_file(path)["w"], torch.arange(6.0).reshape(2, 3))


class _RunsShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "payload": _RunsShellCommand(marker)}))
    with pytest.raises(CheckpointError, match=r"evil\.pkl: refuses to unpickle (posix|nt|os)\.system"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_pickled_non_array_values_are_refused(tmp_path):
    path = tmp_path / "strings.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": "not an array"}}))
    with pytest.raises(CheckpointError, match=r"strings\.pkl: entry 'w' is a str"):
        load_checkpoint_file(path)


@pytest.mark.parametrize("wrapper, name", [(None, "weights.pth"), ("model", "model_final.pth"),
                                           ("state_dict", "weights.pt"), ("model", "saved_by_torch.pkl")])
def test_torch_file_round_trip_unwraps_model_and_state_dict(tmp_path, wrapper, name):
    state = _state()
    path = tmp_path / name
    torch.save(state if wrapper is None else {wrapper: state, "iteration": 3}, path)
    _assert_same(load_checkpoint_file(path), state)


def test_torch_file_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"model": _state(), "callback": _RunsShellCommand(tmp_path / "pwned")}, path)
    with pytest.raises(CheckpointError, match=r"object\.pth: not a readable weights-only torch file"):
        load_checkpoint_file(path)
    assert not (tmp_path / "pwned").exists()


def test_safetensors_atomic_save_round_trip_and_replace(tmp_path):
    path = tmp_path / "ckpt" / "model.safetensors"
    save_safetensors_atomic(_state(0), path)
    _assert_same(load_checkpoint_file(path), _state(0))
    base = torch.randn(4, 4)
    shared = {"full": base, "row": base[1], "transposed": base.t()}  # views of one storage
    save_safetensors_atomic(shared, path, metadata={"step": "3"})
    loaded = load_checkpoint_file(path)
    for name, value in shared.items():
        torch.testing.assert_close(loaded[name], value)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_failed_atomic_save_keeps_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    save_safetensors_atomic(_state(0), path)
    with pytest.raises(TypeError, match="'bad' is a str, not a tensor"):
        save_safetensors_atomic({"w": torch.zeros(2), "bad": "not a tensor"}, path)

    def write_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_safetensors_atomic(_state(1), path)
    _assert_same(load_checkpoint_file(path), _state(0))
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # the temporary file is removed


@pytest.mark.parametrize("suffix", [".pkl", ".pth", ".safetensors"])
def test_truncated_files_raise_checkpoint_error_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {"w": torch.randn(64, 64)}
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps({k: v.numpy() for k, v in state.items()}))
    elif suffix == ".pth":
        torch.save(state, path)
    else:
        save_safetensors_atomic(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"weights\{suffix}: not a readable"):
        load_checkpoint_file(path)


def test_missing_file_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pkl: no such weights file"):
        load_checkpoint_file(tmp_path / "nope.pkl")


def test_load_weights_into_checks_names_and_shapes():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    state = {k: v + 1 for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    missing, unexpected = load_weights_into(model, {**state, "extra.weight": torch.zeros(1)}, "file.pth")
    assert (missing, unexpected) == (["1.num_batches_tracked"], ["extra.weight"])
    torch.testing.assert_close(model[0].weight, state["0.weight"])
    with pytest.raises(CheckpointError, match=r"file\.pth: does not fit the model: 1 shape mismatches: "
                                              r"0\.bias \(4,\) vs model \(3,\)$"):
        load_weights_into(model, {**state, "0.bias": torch.zeros(4)}, "file.pth")
    with pytest.raises(CheckpointError, match=r"file\.pth: does not fit the model: 1 missing: 1\.running_var$"):
        load_weights_into(model, {k: v for k, v in state.items() if k != "1.running_var"}, "file.pth")
    with pytest.raises(CheckpointError, match=r"file\.pth: does not fit the model: 1 unexpected: extra\.weight$"):
        load_weights_into(model, {**state, "extra.weight": torch.zeros(1)}, "file.pth", strict=True)
    without_bn = {k: v for k, v in state.items() if not k.startswith("1.")}
    load_weights_into(model, without_bn, "file.pth", may_be_missing=["1."])


def _randomize_batchnorms(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def test_detectron2_r50_pickle_loads_into_randomly_initialised_resnet50(tmp_path):
    torch.manual_seed(0)
    source = build_backbone(BackboneConfig(name="resnet50", norm="bn"))
    _randomize_batchnorms(source, seed=1)
    state = {k: v.numpy() for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "torchvision", "matching_heuristics": True}, f)
    loaded = build_backbone(BackboneConfig(name="resnet50", weights=path))  # FrozenBN, different random init
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, torch.from_numpy(state[name]), rtol=0, atol=0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.eval()(x)["res5"]  # eval-mode BatchNorm with the same statistics
        torch.testing.assert_close(loaded(x)["res5"], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_torchvision_resnet50_weights_give_torchvision_features(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50()
    _randomize_batchnorms(reference, seed=2)
    reference.eval()
    converted = torchvision_to_detectron2_names(reference.state_dict())
    assert "res2.0.shortcut.norm.running_mean" in converted and not any(k.startswith("fc.") for k in converted)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(reference.state_dict(), path)
    ours = build_backbone(BackboneConfig(name="resnet50", weights=path)).eval()  # torchvision names in the file
    ours.load_state_dict({k: v for k, v in converted.items() if "num_batches_tracked" not in k}, strict=True)

    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        features = ours(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for name, layer in zip(("res2", "res3", "res4", "res5"),
                               (reference.layer1, reference.layer2, reference.layer3, reference.layer4)):
            y = layer(y)
            scale = y.abs().max().item()
            torch.testing.assert_close(features[name], y, rtol=1e-5, atol=1e-5 * scale)
