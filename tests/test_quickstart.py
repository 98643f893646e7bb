"""The README's first command on the real data and the real model: the longest test of the suite, in a file
of its own so that one pytest-xdist worker starts it first while the other takes the rest (conftest.py)."""

from __future__ import annotations

import pytest

from conftest import WORKER_THREADS, read_summary, run_cli


@pytest.mark.slow
def test_quickstart_reaches_its_accuracy_on_real_data(tmp_path):
    out = tmp_path / "quickstart"
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", f"output_dir={out}"],
        # the machine's two cores when the suite runs in one process, a worker's share under pytest-xdist
        env={"OMP_NUM_THREADS": str(WORKER_THREADS or 2)},
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = read_summary(out)
    print(
        f"quickstart: validation accuracy {summary['eval']['validation']['accuracy']:.4f}, "
        f"test accuracy {summary['eval']['test']['accuracy']:.4f}, {summary['train_seconds']:.0f}s"
    )
    assert summary["eval"]["validation"]["accuracy"] >= 0.78
