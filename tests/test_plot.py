"""The plot CLI: training curves from metrics.jsonl, and one-line errors for bad runs and outputs."""

import subprocess
import sys
import warnings

import pytest

from fgpt_jax.errors import UserError
from fgpt_jax.metrics import MetricsWriter
from fgpt_jax.plot import figure, main, plot
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


@pytest.mark.slow
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


def _run(root, name, losses, val_every=0):
    path = root / name
    w = MetricsWriter(RunDir(path))
    for s, loss in enumerate(losses, 1):
        w.log(s, {"train/loss": loss, "lr": 1e-3})
        if val_every and s % val_every == 0:
            w.log(s, {"val/loss": loss + 0.1})
    w.close()
    return path


def test_several_runs_share_the_axes_with_a_legend(tmp_path, capsys):
    """`--run A --run B` plotted only B (argparse kept the last): every run's curves go on the same
    axes, labelled by run; the numbers drawn are each run's own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = _run(tmp_path, "a", [5.0, 4.0, 3.0, 2.5], val_every=2)
    b = _run(tmp_path, "b", [6.0, 5.5, 5.0, 4.8, 4.7, 4.6])
    out = tmp_path / "both.png"
    code, stdout, err = plot_main(capsys, "--run", a, "--run", b, "--out", out)
    assert code == 0 and err == "" and stdout.strip() == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    fig = figure([a, b])
    try:
        loss_ax = fig.axes[0]
        lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss_ax.get_lines()}
        assert lines == {
            "a train": ([1, 2, 3, 4], [5.0, 4.0, 3.0, 2.5]),
            "a val": ([2, 4], [4.0 + 0.1, 2.5 + 0.1]),
            "b train": ([1, 2, 3, 4, 5, 6], [6.0, 5.5, 5.0, 4.8, 4.7, 4.6]),
        }
        assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["a train", "a val", "b train"]
        # one colour per run, shared by its train and val curves
        colours = {label: line.get_color() for label, line in zip(lines, loss_ax.get_lines())}
        assert colours["a train"] == colours["a val"] != colours["b train"]
        assert {line.get_label() for line in fig.axes[1].get_lines()} == {"a lr", "b lr"}
    finally:
        plt.close(fig)


def test_several_runs_default_to_curves_png_here_and_same_names_get_paths(tmp_path, monkeypatch, capsys):
    a = _run(tmp_path / "x", "run", [3.0, 2.0])
    b = _run(tmp_path / "y", "run", [4.0, 3.0])
    monkeypatch.chdir(tmp_path)
    code, stdout, err = plot_main(capsys, "--run", a, "--run", b)
    assert code == 0 and err == "" and stdout.strip() == "curves.png" and (tmp_path / "curves.png").is_file()
    assert not (a / "curves.png").exists() and not (b / "curves.png").exists()
    import matplotlib.pyplot as plt

    fig = figure([a, b])
    try:
        assert [line.get_label() for line in fig.axes[0].get_lines()] == [f"{a} train", f"{b} train"]
    finally:
        plt.close(fig)


def test_missing_matplotlib_names_a_command_for_every_install(monkeypatch, run, tmp_path):
    """The hint was `pip install -e ".[plot]"`, which works only inside a clone."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UserError) as e:
        plot(run, tmp_path / "x.png")
    assert str(e.value) == "matplotlib is needed for plots (a dependency of fgpt-jax): pip install matplotlib"


def test_matplotlib_is_a_dependency_of_a_plain_install():
    """Curves are what a user looks at first: `pip install fgpt-jax` (or `pip install .`) brings matplotlib."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").startswith("matplotlib>=") for d in project["dependencies"])
    assert project["optional-dependencies"]["plot"] == []  # kept: `pip install -e ".[plot]"` still works
