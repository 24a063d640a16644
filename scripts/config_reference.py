"""Generate docs/configs.md, the reference of every config key, from the dataclasses' field comments.

    python scripts/config_reference.py            # rewrite docs/configs.md
    python scripts/config_reference.py --check    # exit 1 if docs/configs.md is not what this generates
    python scripts/config_reference.py --stdout   # print the page instead

The source of truth is the `# comment` after each field (continued on the comment-only lines
right below it) of GPTConfig (fgpt_jax/model.py), DataConfig (fgpt_jax/data/__init__.py), OptimConfig
(fgpt_jax/optim.py), TrainConfig, DPOConfig and Config (fgpt_jax/config.py). The files are parsed with
`ast` and `tokenize`, not imported: no jax is loaded, and the default is shown as written in the source
(`6e-4`, not `0.0006`). A field without a comment is an error, so a new key cannot reach the page
undocumented. tests/test_docs.py fails when the page is stale, and checks the parsed fields against the
dataclasses at run time.
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configs.md"
# Each config dataclass and the file that declares it.
SOURCES = {
    "Config": "fgpt_jax/config.py",
    "GPTConfig": "fgpt_jax/model.py",
    "DataConfig": "fgpt_jax/data/__init__.py",
    "OptimConfig": "fgpt_jax/optim.py",
    "TrainConfig": "fgpt_jax/config.py",
    "DPOConfig": "fgpt_jax/config.py",
}


@dataclass
class Field:
    name: str
    type: str  # the annotation as written
    default: str  # the default as written (for a group: its default_factory's body)
    comment: str  # the trailing `# comment`, without the '#'
    group: str | None  # the dataclass name this field holds, if it is a group (Config.model, ...)


def _comments(source: str) -> dict[int, str]:
    """{line number: comment text} for every `# comment` token of a file."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _group_of(annotation: ast.expr) -> str | None:
    """The config dataclass named by an annotation such as `GPTConfig | None`, else None."""
    names = {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}
    groups = sorted(names & (set(SOURCES) - {"Config"}))
    return groups[0] if groups else None


def _default(node: ast.expr | None, source: str) -> str:
    """The default as written; `field(default_factory=lambda: X)` shows X, `field(default_factory=C)` shows C()."""
    if node is None:
        return ""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "field":
        for kw in node.keywords:
            if kw.arg == "default":
                return ast.get_source_segment(source, kw.value)
            if kw.arg == "default_factory":
                value = kw.value
                if isinstance(value, ast.Lambda):
                    return ast.get_source_segment(source, value.body)
                return ast.get_source_segment(source, value) + "()"
    return ast.get_source_segment(source, node)


def parse_class(name: str, root: Path = ROOT) -> tuple[str, list[Field]]:
    """(class docstring's first line, the fields in declaration order) of config dataclass `name`."""
    path = root / SOURCES[name]
    source = path.read_text(encoding="utf-8")
    comments = _comments(source)
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            break
    else:
        raise SystemExit(f"error: {SOURCES[name]}: no class {name}")
    doc = (ast.get_docstring(node) or "").split("\n\n")[0].replace("\n", " ")
    fields = []
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        comment = comments.get(stmt.end_lineno, "")
        # A long comment continues on comment-only lines right below the field (the formatter's 120 columns).
        lines, nxt = source.splitlines(), stmt.end_lineno + 1
        while comment and nxt <= len(lines) and lines[nxt - 1].strip().startswith("#"):
            comment, nxt = f"{comment} {comments[nxt]}", nxt + 1
        if not comment:
            raise SystemExit(
                f"error: {SOURCES[name]}:{stmt.lineno}: {name}.{stmt.target.id} has no `# comment` "
                f"after it; every config field documents itself there"
            )
        fields.append(
            Field(
                stmt.target.id,
                ast.get_source_segment(source, stmt.annotation),
                _default(stmt.value, source),
                comment,
                _group_of(stmt.annotation),
            )
        )
    return doc, fields


def all_keys(root: Path = ROOT) -> dict[str, Field]:
    """Every dotted key a config has ("seed", "model.n_layer", ...) and its field."""
    _, top = parse_class("Config", root)
    keys = {}
    for f in top:
        if f.group:
            for sub in parse_class(f.group, root)[1]:
                keys[f"{f.name}.{sub.name}"] = sub
        else:
            keys[f.name] = f
    return keys


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type(annotation: str) -> str:
    if annotation.startswith("Literal["):
        choices = ast.literal_eval("(" + annotation[len("Literal[") : -1] + ",)")
        return " \\| ".join(f"`{c}`" for c in choices)
    return f"`{_cell(annotation)}`"


def _table(prefix: str, fields: list[Field]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in fields:
        lines.append(f"| `{prefix}{f.name}` | {_type(f.type)} | `{_cell(f.default)}` | {_cell(f.comment)} |")
    return lines


def render(root: Path = ROOT) -> str:
    """The whole of docs/configs.md."""
    config_doc, top = parse_class("Config", root)
    out = [
        "# Config reference",
        "",
        "<!-- Generated by scripts/config_reference.py from the field comments of the config dataclasses. "
        "Do not edit: change the comment in the source and run `python scripts/config_reference.py`. "
        "tests/test_docs.py fails when this page is stale. -->",
        "",
        f"{config_doc} A run is one `Config` (`fgpt_jax/config.py`) made of the components' own dataclasses. "
        "Set any key on the command line of `python -m fgpt_jax.train` with `--config.KEY=VALUE` "
        "(for example `--config.model.n_layer=6 --config.train.steps=1000`), or in a config file of "
        "your own (`--config path/to/mine.py`, defining `get_config()`). Values are parsed by the "
        "field's type; an unknown key or a bad value stops with one line naming it.",
        "",
        "The defaults below are the dataclasses' own. The presets in `configs/` (`--config NAME`) set "
        "their own values, and `python -m fgpt_jax.train --config NAME --print-config` prints the "
        "resolved config of any preset with your overrides applied. A run directory keeps its resolved "
        "config as `config.json`.",
        "",
        "## Run",
        "",
        *_table("", [f for f in top if not f.group]),
    ]
    for f in top:
        if not f.group:
            continue
        doc, fields = parse_class(f.group, root)
        out += [
            "",
            f"## `{f.name}`: {f.group} (`{SOURCES[f.group]}`)",
            "",
            f"{doc} `Config.{f.name}`: {f.comment} (default `{f.default}`).",
            "",
            *_table(f"{f.name}.", fields),
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if docs/configs.md is stale")
    mode.add_argument("--stdout", action="store_true", help="print the page instead of writing it")
    args = p.parse_args(argv)
    page = render()
    if args.stdout:
        sys.stdout.write(page)
    elif args.check:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != page:
            print(f"error: {PAGE.relative_to(ROOT)}: stale; run python scripts/config_reference.py", file=sys.stderr)
            return 1
    else:
        PAGE.parent.mkdir(exist_ok=True)
        PAGE.write_text(page, encoding="utf-8")
        print(PAGE.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
