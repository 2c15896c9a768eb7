import json
import subprocess
import sys


def test_plot_metrics_writes_png(tmp_path):
    rows = [
        {"step": s, "loss": 5.0 / s, "lm_loss": 4.0 / s, "aux_loss": 2.0, "z_loss": 1.0, "orth_loss": 0.1}
        for s in range(1, 6)
    ] + [{"step": 5, "eval_loss": 0.9, "eval_ppl": 2.4}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = subprocess.run(
        [sys.executable, "scripts/plot_metrics.py", str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = subprocess.run(
        [sys.executable, "scripts/plot_metrics.py", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert r.returncode == 2 and "metrics.jsonl not found" in r.stderr
