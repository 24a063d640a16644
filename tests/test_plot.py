"""The plot CLI: training curves from metrics.jsonl, and one-line errors for bad runs and outputs."""

import subprocess
import sys
import warnings

import pytest

from fgpt_jax.metrics import MetricsWriter
from fgpt_jax.plot import main, plot
from fgpt_jax.rundir import RunDir


def plot_cli(*args):
    """The real `python -m fgpt_jax.plot` (a subprocess: exit status, stdout, stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "fgpt_jax.plot", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def plot_main(capsys, *args):
    """The CLI's main() in-process (the same parser and error handling, without ~3 s of imports)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    w = MetricsWriter(RunDir(path))
    for s in range(1, 21):
        w.log(s, {"train/loss": 10 / s, "lr": 1e-3 * s, "lr_muon": 0.02})
        if s % 5 == 0:
            w.log(s, {"val/loss": 11 / s, "hellaswag/acc_norm": 0.25 + s / 100})
    w.close()
    return path


def test_plot_cli(run, tmp_path):
    out = plot(run)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    r = plot_cli("--run", run, "--out", tmp_path / "curves.svg")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.strip() == str(tmp_path / "curves.svg")
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.svg"]  # no temporary file left behind
    r = plot_cli("--run", tmp_path / "nope")
    assert r.returncode == 2 and "metrics.jsonl: not found" in r.stderr


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"step": 1, "train/loss": 3.0}\n\xff\xfe{"step": 2}\n', "metrics.jsonl:2: not UTF-8 text"),
        (b"[1, 2]\n[3, 4]\n", 'metrics.jsonl: no metrics (expected JSON objects with an integer "step"'),
        (b'"text"\n', "metrics.jsonl: no metrics"),
        (b"", "metrics.jsonl: no metrics"),
    ],
)
def test_bad_metrics_one_line(tmp_path, capsys, content, expected):
    (tmp_path / "metrics.jsonl").write_bytes(content)
    code, out, err = plot_main(capsys, "--run", tmp_path)
    assert code == 2 and out == "", err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("curves.xyz", "unknown image extension '.xyz'; expected one of "),
        ("curves", "no image extension; expected one of "),
        ("missing/curves.png", "directory"),
    ],
)
def test_bad_out_one_line(run, tmp_path, capsys, name, expected):
    code, out, err = plot_main(capsys, "--run", run, "--out", tmp_path / name)
    assert code == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith(f"error: --out {tmp_path / name}: ") and expected in err
    if "extension" in expected:
        assert ".png" in err and ".svg" in err and ".pdf" in err
    assert list(tmp_path.iterdir()) == []


def test_real_cli_bad_out(run, tmp_path):
    r = plot_cli("--run", run, "--out", tmp_path / "curves.xyz")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith(f"error: --out {tmp_path / 'curves.xyz'}: unknown image extension '.xyz'")


def test_only_val_loss_plots_without_warnings(tmp_path):
    """A run that logged no train/loss or lr yet still plots, and matplotlib warns about nothing
    (an empty legend was a UserWarning on stderr)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val/loss": 10.9}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert plot(tmp_path) == tmp_path / "curves.png"
    assert [str(w.message) for w in caught] == [] and (tmp_path / "curves.png").is_file()
