"""ONNX export (`semiseg export`) and the onnxruntime backend, for both meta-architectures: the
onnxruntime outputs equal PyTorch's within 1e-4 at other batch and image sizes than the traced
ones, `predict` gives the same instances with either backend, and a file that does not belong to the
weights is a one-line error."""
import pytest
import torch

from semiseg.api import export_weights, load
from semiseg.cli import main
from semiseg.config import Config, apply_overrides, config_to_dict
from semiseg.engine.checkpoint import save_weights
from semiseg.errors import CheckpointError, ConfigError, DataError
from semiseg.models.build import build_model
from semiseg.weights import WeightsInfo
from test_api import TINY, image
from test_guided_maskdino import MASKDINO

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ARCHS = {"mask2former": TINY, "maskdino": TINY + MASKDINO}


def save_tiny(path, overrides, seed=0):
    cfg = apply_overrides(Config(), overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model, 3)
    save_weights(path, model.state_dict(), WeightsInfo(config_to_dict(cfg), ["a", "b", "c"], [1, 2, 3], "model"))
    return path


@pytest.fixture(scope="module", params=list(ARCHS))
def exported(request, tmp_path_factory):
    """(arch, weights, onnx file) of a random tiny model."""
    folder = tmp_path_factory.mktemp(request.param)
    weights = save_tiny(folder / "model.safetensors", ARCHS[request.param])
    return request.param, weights, export_weights(weights, folder / "model.onnx")


def test_onnxruntime_outputs_equal_pytorch_at_other_batch_and_image_sizes(exported):
    arch, weights, onnx_file = exported
    torch_model = load(weights, device="cpu")
    runtime = load(weights, backend="onnxruntime", onnx=onnx_file)
    torch.manual_seed(1)
    for batch, (h, w) in [(1, (64, 96)), (3, (96, 32))]:  # traced at batch 2, 64 x 64
        images = torch.randint(0, 256, (batch, 3, h, w)).float()
        sizes = [(h - 5 * i, w - 3 * i) for i in range(batch)]  # each image its own valid area
        with torch.no_grad():
            expected = torch_model.model(images, sizes)
        got = runtime.forward(images, sizes)
        names = ["pred_logits", "pred_masks"] + (["pred_boxes"] if arch == "maskdino" else [])
        assert sorted(k for k in got if k.startswith("pred_")) == sorted(names)
        for name in names:
            assert got[name].shape == expected[name].shape
            torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4)
        assert got["padded_size"] == expected["padded_size"]


def test_predict_gives_the_same_instances_with_either_backend(exported):
    _, weights, onnx_file = exported
    array = image(h=50, w=70)
    expected = load(weights, device="cpu").predict(array)
    got = load(weights, backend="onnxruntime", onnx=onnx_file).predict(array)
    assert torch.equal(got.labels, expected.labels)
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-4, rtol=0)
    assert (got.masks != expected.masks).float().mean() < 1e-3  # a logit within 1e-4 of 0 may flip a pixel


def test_cli_export_and_predict_with_onnxruntime(exported, tmp_path, capsys):
    _, weights, onnx_file = exported
    from PIL import Image
    Image.fromarray(image()).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--weights", str(weights), "--out", str(tmp_path / "pred"),
                 "--backend", "onnxruntime", "--onnx", str(onnx_file)]) == 0
    assert (tmp_path / "pred" / "predictions.json").is_file() and (tmp_path / "pred" / "a.png").is_file()
    assert main(["export", "--weights", str(weights), "--out", str(onnx_file)]) != 0  # never overwritten
    assert "already exists" in capsys.readouterr().err


def test_a_file_of_other_weights_or_another_config_is_a_one_line_error(exported, tmp_path):
    arch, _, onnx_file = exported
    other_seed = save_tiny(tmp_path / "seed1.safetensors", ARCHS[arch], seed=1)
    with pytest.raises(CheckpointError, match="exported from other weights"):
        load(other_seed, backend="onnxruntime", onnx=onnx_file)
    prefix = "model.maskdino" if arch == "maskdino" else "model.mask2former"
    other_config = save_tiny(tmp_path / "queries.safetensors", ARCHS[arch] + [f"{prefix}.num_queries=6"])
    with pytest.raises(CheckpointError, match=r"another config .*num_queries: 8 in the file, 6 in the weights"):
        load(other_config, backend="onnxruntime", onnx=onnx_file)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.onnx: not a readable ONNX model"):
        load(other_seed, backend="onnxruntime", onnx=tmp_path / "junk.onnx")
    with pytest.raises(ConfigError, match="needs the exported file"):
        load(other_seed, backend="onnxruntime")
    with pytest.raises(ConfigError, match="--compile applies to the PyTorch backend"):
        load(other_seed, backend="onnxruntime", onnx=onnx_file, compile="aot_eager")
    with pytest.raises(DataError, match="no such ONNX file"):
        load(other_seed, backend="onnxruntime", onnx=tmp_path / "missing.onnx")
