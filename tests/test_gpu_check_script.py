"""scripts/gpu_check.sh, without a GPU: its steps are commands this version of the CLI accepts, its deadline skips
what does not fit, and its one table reads what the steps write (fed here with results shaped like a GPU run's:
the figures in them are made up for the test, not measured)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

from sdstudio.train.gpu_report import build_report

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(env_extra: dict, out: Path) -> subprocess.CompletedProcess:
    import sys

    env = dict(os.environ, PYTHON=sys.executable, **env_extra)
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=300)


def test_every_step_is_a_command_the_cli_accepts(tmp_path):
    from sdstudio.cli import build_parser

    r = _run({"GPU_CHECK_DRY_RUN": "1"}, tmp_path)
    assert r.returncode == 0, r.stderr
    steps = dict(line.split("\t", 1) for line in r.stdout.strip().splitlines())
    assert list(steps) == ["build-sd15", "pytest-gpu", "bench-train-sd15", "bench-vram", "bench-speed", "build-sdxl",
                           "bench-train-sdxl"]
    parser = build_parser()
    for name, cmd in steps.items():
        argv = shlex.split(cmd)
        if argv[1:3] == ["-m", "sdstudio"]:
            args = parser.parse_args(argv[3:])  # exits (SystemExit) on an unknown or malformed option
            assert args.func is not None, name
    assert "-m gpu" in steps["pytest-gpu"] and "--junitxml" in steps["pytest-gpu"]
    assert "--speed" in steps["bench-speed"] and "--jobs" in steps["bench-vram"]


def test_a_spent_deadline_skips_every_step_and_still_prints_the_table(tmp_path):
    r = _run({"GPU_CHECK_SECONDS": "0", "GPU_CHECK_WORK": str(tmp_path / "work")}, tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = (tmp_path / "out" / "steps.tsv").read_text().splitlines()
    assert len(rows) == 7 and all(row.split("\t")[1] == "skip" for row in rows)
    assert "GPU CHECK" in r.stdout and "skipped" in r.stdout and "ISSUE #18 TARGETS" in r.stdout
    assert (tmp_path / "out" / "table.txt").read_text().strip() in r.stdout


def _write_fake_run(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "env.txt").write_text("NVIDIA H200, 143771 MiB\ntorch 2.11.0 cuda 13.0\n")
    (out / "steps.tsv").write_text("build-sd15\t0\t21\npytest-gpu\t1\t140\nbench-speed\t124\t130\nbuild-sdxl\tskip\t0\n")
    (out / "pytest-gpu.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_gpu_cuda" name="test_a"/>'
        '<testcase classname="tests.test_gpu_cuda" name="test_b"><failure message="assert 3 &gt; 4">x</failure>'
        '</testcase><testcase classname="tests.test_gpu_cuda" name="test_c"><skipped/></testcase>'
        '</testsuite></testsuites>')
    row = dict(arch="sd15", preset="character-lora-sd15-8gb", batch=8, resolution=512, steps_per_s=30.0,
               samples_per_s=240.0, peak_allocated_gb=9.0, peak_reserved_gb=10.0, device_name="NVIDIA H200", note="")
    train = [dict(row, row="throughput", variant="ours", option="ours", mfu=0.41, speed_ratio=1.3, memory_ratio=0.8),
             dict(row, row="throughput", variant="reference", option="reference", mfu=0.31, samples_per_s=185.0),
             dict(arch="sd15", row="6 GB", variant="reference", option="reference", preset="character-lora-sd15-6gb",
                  note="", error="out of memory")]
    (out / "train-sd15.json").write_text(json.dumps({"kind": "train", "results": train}))
    vram = {"last_run": [dict(preset="character-lora-sd15-6gb", arch="sd15", resolution=512, batch=1, estimate_gb=4.7,
                              total_gb=3.6, peak_reserved_gb=3.1, peak_allocated_gb=2.8, context_gb=0.5,
                              device_name="NVIDIA H200", within_estimate=True)]}
    (out / "measured-vram.json").write_text(json.dumps(vram))


def test_the_table_reads_every_step_and_judges_the_targets(tmp_path):
    _write_fake_run(tmp_path / "out")
    table = build_report(tmp_path / "out")
    assert "NVIDIA H200, 143771 MiB" in table
    assert "pytest-gpu" in table and "FAILED (1)" in table and "TIME OUT" in table and "skipped" in table
    assert "1 passed, 1 failed, 1 skipped" in table and "FAILED test_gpu_cuda::test_b: assert 3 > 4" in table
    assert "41.0%" in table and "out of memory" in table
    assert "PASS  SD 1.5 LoRA 512 px batch 1, 6 GB preset: peak <= 4 GB: 3.60 GB" in table
    assert "MISS  SD 1.5 LoRA batch 8: MFU >= 45%: 41.0% (240 samples/s)" in table
    assert "PASS  sd15 throughput (character-lora-sd15-8gb): ours/plain diffusers >= 1.2x" in table
    assert "n/a   SDXL LoRA 1024 px batch 1, 8 GB preset" in table
    assert "(not run)" in table  # the speed options never wrote their file
