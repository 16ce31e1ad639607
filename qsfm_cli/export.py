"""Deploy stage: a pruned model as an ONNX file, checked against PyTorch in ONNX Runtime.

``qsfm-export RUN_DIR`` does both for a finished run: it rebuilds ``pruned_model.pt`` (``load_pruned``),
writes ``pruned_model.onnx`` and records the check in ``pruned_model.check.json`` beside it.

The graph comes from torch's ``torch.export``-based exporter (the TorchScript one is deprecated); the
batch axis stays symbolic, so one file serves every batch size, while channels and image size are fixed.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from . import limits
from .files import atomic_write, unwritable, write_json
from .outputs import PRUNED_FILE, load_pruned

OPSET = 20                     # ONNX Runtime >= 1.17 runs every op the exporter emits at this opset
INPUT_NAME, OUTPUT_NAME = "input", "logits"
TOLERANCE = 1e-4               # largest |ONNX - PyTorch| logit over the largest |PyTorch| logit
ONNX_FILE = "pruned_model.onnx"
INT8_FILE = "pruned_model.int8.onnx"
QUANTIZATIONS = ("int8",)
DEFAULT_IMAGES = 16             # random images of qsfm-export's check


@dataclass(frozen=True)
class ExportSpec:
    """The ``export`` config node: ``onnx`` writes ``pruned_model.onnx`` beside the pruned model and checks
    it in ONNX Runtime against PyTorch on the first ``check_images`` test images. ``quantize=int8`` also
    writes ``pruned_model.int8.onnx``, ONNX Runtime's static quantization of that file calibrated on
    ``calibration_images`` unlabeled training images, and records its top-1 and latency beside fp32's."""

    onnx: bool = False
    check_images: int = 8
    quantize: str | None = None
    calibration_images: int = 256

    def __post_init__(self) -> None:
        if self.check_images < 1:
            raise ValueError(f"export.check_images={self.check_images}; accepted: >= 1")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ValueError(f"export.quantize={self.quantize}; accepted: {', '.join(QUANTIZATIONS)} (or null)")
        if self.calibration_images < 1:
            raise ValueError(f"export.calibration_images={self.calibration_images}; accepted: >= 1")


