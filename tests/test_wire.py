"""The pipeline wired to deployment and tracking: paired latency in the record, results.csv and results.md;
the ONNX export option; the loggers in a run and in a sweep, read back with each backend's own reader."""
from __future__ import annotations

from dataclasses import replace

from qsfm_cli import report
from qsfm_cli.latency import summarize_pair
from qsfm_cli.outputs import results_row, write_record
from qsfm_cli.record import OK, Results, RunRecord

from .test_report import BASE, _measured, settings


def paired_record(base_times: list[float], pruned_times: list[float]) -> RunRecord:
    pruned = _measured(90.0, 0.5)
    pairs = [summarize_pair(base_times, pruned_times, runtime=runtime, batch=1)
             for runtime in ("torch", "onnxruntime")]
    latency = {f"{p.runtime}/b{p.batch}": p.to_dict() for p in pairs}
    results = Results(BASE, pruned, pruned, {}, {"protocol": "ratio"}, {}, latency)
    return RunRecord(settings(), status=OK, results=results)


def test_results_row_has_speedup_trust_columns_per_runtime():
    quiet = paired_record([2.0, 2.0, 2.1, 2.0], [1.0, 1.0, 1.05, 1.0])
    busy = paired_record([2.0, 9.0, 2.1, 30.0], [1.0, 1.0, 1.05, 1.0])
    for record, trusted in ((quiet, True), (busy, False)):
        row = results_row(record)
        pair = record.results.latency["torch/b1"]
        assert row["speedup_b1"] == round(pair["speedup"], 3)
        assert row["speedup_trusted_b1"] is trusted and row["onnx_speedup_trusted_b1"] is trusted
        assert row["onnx_speedup_b1"] == round(record.results.latency["onnxruntime/b1"]["speedup"], 3)
        assert row["latency_spread_b1"] == round(max(pair["base_spread"], pair["pruned_spread"]), 3)
    assert RunRecord.from_dict(busy.to_dict()) == busy


def test_report_marks_untrusted_speedups(tmp_path):
    for name, times in (("quiet", [2.0, 2.0, 2.1, 2.0]), ("busy", [2.0, 9.0, 2.1, 30.0])):
        record = paired_record(times, [1.0, 1.0, 1.05, 1.0])
        record = replace(record, settings=settings(ratio=0.3 if name == "quiet" else 0.6))
        write_record(tmp_path / name, record)
    text = report.results_markdown(report.collect_runs([tmp_path]))
    busy = round(paired_record([2.0, 9.0, 2.1, 30.0], [1.0, 1.0, 1.05, 1.0]).results.latency["torch/b1"]
                 ["speedup"], 2)
    quiet_row = next(line for line in text.splitlines() if line.startswith("| quiet"))
    busy_row = next(line for line in text.splitlines() if line.startswith("| busy"))
    assert f"({busy:.2f})?" in busy_row and "?" not in quiet_row
    assert "untrusted speed-up" in text
