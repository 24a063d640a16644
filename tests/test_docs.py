"""The manual stays true to the code: the generated config reference is current and matches the
dataclasses, links between pages resolve, every `--config.KEY` / `--config NAME` / `python -m ...`
the pages mention exists, and nothing in the project points at a sibling folder a user's clone lacks."""

import dataclasses
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES_PAGES = [ROOT / "tests" / "data" / "SOURCES.md", ROOT / "fgpt_jax" / "assets" / "SOURCES.md"]


def _reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_current():
    page = (ROOT / "docs" / "configs.md").read_text(encoding="utf-8")
    assert page == _reference().render(), "docs/configs.md is stale: run python scripts/config_reference.py"


def _runtime_fields(cls, prefix=""):
    """{dotted key: (class, dataclass field)} of a config class, groups (`GPTConfig | None`, ...) expanded."""
    import typing

    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        group = next((t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)), None)
        if group is not None:
            out.update(_runtime_fields(group, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (cls, f)
    return out


def test_config_reference_matches_the_dataclasses():
    from fgpt_jax.config import Config

    parsed = _reference().all_keys()
    runtime = _runtime_fields(Config)
    assert list(parsed) == list(runtime)  # same keys, same order
    checked = 0
    for key, (cls, f) in runtime.items():
        try:
            written = __import__("ast").literal_eval(parsed[key].default)
        except ValueError:
            continue  # an expression, not a literal
        assert getattr(cls(), f.name) == written, key
        checked += 1
    assert checked > 40  # nearly every default is a literal


def test_a_field_without_a_comment_is_refused(tmp_path):
    ref = _reference()
    for rel in set(ref.SOURCES.values()):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    path = tmp_path / "fgpt_jax/optim.py"
    text = path.read_text()
    new = re.sub(r"(    ns_steps: int = 5)  #.*", r"\1", text)
    assert new != text
    path.write_text(new)
    with pytest.raises(SystemExit, match="OptimConfig.ns_steps has no `# comment`"):
        ref.render(tmp_path)
    path.write_text(text.replace("# Newton-Schulz iterations", "# Newton-Schulz steps per update"))
    assert "| `optim.ns_steps` | `int` | `5` | Newton-Schulz steps per update |" in ref.render(tmp_path)


def _links(page: Path):
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_links_between_pages_resolve():
    checked = 0
    for page in PAGES:
        for target in _links(page):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)}: link to {target} does not resolve"
            checked += 1
    assert checked > 20


def _mentions(pattern: str, pages=PAGES):
    for page in pages:
        for m in re.finditer(pattern, page.read_text(encoding="utf-8")):
            yield page.relative_to(ROOT), m.group(1)


def test_config_keys_and_presets_named_in_the_pages_exist():
    from fgpt_jax.config import list_presets

    keys = _reference().all_keys()
    named = [(page, key) for page, key in _mentions(r"--config\.([a-z_][a-z0-9_.]*)=") if key != "a.b"]  # a.b: usage
    assert len(named) > 20
    for page, key in named:
        assert key in keys, f"{page}: --config.{key} is not a config key"
    presets = list(_mentions(r"--config[ =]([A-Za-z0-9_-]+)\b(?![./])"))
    assert presets
    for page, name in presets:
        assert name.replace("-", "_") in list_presets() or name in ("NAME", "FILE_OR_PRESET", "PRESET"), (
            f"{page}: --config {name} is not a preset"
        )


def test_commands_named_in_the_pages_exist():
    modules = {m for _, m in _mentions(r"python -m (fgpt_jax\.\w+(?:\.\w+)*)")}
    assert {
        "fgpt_jax.train",
        "fgpt_jax.data",
        "fgpt_jax.eval",
        "fgpt_jax.generate",
        "fgpt_jax.chat",
        "fgpt_jax.hf",
        "fgpt_jax.plot",
    } <= modules
    for name in modules:
        spec = importlib.util.find_spec(name)
        assert spec is not None, f"python -m {name}: no such module"
        if spec.submodule_search_locations:  # a package runs through its __main__
            assert importlib.util.find_spec(name + ".__main__") is not None, name


def test_files_named_in_the_pages_exist():
    pattern = r"\b((?:fgpt_jax|configs|scripts|tests|benchmarks)/[\w./-]*\w\.(?:py|md|txt|json|csv))\b"
    named = set(_mentions(pattern, PAGES + SOURCES_PAGES))
    assert {"scripts/config_reference.py", "scripts/bench_train.py", "configs/fgpt.py"} <= {f for _, f in named}
    for page, name in named:
        assert (ROOT / name).is_file(), f"{page}: names {name}, which does not exist"


def test_nothing_points_at_the_sibling_data_folder():
    # Spelled in pieces so this file does not match itself.
    needles = [b"../" + b"shared", b"DESIGN" + b".md"]
    roots = [ROOT / d for d in ("fgpt_jax", "configs", "scripts", "docs", "tests")] + [ROOT / "README.md"]
    files = [
        p for r in roots for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file() and "__pycache__" not in p.parts
    ]
    assert len(files) > 50
    bad = [f"{p.relative_to(ROOT)}: {n.decode()}" for p in files for n in needles if n in p.read_bytes()]
    assert not bad, "; ".join(bad)


def test_readme_layout_lists_every_module():
    block = re.search(r"## Layout\n+```\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    listed = set(re.findall(r"\b([a-z0-9_]+\.py)\b", block))
    modules = {p.name for p in (ROOT / "fgpt_jax").rglob("*.py") if p.name != "__init__.py"}
    assert listed == modules, f"README layout: missing {sorted(modules - listed)}, stale {sorted(listed - modules)}"
