"""CORE's eval bundle: the task list, the random baselines and the task items, read and checked.

An eval bundle is nanochat's directory layout (what its `eval_bundle.zip` unpacks to):

    core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type, continuation_delimiter}]
    eval_meta_data.csv   a row per task: `Eval Task` (the label) and `Random baseline` (percent), other columns unused
    eval_data/<dataset_uri>   one JSON object per line, by icl_task_type:
                         multiple_choice    {query, choices: [str], gold: int}
                         schema             {context_options: [str], continuation, gold: int}
                         language_modeling  {context, continuation}

`read_bundle(dir)` checks core.yaml and the CSV whole (every task has a known type, a baseline, a
few-shot count), `Bundle.select(labels)` picks tasks (an unknown label lists the valid ones),
`load_items(task, max_per_task)` reads one task's items, each checked with its `file:line`, then
shuffles them with `random.Random(1337)` and keeps the first `max_per_task`, as nanochat's
scripts/base_eval.py does, so the items and their order (which seeds the few-shot draws) match it.
A task whose file is missing is reported by `Bundle.missing()`, not refused: a bundle may hold
fewer than its 22 tasks, and the result then says so.

`download_bundle()` fetches nanochat's public eval_bundle.zip once into
`$FGPT_JAX_CACHE/core/eval_bundle/` (checked, atomic, resumable: fgpt_jax.data.download). No hash of
the zip is published, so the check is structural: every member's CRC-32 (zipfile.testzip), an
`eval_bundle/` folder with core.yaml and eval_meta_data.csv that read_bundle accepts. It is unpacked
into a temporary folder beside the cache and renamed into place, so the cache holds a whole,
checked bundle or none.
"""

from __future__ import annotations

import csv
import json
import math
import random
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml  # PyYAML: nanochat reads core.yaml with yaml.safe_load

from fgpt_jax.data import cache_root
from fgpt_jax.data.download import fetch as checked_fetch
from fgpt_jax.data.download import file_lock
from fgpt_jax.errors import UserError

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's EVAL_BUNDLE_URL
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # nanochat: random.Random(1337).shuffle(data) before the --max-per-task cut
FEWSHOT_SEED = 1234  # nanochat: random.Random(1234 + i).sample(other indices, num_fewshot) for item i


class CoreError(UserError, ValueError):
    """An unusable eval bundle or CORE option; the message names the file (and line) or the flag."""


@dataclass(frozen=True)
class Task:
    """One CORE task as core.yaml and eval_meta_data.csv describe it."""

    label: str
    task_type: str  # one of TASK_TYPES
    path: Path  # eval_data/<dataset_uri>
    num_fewshot: int
    delimiter: str  # continuation_delimiter, default " "
    baseline: float  # random baseline in percent


@dataclass(frozen=True)
class Item:
    """One task item: its JSON object and where it came from (`file:line`, for messages)."""

    data: dict = field(hash=False)
    where: str = ""


@dataclass(frozen=True)
class Bundle:
    root: Path
    tasks: tuple[Task, ...]

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.tasks]

    def select(self, labels: list[str] | None) -> Bundle:
        """The named tasks, in core.yaml's order (None: all)."""
        if labels is None:
            return self
        known = set(self.labels)
        unknown = [x for x in labels if x not in known]
        if unknown:
            raise CoreError(
                f"--tasks: unknown task {', '.join(map(repr, unknown))}; the bundle {self.root} has "
                f"{', '.join(self.labels)}"
            )
        want = set(labels)
        return Bundle(self.root, tuple(t for t in self.tasks if t.label in want))

    def missing(self) -> list[Task]:
        """Tasks whose data file is absent."""
        return [t for t in self.tasks if not t.path.is_file()]


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise CoreError(f"{path}: file not found (expected the eval bundle's {what})")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CoreError(f"{path}: expected UTF-8 text ({e})") from None


