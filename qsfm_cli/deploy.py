"""Deploy stage: the run's pruned model as ``pruned_model.onnx`` checked in ONNX Runtime against PyTorch
and, with ``export.quantize=int8``, its static int8 quantization measured beside it (``qsfm_cli.export``
does the files, ``qsfm_cli.latency`` the timing)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from .data import ImageSet
from .export import INT8_FILE, ONNX_FILE, ExportSpec, check_onnx, export_onnx, onnx_accuracy, quantize_int8
from .latency import onnx_pair_latency
from .loaders import input_shape, make_loader
from .record import error_text

log = logging.getLogger(__name__)


def export_stage(pruned: nn.Module, spec: ExportSpec, run_dir: Path, test_set: ImageSet, *,
                 train_set: ImageSet, seed: int, batch_size: int = 500, latency_batch: int = 64,
                 latency_threads: int | None = 1, latency_repeats: int = 10) -> dict[str, Any]:
    """``pruned_model.onnx`` in ``run_dir``, checked in ONNX Runtime against PyTorch on the first
    ``spec.check_images`` images of ``test_set``; with ``spec.quantize``, ``int8_stage`` (its arguments are
    those of ``int8_stage``). A failure is returned as the record's ``error``, not raised: the run's results
    stand without the file."""
    path = Path(run_dir) / ONNX_FILE
    try:
        images, _ = next(iter(make_loader(test_set, spec.check_images, device="cpu", train=False, num_workers=0)))
        export_onnx(pruned, path, images[:1])
        check = check_onnx(pruned, path, images)
    except Exception as err:
        log.warning("ONNX export failed: %s", error_text(err))
        return {"onnx_file": str(path), "ok": False, "error": error_text(err)}
    if not check["ok"]:
        log.warning("ONNX Runtime disagrees with PyTorch: relative error %.3g above %g", check["rel_error"],
                    check["tolerance"])
    if spec.quantize:
        check["int8"] = int8_stage(path, spec, test_set, train_set=train_set, seed=seed, batch_size=batch_size,
                                   latency_batch=latency_batch, latency_threads=latency_threads,
                                   latency_repeats=latency_repeats)
    return check


def int8_stage(fp32: Path, spec: ExportSpec, test_set: ImageSet, *, train_set: ImageSet, seed: int,
               batch_size: int = 500, latency_batch: int = 64, latency_threads: int | None = 1,
               latency_repeats: int = 10) -> dict[str, Any]:
    """``pruned_model.int8.onnx`` beside ``fp32``: ONNX Runtime's static quantization of the exported file,
    calibrated on ``spec.calibration_images`` unlabeled images of ``train_set`` drawn with ``seed`` (the
    statistics' sample); its top-1 on ``test_set`` (batches of ``batch_size``) and size beside the fp32
    file's, and both timed together in ONNX Runtime at ``latency_batch`` and ``latency_threads``. A failure
    is recorded as the entry's ``error``."""
    out = fp32.with_name(INT8_FILE)
    try:
        images = train_set.sample(spec.calibration_images, seed)
        calibration = (x for x, _ in make_loader(images, 64, device="cpu", train=False, num_workers=0))
        quantize_int8(fp32, out, calibration)

        def test_batches():
            return make_loader(test_set, batch_size, device="cpu", train=False, num_workers=0)

        pair = onnx_pair_latency(fp32, out, latency_batch, input_shape=input_shape(test_set),
                                 threads=latency_threads, repeats=max(latency_repeats, 10))
        result = {"int8_file": str(out), "ok": True, "fp32_top1": onnx_accuracy(fp32, test_batches()),
                  "int8_top1": onnx_accuracy(out, test_batches()), "fp32_bytes": fp32.stat().st_size,
                  "int8_bytes": out.stat().st_size, "latency": pair.to_dict()}
    except Exception as err:
        log.warning("int8 quantization failed: %s", error_text(err))
        return {"int8_file": str(out), "ok": False, "error": error_text(err)}
    log.info("int8 (ONNX Runtime static quantization): top-1 %.2f (fp32 %.2f), %.2f MB (fp32 %.2f), speed-up over "
             "fp32 %s at batch %d", result["int8_top1"], result["fp32_top1"], result["int8_bytes"] / 1e6,
             result["fp32_bytes"] / 1e6, pair.speedup_text(), pair.batch)
    return result
