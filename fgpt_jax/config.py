"""Typed run configs: nested dataclasses, Python config files, dotted CLI overrides, JSON.

A run is described by one `Config`: model shape, data, optimizer and the training loop. Each
component owns its dataclass (`GPTConfig` in model.py, `DataConfig` in data/, `OptimConfig` in
optim.py); this module declares the loop's `TrainConfig` and DPO's `DPOConfig`, composes them,
and provides the machinery:

- `load_config("tiny" | "path/to/mine.py")`: a preset name resolves to `configs/<name>.py`, which
  ships inside the package as `fgpt_jax.configs` (so a plain `pip install` trains); a config file
  defines `get_config() -> Config`.
- `resolve_config(...)`: the one resolution of a run's config (preset or the resumed run's own
  config.json, then overrides, then the base run's model for fine-tuning), called by the training
  CLI and by `fgpt_jax.train.train` alike.
- `apply_overrides(cfg, ["model.n_layer=4", ...])`: the ml_collections convention
  (`--config.model.n_layer=4` on the command line). Values are parsed by the field's declared type;
  unknown keys and unparsable values fail with a message listing the valid keys.
- `to_json` / `from_json`: lossless round trip, so `config.json` in a run dir rebuilds the run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import os
import pkgutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fgpt_jax.data import DataConfig
from fgpt_jax.errors import ConfigError
from fgpt_jax.model import GPTConfig
from fgpt_jax.optim import OptimConfig


@dataclass
class TrainConfig:
    """The training loop: batch geometry, length, and how often to evaluate, save and log."""

    steps: int = 200  # optimizer updates in the whole run (the schedule's length)
    batch_size: int = 16  # sequences per update, over all devices, processes and micro-batches
    grad_accum: int = 1  # micro-batches per update (scanned inside the jitted step)
    seq_len: int = 0  # tokens per sequence; 0 means model.block_size
    sharding: Literal["dp", "fsdp"] = "dp"  # dp: replicate params; fsdp: shard params + optimizer state
    log_every: int = 10  # metrics.jsonl / TensorBoard / console line every N steps
    eval_every: int = 50  # validation loss every N steps and at the end (0: only at the end)
    ckpt_every: int = 100  # checkpoint every N steps (0: only at the end); also on SIGTERM/SIGINT
    keep_checkpoints: int = 3  # the last K checkpoints are kept, plus the best by val loss
    sample_every: int = 0  # text sample from `sample_prompt` every N steps (0: only at the end)
    sample_prompt: str = "Once upon a time"  # prompt of the text samples
    sample_tokens: int = 64  # tokens generated per text sample (>= 1)
    hellaswag_every: int = 0  # HellaSwag accuracy every N steps and at the end (0: never)
    hellaswag_data: str = ""  # HellaSwag file (jsonl or llama.cpp .txt[.bz2]); "": official val jsonl, cached
    hellaswag_limit: int = 0  # score the first N items (0: all 10,042)
    core_every: int = 0  # CORE metric (nanochat's, fgpt_jax.eval.core) every N steps and at the end (0: never)
    core_data: str = ""  # CORE eval bundle directory; "": nanochat's eval_bundle.zip, downloaded once into the cache
    core_max_per_task: int = 0  # CORE items per task after nanochat's shuffle (0: all; nanochat's base_train: 500)

    def __post_init__(self):
        problems = [
            f"{k}={getattr(self, k)} must be > 0"
            for k in ("steps", "batch_size", "grad_accum", "log_every", "sample_tokens")
            if getattr(self, k) <= 0
        ]
        problems += [
            f"{k}={getattr(self, k)} must be >= 0"
            for k in (
                "seq_len",
                "eval_every",
                "ckpt_every",
                "sample_every",
                "hellaswag_every",
                "hellaswag_limit",
                "core_every",
                "core_max_per_task",
            )
            if getattr(self, k) < 0
        ]
        if self.batch_size > 0 and self.grad_accum > 0 and self.batch_size % self.grad_accum:
            problems.append(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")
        if self.sharding not in ("dp", "fsdp"):
            problems.append(f"sharding={self.sharding!r} must be 'dp' or 'fsdp'")
        if self.keep_checkpoints < 1:
            problems.append(f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        if not self.sample_prompt.strip():
            problems.append("sample_prompt must not be empty (the text samples continue it)")
        if problems:
            raise ConfigError("TrainConfig: " + "; ".join(problems))


@dataclass
class DPOConfig:
    """Preference tuning (data.format=preference): the DPO objective (fgpt_jax.loss.dpo_losses)."""

    beta: float = 0.1  # how far the policy may move from the reference: rewards are beta * (log pi - log pi_ref)
    label_smoothing: float = 0.0  # sigmoid: share of preference labels assumed flipped (conservative DPO); 0: plain DPO
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO (Rafailov et al. 2023); ipo: IPO's squared loss (Azar et
    # al. 2023)

    def __post_init__(self):
        problems = []
        if not 0 < self.beta < float("inf"):  # also refuses nan
            problems.append(f"beta={self.beta} must be a finite number > 0")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.loss not in ("sigmoid", "ipo"):
            problems.append(f"loss={self.loss!r} must be 'sigmoid' or 'ipo'")
        elif self.loss == "ipo" and self.label_smoothing:
            problems.append("label_smoothing applies to loss 'sigmoid' only (IPO has none)")
        if problems:
            raise ConfigError("DPOConfig: " + "; ".join(problems))


@dataclass
class Config:
    """One run: what to build, what to train it on, and how."""

    name: str = "tiny"  # run name (used for the default workdir runs/<name>)
    seed: int = 0  # seeds parameter init and every other PRNG stream of the run
    init_from: str = ""  # start from this run directory's latest checkpoint (fine-tuning, warm restart); "": random
    # init
    init_mode: Literal["params", "warm"] = "params"  # params: its weights, a fresh optimizer and data; warm: also its
    # optimizer moments and data position, with this config's new schedule
    model: GPTConfig | None = field(default_factory=lambda: GPTConfig.preset("tiny"))  # model shape and numerics; None:
    # init_from's model
    data: DataConfig = field(default_factory=DataConfig)  # token shards and sampler
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and learning-rate schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # the training loop
    dpo: DPOConfig = field(default_factory=DPOConfig)  # the preference objective (data.format=preference only)

    def __post_init__(self):
        if self.init_mode not in ("params", "warm"):
            raise ConfigError(f"Config: init_mode={self.init_mode!r} must be 'params' or 'warm'")
        if self.init_mode == "warm" and not self.init_from:
            raise ConfigError("Config: init_mode='warm' needs init_from (the run to continue)")


def instruction_tuned(cfg: Config) -> bool:
    """Whether a run's model follows the chat template: SFT (data.format "chat") or DPO ("preference",
    which starts from an SFT run). The one rule for every front-end (chat's note, serve's model card
    and page, the trainer's text samples); pretrained and imported runs are base models."""
    return cfg.data.format in ("chat", "preference")


PRESET_PACKAGE = "fgpt_jax.configs"  # the top-level configs/ directory, installed under this name


def list_presets() -> list[str]:
    """Preset names: the modules of fgpt_jax.configs (configs/ in a checkout)."""
    package = importlib.import_module(PRESET_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load_config(spec: str = "tiny") -> Config:
    """A Config from a preset name ("gpt2_124m", "gpt2-124m") or a path to a config .py file."""
    path = Path(spec)
    if spec.endswith(".py") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config {spec}: file not found")
        module_spec = importlib.util.spec_from_file_location(f"fgpt_jax_config_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        loader, where = (lambda: module_spec.loader.exec_module(module)), str(path)
    else:
        name = spec.replace("-", "_")
        if name not in list_presets():
            raise ConfigError(f"--config {spec}: no such preset or file; presets: {', '.join(list_presets())}")
        module, where = None, f"{PRESET_PACKAGE}.{name}"
        loader = None
    try:  # a config file is user code: report where it failed, in one line
        if loader is None:
            module = importlib.import_module(where)
        else:
            loader()
        cfg = module.get_config() if callable(getattr(module, "get_config", None)) else None
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--config {where}: failed to load: {type(e).__name__}: {e}") from e
    if cfg is None:
        raise ConfigError(f"--config {where}: must define get_config() returning fgpt_jax.config.Config")
    if not isinstance(cfg, Config):
        raise ConfigError(f"--config {where}: get_config() returned {type(cfg).__name__}, expected Config")
    return cfg


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _group(typ: Any) -> type | None:
    """The dataclass a field holds (unwrapping `X | None`), or None for a plain value."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(typ) if a is not type(None)]
        typ = inner[0] if len(inner) == 1 else typ
    return typ if dataclasses.is_dataclass(typ) else None


def _parse_scalar(text: str, typ: Any, key: str) -> Any:
    """Parse a command-line string into `typ` (bool, int, float, str, Literal, tuple, Optional)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse_scalar(text, inner, key)
    if origin is Literal:
        for a in args:  # a Literal may also hold booleans (data.verify keeps accepting true/false)
            if text == a or (isinstance(a, bool) and text.lower() == str(a).lower()):
                return a
        raise ConfigError(f"--config.{key}={text}: expected one of {', '.join(map(str, args))}")
    if origin is tuple:
        items = json.loads(text) if text.startswith("[") else [s for s in text.strip("()").split(",") if s.strip()]
        elem = args[0] if args else str
        return tuple(_parse_scalar(str(x).strip(), elem, key) for x in items)
    if typ is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--config.{key}={text}: expected a boolean (true/false)")
    if typ is int:
        try:
            value = float(text.replace("_", "")) if any(c in text.lower() for c in ".e") else int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected an integer") from None
        if value != int(value):
            raise ConfigError(f"--config.{key}={text}: expected an integer")
        return int(value)
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text}: expected a number") from None
    if typ is str:
        return text
    raise ConfigError(f"--config.{key}: fields of type {typ} cannot be set from the command line")


def _check_value(value: Any, typ: Any, key: str) -> Any:
    """Coerce a JSON value to `typ`, refusing anything that would change its meaning."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected an object with keys {', '.join(_fields(typ))}")
        return from_dict(typ, value, prefix=key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_check_value(v, args[0] if args else Any, key) for v in value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (bool, int, float, str) and not (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data; unknown keys fail, missing keys take defaults."""
    hints = _field_types(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(
            f"unknown config key '{prefix + '.' if prefix else ''}{unknown[0]}'{where}; "
            f"valid keys: {', '.join(_fields(cls))}"
        )
    kwargs = {k: _check_value(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def from_json(text: str) -> Config:
    return from_dict(Config, json.loads(text))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write config.json atomically (temp file + rename): a crash never leaves half a config."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json(cfg) + "\n")
    os.replace(tmp, path)


def load_run_config(path: str | os.PathLike) -> Config:
    """Read a run's config.json (the directory or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (expected a run directory containing config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys, got {type(data).__name__}")
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, str]) -> Config:
    """Return a copy of `cfg` with dotted `key=value` overrides applied and validated."""
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    data = to_dict(cfg)
    for key, text in items:
        node, cls = data, Config
        parts = key.split(".")
        for i, part in enumerate(parts):
            hints = _field_types(cls)
            if part not in hints:
                where = ".".join(parts[:i]) or "config"
                raise ConfigError(f"unknown config key '{key}'; valid keys in '{where}': {', '.join(_fields(cls))}")
            group = _group(hints[part])
            if i < len(parts) - 1:
                if group is None:
                    raise ConfigError(f"unknown config key '{key}': '{'.'.join(parts[: i + 1])}' has no sub-keys")
                if node[part] is None:
                    raise ConfigError(
                        f"--config.{key}: '{'.'.join(parts[: i + 1])}' is not set here (it comes from "
                        f"init_from); set init_from, or the whole group in a config file"
                    )
                node, cls = node[part], group
            elif group is not None:
                raise ConfigError(f"config key '{key}' is a group; set one of its keys: {', '.join(_fields(group))}")
            else:
                node[part] = _parse_scalar(text, hints[part], key)
    return from_dict(Config, data)


def resolve_config(
    base: Config | str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> Config:
    """The config a run trains with. The CLI and `fgpt_jax.train.train` both call this.

    1. the base: a Config, a preset name or file; with none given, the run's own config.json when
       resuming (`run_dir`), else the "tiny" preset;
    2. the dotted `overrides`, except `model.*`;
    3. a config whose `model` is None (the `sft` preset) takes the `init_from` run's model, so a
       fine-tuning config need not repeat the base model's shape and numerics;
    4. the `model.*` overrides, on top of whichever model step 3 left.
    """
    if base is None:
        saved = Path(run_dir) / "config.json" if run_dir is not None else None
        base = load_run_config(saved) if resume and saved is not None and saved.is_file() else "tiny"
    cfg = load_config(base) if isinstance(base, str) else base
    model_overrides = [o for o in overrides if o.removeprefix("--config.").startswith("model.")]
    cfg = apply_overrides(cfg, [o for o in overrides if o not in model_overrides])
    if cfg.model is None:
        if not cfg.init_from:
            raise ConfigError("model: not set by this config; set init_from=RUN_DIR to fine-tune that run's model")
        cfg = dataclasses.replace(cfg, model=load_run_config(cfg.init_from).model)
    return apply_overrides(cfg, model_overrides)


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.removeprefix("--config.").partition("=")
    if not sep:
        raise ConfigError(f"--config.{key}: expected --config.KEY=VALUE")
    return key, value


def split_config_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Pull `--config X` and `--config.a.b=V` (or `--config.a.b V`) out of argv.

    Returns (the --config value or None, the overrides as "a.b=V", the remaining arguments).
    """
    spec, overrides, rest = None, [], []
    it = iter(argv)
    for arg in it:
        if arg == "--config" or arg.startswith("--config="):
            spec = arg.partition("=")[2] if "=" in arg else next(it, None)
            if not spec:
                raise ConfigError("--config: expected a preset name or a config file")
        elif arg.startswith("--config."):
            if "=" not in arg:
                value = next(it, None)
                if value is None:
                    raise ConfigError(f"{arg}: expected a value")
                arg = f"{arg}={value}"
            overrides.append(arg.removeprefix("--config."))
        else:
            rest.append(arg)
    return spec, overrides, rest


def parse_config_args(argv: list[str], default: str = "tiny") -> tuple[Config, list[str]]:
    """The Config that argv describes (preset or file, then overrides) and the other arguments."""
    spec, overrides, rest = split_config_args(argv)
    return resolve_config(spec or default, overrides), rest