def read_baselines(path: Path) -> dict[str, float]:
    """{label: random baseline in percent} from eval_meta_data.csv."""
    rows = list(csv.reader(_read_text(path, "eval_meta_data.csv").splitlines()))
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise CoreError(f"{path}:1: expected a CSV header with columns 'Eval Task' and 'Random baseline'")
    head = rows[0]
    name_col, base_col = head.index("Eval Task"), head.index("Random baseline")
    out = {}
    for lineno, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(head):
            raise CoreError(f"{path}:{lineno}: expected {len(head)} columns, got {len(row)}")
        try:
            value = float(row[base_col])
        except ValueError:
            value = math.nan
        if not 0 <= value < 100:
            raise CoreError(
                f"{path}:{lineno}: expected a random baseline in percent, 0 <= b < 100, got {row[base_col]!r}"
            )
        out[row[name_col]] = value
    return out


def _task(entry, i: int, path: Path, root: Path, baselines: dict[str, float], meta: Path) -> Task:
    where = f"{path}: icl_tasks[{i}]"
    if not isinstance(entry, dict):
        raise CoreError(f"{where}: expected a mapping with label, dataset_uri, num_fewshot, icl_task_type")
    label = entry.get("label")
    if not isinstance(label, str) or not label:
        raise CoreError(f"{where}: expected a string 'label'")
    where = f"{path}: task {label!r}"
    uri = entry.get("dataset_uri")
    if not isinstance(uri, str) or not uri or Path(uri).is_absolute() or ".." in Path(uri).parts:
        raise CoreError(f"{where}: expected 'dataset_uri', a relative path under eval_data/, got {uri!r}")
    kind = entry.get("icl_task_type")
    if kind not in TASK_TYPES:
        raise CoreError(f"{where}: expected icl_task_type one of {', '.join(TASK_TYPES)}, got {kind!r}")
    shots = entry.get("num_fewshot")
    if isinstance(shots, list) and len(shots) == 1:  # nanochat reads num_fewshot[0]
        shots = shots[0]
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise CoreError(
            f"{where}: expected num_fewshot, a list of one count >= 0 ([10]), got {entry.get('num_fewshot')!r}"
        )
    delimiter = entry.get("continuation_delimiter", " ")
    if not isinstance(delimiter, str):
        raise CoreError(f"{where}: expected a string continuation_delimiter, got {delimiter!r}")
    if label not in baselines:
        raise CoreError(f"{meta}: no 'Eval Task' row for {label!r} (its 'Random baseline' is needed)")
    return Task(label, kind, root / "eval_data" / uri, shots, delimiter, baselines[label])


