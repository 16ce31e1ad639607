"""A pruned model of every family exports to ONNX with a free batch axis and computes, in ONNX Runtime, what
PyTorch computes; the check notices a model that does not match its file."""
import json

import onnx
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qsfm_cli.export import (INPUT_NAME, ONNX_FILE, TOLERANCE, check_onnx, check_path, export_onnx, main,
                             onnx_accuracy, onnx_session, quantize_int8)
from qsfm_cli.latency import onnx_pair_latency
from qsfm_cli.models import create_model
from qsfm_cli.outputs import PRUNED_FILE, save_pruned
from qsfm_cli.pruning import apply_keep, channel_sets


def pruned(name: str, seed: int = 0) -> nn.Module:
    """``name`` with random BatchNorm statistics (so BN folding is exercised), every other channel of
    each default set removed."""
    torch.manual_seed(seed)
    model = create_model(name).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.zeros(1, 3, 32, 32)
    keep = {s.name: list(range(1, s.size, 2)) for s in channel_sets(model, x)}
    small = apply_keep(model, keep, x).eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    return small


def images(n: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "mobilenetv2", "tv_resnet18"])
def test_pruned_model_exports_and_matches_pytorch(name, tmp_path):
    model = pruned(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx", images(1))
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))
    batch_dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value      # symbolic, not the example's batch of 1

    check = check_onnx(model, path, images(3))                   # another batch size than exported
    assert check["ok"], check
    assert check["images"] == 3
    assert check["rel_error"] <= TOLERANCE and check["top1_agreement"] == 1.0

    # The same file against a model whose weights moved: the check must fail.
    other = pruned(name)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert not check_onnx(other, path, images(3))["ok"]


@pytest.mark.slow
def test_export_keeps_the_model_and_rejects_bad_inputs(tmp_path):
    model = pruned("resnet8").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "m.onnx", images(1))
    assert model.training                                          # exported in eval mode, on a copy
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [i.name for i in onnx.load(path).graph.input] == [INPUT_NAME]

    with pytest.raises(ValueError, match="example_input must be a float tensor"):
        export_onnx(model, tmp_path / "bad.onnx", torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="no ONNX file"):
        check_onnx(model, tmp_path / "missing.onnx", images(1))
    with pytest.raises(ValueError, match=r"do not fit the ONNX input \[N, 3, 32, 32\]"):
        check_onnx(model, path, images(1, size=16))
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        check_onnx(model, path, images(1), tolerance=0)


@pytest.mark.slow
def test_export_command_writes_the_file_and_its_check(tmp_path, capsys):
    run_dir = tmp_path / "run"
    save_pruned(run_dir / PRUNED_FILE, pruned("resnet8"))
    out = tmp_path / "elsewhere" / "small.onnx"
    main([str(run_dir), "--out", str(out), "--images", "4"])
    recorded = json.loads((tmp_path / "elsewhere" / "small.check.json").read_text())
    assert out.is_file() and recorded["ok"] and recorded["images"] == 4
    assert recorded["onnx_file"] == str(out)
    assert "-> ok" in capsys.readouterr().out
    assert check_path(run_dir / ONNX_FILE) == run_dir / "pruned_model.check.json"   # the default place


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def export_error(args: list[str], capsys) -> str:
    """``qsfm-export ARGS`` that must fail: its one stderr line (exit code 2, nothing written)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "code ran" not in captured.out
    assert err[0].startswith("qsfm-export: error: ")
    return err[0].removeprefix("qsfm-export: error: ")


@pytest.mark.slow
def test_int8_quantization_is_close_to_fp32_and_smaller(tmp_path):
    model = pruned("resnet20")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 32, 32, generator=g)
    fp32 = export_onnx(model, tmp_path / "m.onnx", images[:1])
    int8 = quantize_int8(fp32, tmp_path / "m.int8.onnx", [images[:16], images[16:32]])
    # ONNX Runtime's quantizer made it: integer weights, quantize/dequantize nodes
    graph = onnx.load(str(int8)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    x = images[32:].numpy()
    a = onnx_session(fp32).run(None, {INPUT_NAME: x})[0]
    b = onnx_session(int8).run(None, {INPUT_NAME: x})[0]
    assert abs(a - b).max() / abs(a).max() < 0.1
    labels = torch.from_numpy(a.argmax(1))
    assert onnx_accuracy(fp32, [(images[32:], labels)]) == 100.0
    assert onnx_accuracy(int8, [(images[32:], labels)]) >= 75.0
    pair = onnx_pair_latency(fp32, int8, 2, input_shape=(3, 32, 32), repeats=3)
    assert pair.base_ms > 0 and pair.pruned_ms > 0


@pytest.mark.slow
def test_run_with_quantize_int8_records_int8_beside_fp32(tmp_path):
    from .test_e2e import experiment
    from qsfm_cli.pipeline import run_experiment

    record = run_experiment(experiment(tmp_path, "export.quantize=int8", "export.calibration_images=32",
                                       "eval.latency_batches=[]"))
    int8 = record.export["int8"]
    assert int8["ok"], int8
    assert 0 <= int8["int8_top1"] <= 100 and abs(int8["fp32_top1"] - record.results.final.top1) < 0.5
    assert int8["int8_bytes"] < int8["fp32_bytes"] and int8["latency"]["speedup"] > 0
    assert (tmp_path / "run" / "pruned_model.int8.onnx").is_file()
    with pytest.raises(ValueError, match="export.quantize=int4; accepted: int8"):
        experiment(tmp_path, "export.quantize=int4")


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    save_pruned(run / PRUNED_FILE, pruned("resnet8"))
    return run


@pytest.mark.parametrize("content", ["truncated", "pickles code", "not a model"])
def test_export_refuses_an_unreadable_model_file_in_one_line(content, run_dir, capsys):
    weights = run_dir / PRUNED_FILE
    if content == "truncated":
        weights.write_bytes(weights.read_bytes()[:500])
    else:
        torch.save(Payload() if content == "pickles code" else {"weights": torch.zeros(2)}, weights)
    why = {"truncated": "truncated or corrupt", "pickles code": "it pickles objects other than tensors; refused, "
           "nothing run", "not a model": "no architecture and state_dict"}[content]
    assert export_error([str(run_dir)], capsys) == f"cannot read {weights}: not a pruned model saved by qsfm-run " \
                                                   f"({why})"
    assert not (run_dir / ONNX_FILE).exists()


def test_export_refuses_a_size_beyond_memory_before_any_work(run_dir, capsys):
    line = export_error([str(run_dir), "--size", "100000"], capsys)
    assert line.startswith("--size=100000; accepted: at most ") and "with --images=16" in line, line
    assert not (run_dir / ONNX_FILE).exists()


def test_export_refuses_an_unwritable_out_before_any_work(run_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "model.onnx"
    assert export_error([str(run_dir), "--out", str(out)], capsys) == \
        f"cannot write {out}: {tmp_path / 'file'} is not a directory"
    assert export_error([str(run_dir), "--out", str(tmp_path)], capsys) == f"cannot write {tmp_path}: {tmp_path} is a directory"


def test_export_names_a_missing_run_directory(tmp_path, capsys):
    assert export_error([str(tmp_path / "nope")], capsys) == f"run directory {str(tmp_path / 'nope')!r} not found"
    assert export_error([str(tmp_path)], capsys) == \
        f"{str(tmp_path)!r} holds no {PRUNED_FILE} (was the run made with save_model=false?)"
