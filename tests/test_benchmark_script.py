"""Smoke test of benchmarks/mask2former_vs_transformers.py (keeps the script from rotting; times nothing)."""
from __future__ import annotations

import re

import pytest
import torch
from benchmark_scripts import benchmark_script

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("mask2former_vs_transformers") as module:
        yield module


def test_tiny_row_report(bench, tmp_path):
    out = tmp_path / "report.md"
    report = bench.main(["--rows", "tiny", "--repeats", "1", "--warmup", "0", "--no-memory", "--extra", "onnxruntime",
                         "--out", str(out)])
    assert out.read_text() == report
    assert "torch " + torch.__version__ in report and "--rows tiny" in report
    metrics, difference = {}, None
    for line in report.splitlines():
        if not (line.startswith("| tiny |") or line.startswith("|  |  |")):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8:  # row, configuration, metric, transformers, semiseg, semiseg onnxruntime, 2 ratios
            metrics[cells[2]] = cells[3:]
        else:  # the same-function table: row, class logits, mask logits, scale
            difference = [float(c) for c in cells[1:3]]
    assert set(metrics) == {"train step", "inference"} and difference is not None
    seconds = lambda v: float(re.match(r"[\d.]+", v)[0]) * (1e-3 if v.endswith("ms") else 1)  # noqa: E731
    for metric, (theirs, ours, runtime, ratio, runtime_ratio) in metrics.items():
        assert seconds(ours) > 0 and seconds(theirs) > 0
        assert float(ratio) == pytest.approx(seconds(ours) / seconds(theirs), rel=0.05, abs=0.01)
        if metric == "inference":  # onnxruntime runs inference only
            assert float(runtime_ratio) == pytest.approx(seconds(runtime) / seconds(theirs), rel=0.05, abs=0.01)
        else:
            assert runtime == runtime_ratio == "–"
    assert max(difference) < 1e-4  # both implementations computed the same function


def test_profile_and_maskdino_rows(bench):
    profile = bench.main(["--rows", "tiny", "--profile", "inference", "--threads", "1"])
    assert "### tiny inference: semiseg" in profile and "### tiny inference: transformers" in profile
    assert profile.count("aten::") >= 10
    report = bench.main(["--rows", "tiny", "--repeats", "1", "--warmup", "0", "--no-memory", "--extra", "maskdino"])
    rows = [line for line in report.splitlines() if line.startswith("| tiny | ") and line.count("|") == 6]
    assert [r.split("|")[2].strip() for r in rows] == ["train step", "inference"]
    for row in rows:  # Mask DINO / Mask2Former = its time over semiseg Mask2Former's
        m2f, mdino, ratio = (c.strip() for c in row.strip("|").split("|")[2:5])
        seconds = lambda v: float(re.match(r"[\d.]+", v)[0]) * (1e-3 if v.endswith("ms") else 1)  # noqa: E731
        assert float(ratio) == pytest.approx(seconds(mdino) / seconds(m2f), rel=0.05, abs=0.01)


def test_weights_map_covers_every_parameter(bench):
    row = bench.ROWS["tiny"]
    torch.manual_seed(0)
    theirs = bench.build_transformers(row)
    state = bench.transformers_to_semiseg_state(theirs.state_dict())
    ours = bench.build_semiseg(row)
    assert set(state) == set(ours.state_dict())
    ours.load_state_dict(state, strict=True)
    # q, k and v of the decoder self-attention are packed in this order
    packed = ours.sem_seg_head.predictor.transformer_self_attention_layers[1].self_attn.in_proj_weight
    layer = theirs.model.transformer_module.decoder.layers[1].self_attn
    torch.testing.assert_close(packed, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))


def test_peak_step_memory_is_measured(bench):
    peak = bench.peak_step_memory("semiseg", bench.ROWS["tiny"], "inference", torch.device("cpu"))
    if peak is None:
        pytest.skip("peak RSS cannot be reset on this platform")
    assert 0 < peak < 2 ** 30


@pytest.mark.parametrize("argv, message", [
    (["--rows", "tiny,huge"], "unknown row"),
    (["--rows", "r50-b2-amp"], "need --device cuda"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--extra", "tensorrt"], "--extra: choose from"),
])
def test_bad_flags_are_one_line_errors(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
