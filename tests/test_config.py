import dataclasses
import json

import pytest

from fgpt_jax.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_json,
    list_presets,
    load_config,
    load_run_config,
    parse_config_args,
    save_config,
    to_json,
)

PRESET_FILES = ["tiny", "gpt2_124m", "gpt2_350m", "gpt2_774m", "gpt2_1558m", "fgpt"]


def test_presets_listed():
    assert set(PRESET_FILES) <= set(list_presets())


@pytest.mark.parametrize("name", PRESET_FILES)
def test_every_preset_loads_and_roundtrips(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config) and cfg.name == name
    again = from_json(to_json(cfg))
    assert again == cfg
    assert to_json(again) == to_json(cfg)


def test_preset_by_path_and_dash_alias():
    assert load_config("configs/gpt2_124m.py") == load_config("gpt2-124m")
    assert load_config("gpt2_124m").model.n_layer == 12
    assert load_config("fgpt").model.head_dim == 52


def test_dotted_overrides_are_typed():
    cfg = apply_overrides(
        load_config("tiny"),
        [
            "model.n_layer=2",
            "model.dtype=bfloat16",
            "model.bias=false",
            "model.remat=true",
            "seed=7",
            "data.path=/tmp/shards",
            "model.attention=xla",
            "model.block_size=1_024",
        ],
    )
    m = cfg.model
    assert (m.n_layer, m.dtype, m.bias, m.remat, m.attention, m.block_size) == (2, "bfloat16", False, True, "xla", 1024)
    assert cfg.seed == 7 and cfg.data.path == "/tmp/shards"
    assert isinstance(cfg.model.n_layer, int)


def test_overrides_do_not_mutate_input():
    base = load_config("tiny")
    apply_overrides(base, ["model.n_layer=1"])
    assert base.model.n_layer == 4


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides(load_config("tiny"), ["model.n_layr=3"])
    msg = str(e.value)
    assert "model.n_layr" in msg and "n_layer" in msg and "n_embd" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="valid keys in .config.: name, seed, init_from, init_mode, model, data"):
        apply_overrides(load_config("tiny"), ["modle.n_layer=3"])
    with pytest.raises(ConfigError, match="has no sub-keys"):
        apply_overrides(load_config("tiny"), ["seed.x=3"])
    with pytest.raises(ConfigError, match="is a group"):
        apply_overrides(load_config("tiny"), ["model=3"])


@pytest.mark.parametrize(
    "override,err",
    [
        ("model.n_layer=four", "expected an integer"),
        ("model.n_layer=2.5", "expected an integer"),
        ("model.bias=maybe", "expected a boolean"),
        ("model.attention=flash", "expected one of auto, xla, cudnn"),
        ("model.n_embd=130", "divisible"),  # the model's own validation, surfaced as a ConfigError
        ("model.n_layer", "expected --config.KEY=VALUE"),
    ],
)
def test_bad_values(override, err):
    with pytest.raises(ConfigError, match=err):
        apply_overrides(load_config("tiny"), [override])


def test_json_is_strict():
    d = json.loads(to_json(load_config("tiny")))
    d["model"]["n_layers"] = 3
    with pytest.raises(ConfigError, match="unknown config key 'model.n_layers'"):
        from_json(json.dumps(d))
    d = json.loads(to_json(load_config("tiny")))
    d["model"]["n_layer"] = "3"
    with pytest.raises(ConfigError, match="model.n_layer: expected int"):
        from_json(json.dumps(d))
    d["model"]["n_layer"] = True
    with pytest.raises(ConfigError, match="expected int"):
        from_json(json.dumps(d))


def test_partial_json_takes_defaults():
    cfg = from_json('{"model": {"n_layer": 2}}')
    assert cfg.model.n_layer == 2 and cfg.model.n_embd == 768 and cfg.seed == 0


def test_save_and_load_run_config(tmp_path):
    cfg = apply_overrides(load_config("gpt2_124m"), ["seed=3"])
    save_config(cfg, tmp_path / "config.json")
    assert load_run_config(tmp_path) == cfg
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ConfigError, match="expected a run directory"):
        load_run_config(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_run_config(tmp_path / "bad")


def test_parse_config_args_both_forms():
    cfg, rest = parse_config_args(
        ["--config", "gpt2_124m", "--config.model.n_layer=3", "--workdir", "x", "--config.seed", "5", "--resume"]
    )
    assert cfg.name == "gpt2_124m" and cfg.model.n_layer == 3 and cfg.seed == 5
    assert rest == ["--workdir", "x", "--resume"]
    cfg, rest = parse_config_args([])
    assert cfg == load_config("tiny") and rest == []
    cfg, _ = parse_config_args(["--config=fgpt"])
    assert cfg.name == "fgpt"


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such preset or file; presets: .*tiny"):
        load_config("gpt5")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define get_config"):
        load_config(str(bad))
    bad.write_text("def get_config():\n    return {}\n")
    with pytest.raises(ConfigError, match="returned dict"):
        load_config(str(bad))
    bad.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="failed to load: SyntaxError"):
        load_config(str(bad))


def test_custom_config_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text(
        "from fgpt_jax.config import Config\nfrom fgpt_jax.model import GPTConfig\n"
        "def get_config():\n    return Config(name='mine', model=GPTConfig.preset('tiny', n_layer=2))\n"
    )
    cfg = load_config(str(f))
    assert cfg.name == "mine" and cfg.model.n_layer == 2
    assert dataclasses.replace(cfg, seed=1).seed == 1
