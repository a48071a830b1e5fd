"""benchmarks/bench_accel.py runs end to end (--smoke: tiny shapes on whatever backend is present) and reports the
three figures with the device's name; the full shapes need an accelerator and are run by hand there."""

import json
import os
import subprocess
import sys

import pytest
from cpu_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_accel_smoke(tmp_path):
    out = tmp_path / "accel.json"
    env = cpu_env(1, PYTHONPATH=ROOT)  # one device is enough; tiny shapes, so the suite's compile-light level
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_accel.py"), "--smoke", "--json",
                           str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"]["device_kind"] and report["device"]["peak_flops"] > 0
    assert report["train"]["flops"] > 0 and 0 < report["train"]["mfu"]
    assert [r["batch"] for r in report["decode"]] == [1, 4]
    assert all(r["tokens_per_s"] > 0 and r["hbm_fraction"] > 0 for r in report["decode"])
    assert report["apa"]["flops"] > 0 and report["apa"]["seconds"] > 0
    m = report["sharded_attention"]  # on CPU "auto" is dense; on a TPU/GPU host the vendor kernel on the mesh
    assert m["seconds"] > 0 and m["rows"] == m["devices"] >= 1 and m["attention"] in ("dense", "splash", "cudnn")
    assert "MFU" in proc.stdout and "HBM bandwidth" in proc.stdout