def read_bundle(root: str | Path) -> Bundle:
    """The bundle at `root` (core.yaml, eval_meta_data.csv; see the module docstring), checked."""
    root = Path(root)
    if not root.is_dir():
        raise CoreError(f"--data {root}: expected an eval bundle directory (core.yaml, eval_meta_data.csv, eval_data/)")
    path = root / "core.yaml"
    try:
        doc = yaml.safe_load(_read_text(path, "core.yaml"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise CoreError(f"{path}{line}: expected YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("icl_tasks"), list) or not doc["icl_tasks"]:
        raise CoreError(f"{path}: expected a mapping with a non-empty list 'icl_tasks'")
    meta = root / "eval_meta_data.csv"
    baselines = read_baselines(meta)
    tasks = tuple(_task(e, i, path, root, baselines, meta) for i, e in enumerate(doc["icl_tasks"]))
    seen: set[str] = set()
    for t in tasks:
        if t.label in seen:
            raise CoreError(f"{path}: task {t.label!r} is listed twice")
        seen.add(t.label)
    return Bundle(root, tasks)


def _is_index(value, n: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n


def _check_item(doc, kind: str, where: str) -> None:
    if not isinstance(doc, dict):
        raise CoreError(f"{where}: expected a JSON object, got {type(doc).__name__}")

    def strings(key: str) -> list:
        v = doc.get(key)
        if not (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
            raise CoreError(f"{where}: expected {key!r}, a non-empty list of strings ({kind})")
        return v

    def string(key: str) -> None:
        if not isinstance(doc.get(key), str):
            raise CoreError(f"{where}: expected a string {key!r} ({kind})")

    if kind == "multiple_choice":
        string("query")
        options = strings("choices")
    elif kind == "schema":
        options = strings("context_options")
        string("continuation")
    else:
        string("context")
        string("continuation")
        return
    if not _is_index(doc.get("gold"), len(options)):
        raise CoreError(f"{where}: expected 'gold', an index 0..{len(options) - 1}, got {doc.get('gold')!r}")


def read_items(task: Task) -> list[Item]:
    """Every item of `task`'s file, in file order, each checked (blank lines skipped)."""
    text = _read_text(task.path, f"data file of task {task.label!r}")
    items = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{task.path}:{lineno}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise CoreError(f"{where}: expected one JSON object per line ({e.msg})") from None
        _check_item(doc, task.task_type, where)
        items.append(Item(doc, where))
    if not items:
        raise CoreError(f"{task.path}: expected items of task {task.label!r}, found none")
    return items


def load_items(task: Task, max_per_task: int | None = None) -> list[Item]:
    """`task`'s items as nanochat scores them: shuffled with random.Random(1337), then the first
    `max_per_task` (None: all). Refuses a cut that leaves too few items to draw the few-shot
    examples from (nanochat's `rng.sample` would stop with "sample larger than population")."""
    if max_per_task is not None and max_per_task < 1:
        raise CoreError(f"--max-per-task: expected a positive number of items, got {max_per_task}")
    items = read_items(task)
    random.Random(SHUFFLE_SEED).shuffle(items)
    if max_per_task is not None:
        items = items[:max_per_task]
    if task.num_fewshot and len(items) <= task.num_fewshot:
        raise CoreError(
            f"{'--max-per-task ' + str(max_per_task) if max_per_task else task.path}: task {task.label!r} "
            f"draws {task.num_fewshot} few-shot examples from its other items, so it needs at least "
            f"{task.num_fewshot + 1} items, got {len(items)}"
        )
    return items


def bundle_dir() -> Path:
    """Where `download_bundle` keeps the unpacked bundle."""
    return Path(cache_root()) / "core" / "eval_bundle"


def _check_zip(part: Path) -> None:
    try:
        with zipfile.ZipFile(part) as z:
            bad = z.testzip()
            names = set(z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CoreError(f"{part}: not a readable zip archive ({e})") from None
    if bad is not None:
        raise CoreError(f"{part}: member {bad} fails its CRC-32 check (a corrupt download)")
    for need in ("eval_bundle/core.yaml", "eval_bundle/eval_meta_data.csv"):
        if need not in names:
            raise CoreError(f"{part}: expected nanochat's eval bundle, with {need}; not in the archive")


def download_bundle(url: str = BUNDLE_URL, progress=None) -> Path:
    """The unpacked eval bundle in the cache, downloaded and unpacked on first use (see the module
    docstring). `progress(done, total)` follows the download's bytes."""
    dest = bundle_dir()
    if (dest / "core.yaml").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.parent / ".eval_bundle.lock"):
        if (dest / "core.yaml").is_file():
            return dest
        archive = checked_fetch(url, dest.parent / "eval_bundle.zip", _check_zip, error=CoreError, progress=progress)
        with tempfile.TemporaryDirectory(prefix=".eval_bundle.", dir=dest.parent) as tmp:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)  # extractall drops absolute paths and '..' from member names
            read_bundle(Path(tmp) / "eval_bundle")  # the archive's own core.yaml and CSV must read
            if dest.exists():
                shutil.rmtree(dest)  # a folder without core.yaml: not a bundle this code wrote
            (Path(tmp) / "eval_bundle").rename(dest)
        archive.unlink()  # unpacked and checked: the zip is not needed again
    return dest


__all__ = [
    "BUNDLE_URL",
    "TASK_TYPES",
    "CoreError",
    "Task",
    "Item",
    "Bundle",
    "read_bundle",
    "read_baselines",
    "read_items",
    "load_items",
    "bundle_dir",
    "download_bundle",
]
