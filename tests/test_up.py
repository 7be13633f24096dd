"""`patchcore up`, the one-command demo, on the synthetic line and on the real video."""
import json

from typer.testing import CliRunner

from patchcore.cli import app

from .conftest import VIDEO, needs_video


def run_up(tmp_path, *args):
    summary_path = tmp_path / "summary.json"
    result = CliRunner().invoke(app, ["up", "--no-progress", "--json", str(summary_path), *args])
    assert result.exit_code == 0, result.output
    return json.loads(summary_path.read_text()), result.output


def test_up_on_the_synthetic_line_prints_alarms_and_a_summary(tmp_path, mobilenet):
    summary, output = run_up(tmp_path, "--frames", "48", "--source", "synthetic:seed=5,defect_rate=0.3")
    assert summary["frames_in"] == 48 and summary["results_out"] == 48
    assert summary["dropped"] == 0 and summary["deadlettered"] == 0
    assert summary["alarms"] >= 1 and output.count("ALARM camera=cam-1") == summary["alarms"]
    from ingest.sources import SyntheticLine

    line = SyntheticLine(seed=5, defect_rate=0.3)
    # each alarm's 3-of-4 window (the alarm frame and the three before it) holds a defective part
    assert all(any(line.defect_at(s) for s in range(max(0, seq - 3), seq + 1)) for seq in summary["alarm_seqs"])
    for key in ("latency_ms_p50", "latency_ms_p99", "frames_per_second"):
        assert summary[key] > 0
    # paced like a camera by default, and the summary says what it measured
    assert (summary["mode"], summary["fps_target"]) == ("paced", 10.0) and summary["measured"].startswith("latency")
    assert "camera paced at 10 frames/s" in output
    assert summary["frames_per_second"] <= 10.0 * 1.05  # never faster than the camera


def test_up_with_fps_0_is_a_throughput_run(tmp_path, synthetic_bank_bytes):
    bank = tmp_path / "synthetic.bank"
    bank.write_bytes(synthetic_bank_bytes)
    summary, output = run_up(tmp_path, "--frames", "16", "--fps", "0", "--bank", str(bank))
    assert summary["results_out"] == 16
    assert (summary["mode"], summary["fps_target"], summary["kept_up"]) == ("unthrottled", None, None)
    assert summary["measured"].startswith("throughput") and "camera unthrottled" in output
    assert summary["pipelined"] is True  # the default
    summary, _ = run_up(tmp_path, "--frames", "16", "--fps", "0", "--bank", str(bank), "--no-prefetch", "--max-batch", "4")
    assert summary["pipelined"] is False and summary["results_out"] == 16 and summary["deadlettered"] == 0


def test_up_runs_the_backbone_in_the_precision_asked_and_refuses_one_it_cannot(tmp_path, synthetic_bank_bytes):
    """`up --precision int8`: the worker scores every frame with the int8 graph (the bank's calibration windows), and
    the summary says how the backbone ran; a combination the CPU cannot run is refused before anything starts."""
    bank = tmp_path / "synthetic.bank"
    bank.write_bytes(synthetic_bank_bytes)
    summary, _ = run_up(tmp_path, "--frames", "12", "--fps", "0", "--bank", str(bank), "--precision", "int8")
    assert summary["results_out"] == 12 and summary["deadlettered"] == 0
    assert (summary["compute"]["precision"], summary["compute"]["engine"]) == ("int8", "onnxruntime")
    default, _ = run_up(tmp_path, "--frames", "4", "--fps", "0", "--bank", str(bank))
    assert default["compute"]["precision"] == "fp32"  # the CPU's default, as eval reports it
    refused = CliRunner().invoke(app, ["up", "--precision", "int8", "--engine", "torch", "--frames", "4"])
    assert refused.exit_code == 2 and "int8 runs in engine onnxruntime only" in refused.output
    assert "embedded redis-server" not in refused.output  # refused first


@needs_video
def test_up_on_the_real_video(tmp_path, mobilenet):
    summary, _ = run_up(tmp_path, "--source", str(VIDEO), "--frames", "40", "--warmup-frames", "20")
    assert summary["frames_in"] == 40 and summary["results_out"] == 40
