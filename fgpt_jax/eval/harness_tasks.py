"""lm-evaluation-harness tasks and result files for fgpt_jax.eval.harness: task names checked (and
unknown ones answered with the valid ones) before anything runs, --include-path checked, lm-eval's
own result files written atomically, results made strict JSON.

Importing it without lm-eval (the optional extra `pip install "fgpt-jax[eval]"`) raises a one-line
`HarnessError` saying how to install it.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fgpt_jax.errors import UserError


class HarnessError(UserError):
    """Bad lm-evaluation-harness input (a task, --include-path, generation kwargs, --output-path)."""


try:
    from lm_eval import utils as lm_utils
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml
except ImportError as e:
    raise HarnessError(
        f"lm_eval: cannot be imported ({e}); lm-evaluation-harness is an optional extra: pip install "
        f'"fgpt-jax[eval]" (or pip install "lm_eval[api]==0.4.13")'
    ) from None


# -- tasks ----------------------------------------------------------------------------------------------
def _yaml_problems(root: Path) -> list[str]:
    """'<file>: <error>' for each *.yaml under `root` that lm-eval cannot read (its index skips them silently)."""
    problems = []
    for path in sorted(root.rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False, recursive=True)
        except Exception as e:  # noqa: BLE001 (yaml, include and file errors: all mean "cannot be read")
            problems.append(f"{path}: {' '.join(str(e).split())[:200]}")
    return problems


def names_of(tasks: str | Sequence[str]) -> list[str]:
    """Task names from "a,b" strings or lists of them, each once, in order; empty names are refused."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for item in items for t in str(item).split(",")]
    if not names or any(not t for t in names):
        raise HarnessError(f"--tasks {','.join(map(str, items))!r}: expected task names separated by commas")
    return list(dict.fromkeys(names))


def _local_only(manager, names: list[str]) -> bool:
    """Whether every name, and every task a group among them lists by name, is in `manager`'s index."""
    index = manager.task_index

    def found(name: str, depth: int = 0) -> bool:
        entry = index.get(name)
        if entry is None or depth > 8:
            return False
        children = (entry.cfg or {}).get("task", []) if entry.kind.name == "GROUP" else []
        children = children if isinstance(children, list) else [children]
        return all(found(c, depth + 1) for c in children if isinstance(c, str))

    return all(found(n) for n in names)


@functools.cache
def _task_manager(include_path: str | None, include_defaults: bool) -> TaskManager:
    """One TaskManager per directory set, kept for the process: indexing lm-eval's registry takes seconds.
    A manager re-reads a task's YAML whenever it builds the task, so edits are seen; only a task file
    added to the directory later in the same process is not (`_task_manager.cache_clear()`)."""
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def resolve_tasks(tasks: str | Sequence[str], include_path: str | os.PathLike | None = None):
    """(lm-eval TaskManager, task names): names split at commas, checked before anything is evaluated.

    A name is a task, group or tag of lm-eval's registry or of the task YAMLs under `include_path`
    (which win over the registry's), a glob pattern of them, or a path to a task YAML file. Indexing
    the registry (~14,700 names) takes seconds, so when every name, and every task its groups list,
    is found under `include_path`, only that directory is indexed."""
    names = names_of(tasks)
    local = None
    if include_path is not None:
        root = Path(include_path)
        if not root.is_dir():
            raise HarnessError(f"--include-path {root}: {'not a directory' if root.exists() else 'no such directory'}")
        problems = _yaml_problems(root)
        if problems:
            raise HarnessError(
                f"--include-path {root}: {problems[0]}" + (f" (and {len(problems) - 1} more)" * (len(problems) > 1))
            )
        local = _task_manager(str(root.resolve()), False)
        if not local.all_tasks:
            raise HarnessError(f"--include-path {root}: no lm-eval task YAML (a file with a task: or group: key) in it")
    for n in names:
        if n.endswith(".yaml") and not Path(n).is_file():
            raise HarnessError(f"--tasks {n}: no such task YAML file")
    by_name = [n for n in names if not n.endswith(".yaml")]
    if (
        local is not None
        and all(local.match_tasks([n]) for n in by_name)
        and _local_only(local, local.match_tasks(by_name))
    ):
        manager = local
    else:
        manager = _task_manager(None if include_path is None else str(Path(include_path).resolve()), True)
    resolved: list[str] = []
    for n in names:
        matches = [str(Path(n).resolve())] if n.endswith(".yaml") else manager.match_tasks([n])
        if not matches:
            raise HarnessError(_unknown_task(n, manager, local))
        resolved += [m for m in matches if m not in resolved]
    return manager, resolved


def _unknown_task(name: str, manager, local) -> str:
    registry = manager.all_tasks
    close = difflib.get_close_matches(name, registry, n=5, cutoff=0.6)
    parts = [f"--tasks {name}: not a task, group or tag"]
    if local is not None:
        parts.append(f"under --include-path: {', '.join(local.all_tasks)}")
    parts.append(
        f"closest of lm-eval's {len(registry)}: {', '.join(close)}" if close else f"lm-eval knows {len(registry)}"
    )
    return "; ".join(parts) + " (python -m lm_eval ls tasks lists them all)"


# -- output ---------------------------------------------------------------------------------------------
def check_output_path(output_path: str | os.PathLike | None) -> Path | None:
    """Refuse an --output-path that cannot be written, before anything runs: a directory (lm-eval writes
    DIR/<model>/results_<date>.json there) or a NAME.json (NAME_<date>.json beside it)."""
    if output_path is None:
        return None
    path = Path(output_path)
    base = path.parent if path.suffix == ".json" else path
    if base.exists() and not base.is_dir():
        raise HarnessError(f"--output-path {path}: {base} exists and is not a directory")
    existing = base
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise HarnessError(f"--output-path {path}: {existing} is not a writable directory")
    return path


def write_outputs(tracker, results: dict, samples: dict | None, path: Path, tmp: Path) -> list[str]:
    """lm-eval's own result files, written by its EvaluationTracker into `tmp`, then renamed into place
    (a failed or interrupted write leaves nothing that looks complete)."""
    base = path.parent if path.suffix == ".json" else path
    try:
        tracker.save_results_aggregated(results=results, samples=samples)
        for task_name in results.get("configs", {}) if samples else []:
            if task_name in samples:
                tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
        written = sorted(p for p in tmp.rglob("*") if p.is_file())
        if not written:
            raise HarnessError(f"--output-path {path}: lm-eval wrote no result file (set FGPT_JAX_DEBUG=1 for its log)")
        final = []
        for p in written:
            dest = base / p.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dest)
            final.append(str(dest))
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def jsonable(obj):
    """lm-eval's results as strict JSON values: numpy scalars to Python, NaN and infinities to None,
    anything else (functions in task configs, ...) through lm-eval's own handle_non_serializable."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return jsonable(lm_utils.handle_non_serializable(obj))