def _checked_images(images: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a float tensor [N, C, H, W]; got {shape}")
    if images.shape[0] < 1:
        raise ValueError(f"{what} holds no image; got shape {tuple(images.shape)}")
    return images.detach().cpu().float()


def onnx_model(model: nn.Module, example_input: torch.Tensor):
    """The ``onnx.ModelProto`` of ``model`` in eval mode, traced at ``example_input``'s shape with a
    symbolic batch axis; ``model`` itself is left as it was (device, mode)."""
    x = _checked_images(example_input, "example_input")
    if x.shape[0] == 1:
        # torch.export treats a dimension of size 1 as a constant: a batch of one would be baked into
        # the graph's reshapes, and the file would refuse any other batch size.
        x = x.expand(2, *x.shape[1:]).contiguous()
    frozen = copy.deepcopy(model).cpu().eval()
    program = torch.onnx.export(
        frozen, (x,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_shapes=({0: "batch"},), verbose=False)
    return program.model_proto


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically) and return the path."""
    path = Path(path)
    data = onnx_model(model, example_input).SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return path


def onnx_session(model_or_path, *, threads: int | None = None):
    """An ONNX Runtime CPU session over an ONNX file or serialized model.

    ``threads`` sets the intra-op pool (``None``: ONNX Runtime's default, one per physical core). Idle
    workers do not spin: spinning threads of one session would steal cores from the next one timed.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_onnx(model: nn.Module, path: str | Path, images: torch.Tensor, *,
               tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Run ``images`` through the ONNX file in ONNX Runtime (CPU) and through ``model`` (PyTorch, CPU).

    Returns the largest absolute difference of the logits, the relative error (that difference over the
    largest absolute PyTorch logit), the share of images whose top-1 class agrees, and ``ok``: relative
    error at most ``tolerance``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no ONNX file at {str(path)!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0; got {tolerance!r}")
    x = _checked_images(images, "images")
    session = onnx_session(path)
    expected = [d if isinstance(d, int) else None for d in session.get_inputs()[0].shape[1:]]
    if any(e is not None and e != got for e, got in zip(expected, x.shape[1:])):
        raise ValueError(f"images of shape {tuple(x.shape)} do not fit the ONNX input [N, "
                         f"{', '.join(map(str, expected))}]")
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    reference = copy.deepcopy(model).cpu().eval()(x)
    diff = (got - reference).abs().max().item()
    scale = reference.abs().max().item()
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    return {
        "onnx_file": str(path),
        "images": int(x.shape[0]),
        "max_abs_diff": diff,
        "rel_error": rel,
        "tolerance": tolerance,
        "top1_agreement": (got.argmax(1) == reference.argmax(1)).float().mean().item(),
        "ok": rel <= tolerance,
    }


# ------------------------------------------------------------------------------------------ quantization

def quantize_int8(onnx_path: str | Path, out: str | Path, calibration: Iterable[torch.Tensor]) -> Path:
    """ONNX Runtime's static int8 quantization of the fp32 file ``onnx_path`` into ``out`` (QDQ format,
    int8 weights per channel, uint8 activations), its activation ranges calibrated on the image batches
    of ``calibration`` (no labels). Written atomically."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: _checked_images(batch, "calibration images").numpy()}

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        data = quantized.read_bytes()
    atomic_write(out, lambda f: f.write(data))
    return out


def onnx_accuracy(path: str | Path, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 (%) of an ONNX file in ONNX Runtime over ``(images, labels)`` batches."""
    session = onnx_session(Path(path))
    correct = total = 0
    for images, labels in batches:
        logits = session.run(None, {INPUT_NAME: _checked_images(images, "images").numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == labels.cpu()).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("no test images to measure the ONNX model's accuracy on")
    return 100.0 * correct / total


# --------------------------------------------------------------------------------------------- command

def check_path(onnx_path: Path) -> Path:
    """Where ``qsfm-export`` records the check of ``onnx_path``: ``<stem>.check.json`` beside it."""
    return onnx_path.with_name(f"{onnx_path.stem}.check.json")


def _run_image_size(run_dir: Path) -> int | None:
    """The run's ``dataset.size`` from its Hydra config, when the dataset has one."""
    import yaml

    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    size = ((yaml.safe_load(config.read_text()) or {}).get("dataset") or {}).get("size")
    return int(size) if size else None


def export_run(run_dir: str | Path, out: str | Path | None = None, *, image_size: int | None = None,
               num_images: int = DEFAULT_IMAGES, seed: int = 0) -> dict[str, Any]:
    """Export a finished run's pruned model and check it on ``num_images`` random images of the run's
    size (``image_size``, else its dataset's size, else 32); the check is also written beside the file.
    Every argument (the run, the model file, the sizes, where the file goes) is checked before the export."""
    run_dir = Path(run_dir)
    weights = run_dir / PRUNED_FILE
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} not found")
    if not weights.is_file():
        raise ValueError(f"{str(run_dir)!r} holds no {PRUNED_FILE} (was the run made with save_model=false?)")
    if num_images < 1:
        raise ValueError(f"--images={num_images}; accepted: 1 or more")
    size = image_size if image_size is not None else (_run_image_size(run_dir) or 32)
    if size < 1:
        raise ValueError(f"--size={size}; accepted: 1 or more")
    out = Path(out) if out is not None else run_dir / ONNX_FILE
    _check_writable(out)
    _check_writable(check_path(out))
    model = load_pruned(weights)
    _check_memory(model, size, num_images)
    images = torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    export_onnx(model, out, images[:1])
    check = check_onnx(model, out, images)
    write_json(check_path(out), check)
    return check


def _check_writable(path: Path) -> None:
    """Refuse, before any work, a file that cannot be written at ``path`` (naming it, not a temp file)."""
    why = unwritable(path)
    if why:
        raise ValueError(f"cannot write {path}: {why}")


def _check_memory(model: nn.Module, size: int, num_images: int) -> None:
    """Refuse a check whose images would take more than ``limits.MEMORY_SHARE`` of the available memory:
    one image's share is measured at 32 x 32 and grows with the image's area. The option blamed is
    ``--images`` when it asks for more than its default, else ``--size``."""
    base = 32
    per_image = limits.bytes_per_image(model, torch.zeros(1, 3, base, base)) * (size / base) ** 2
    available = limits.available_memory()
    budget = limits.MEMORY_SHARE * available
    if num_images * per_image <= budget:
        return
    if num_images > DEFAULT_IMAGES:
        key, value, accepted = "--images", num_images, f"{int(budget // per_image)} here at --size={size}"
    else:
        largest = int(size * math.sqrt(budget / (num_images * per_image)))
        key, value, accepted = "--size", size, f"{largest} here with --images={num_images}"
    raise ValueError(f"{key}={value}; accepted: at most {accepted} (about {num_images * per_image / 2 ** 30:.3g} "
                     f"GiB for the check's images in this model; {limits.MEMORY_SHARE:.0%} of the "
                     f"{available / 2 ** 30:.1f} GiB of memory available)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qsfm-export", description="Export a finished run's pruned model "
                                     "to ONNX and check it against PyTorch in ONNX Runtime.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help=f"a run directory holding {PRUNED_FILE}")
    parser.add_argument("--out", metavar="FILE", help=f"the ONNX file (default: RUN_DIR/{ONNX_FILE})")
    parser.add_argument("--size", type=int, help="input height = width (default: the run's dataset size, "
                                                 "else 32)")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                        help=f"random images of the check (default {DEFAULT_IMAGES})")
    args = parser.parse_args(argv)
    try:
        check = export_run(args.run_dir, args.out, image_size=args.size, num_images=args.images)
    except ValueError as err:
        print(f"qsfm-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    verdict = "ok" if check["ok"] else f"FAILED (tolerance {check['tolerance']:g})"
    print(f"{check['onnx_file']}: ONNX Runtime vs PyTorch on {check['images']} images: max |diff| "
          f"{check['max_abs_diff']:.3g}, relative {check['rel_error']:.3g}, top-1 agreement "
          f"{check['top1_agreement']:.0%} -> {verdict}")
    if not check["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
