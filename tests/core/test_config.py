"""Settings as a user writes them: strict types in preset files, limits on every number, a run's config.toml
read back exactly. Every message names the file (or the command line), the key and the value."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest
from conftest import infopo

from infopo_cli.config import FIELDS, HINTS, TrainConfig, merge, override, to_toml
from infopo_cli.errors import ConfigError
from infopo_cli.presets import available, load_preset


@pytest.fixture
def preset(tmp_path, monkeypatch):
    """Write presets/NAME.toml under a fresh working folder; return the path as the user would type it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "presets").mkdir()

    def write(text: str, name: str = "mine") -> str:
        (tmp_path / "presets" / f"{name}.toml").write_text(text, encoding="utf-8")
        return f"presets/{name}.toml"

    return write


def error_of(path: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_preset(path)
    return str(err.value)


# --- 1. types come from the annotations, fields defaulting to None included --------------------------

@pytest.mark.parametrize("line, message", [
    ('beta = "0.1"', """'beta' must be a number, got the string "0.1\""""),
    ('length_normalize = "false"', """'length_normalize' must be true or false, got the string "false\""""),
    ("lora_r = 8.0", "'lora_r' must be a whole number, got the number 8.0"),
    ("lora_r = true", "'lora_r' must be a whole number, got true"),
    ("max_steps = 40.0", "'max_steps' must be a whole number, got the number 40.0"),
    ('max_steps = "40"', """'max_steps' must be a whole number, got the string "40\""""),
    ("lr = true", "'lr' must be a number, got true"),
    ("gamma = false", "'gamma' must be a number, got false"),
    ("load_in_4bit = 1", "'load_in_4bit' must be true or false, got the number 1"),
    ("prior = 1", "'prior' must be a string, got the number 1"),
    ("system_prompt = ['a']", """'system_prompt' must be a string, got the list ["a"]"""),
    ("eval_split = 2", "'eval_split' must be a string, got the number 2"),
    ("target_modules = 3", "'target_modules' must be a list of strings or a string, got the number 3"),
    ('target_modules = ["q_proj", 3]', """'target_modules' must be a list of strings or a string, got the list ["q_proj", 3]"""),
    ("model = 1979-05-27", "'model' must be a string, got 1979-05-27"),
])
def test_a_wrong_type_is_one_line_naming_file_key_and_value(preset, line, message):
    assert error_of(preset(line + "\n")) == f"presets/mine.toml: {message}"


def test_right_types_are_taken_and_ints_become_floats(preset):
    cfg = load_preset(preset('lr = 1\nbeta = 2\nlength_normalize = false\nmax_steps = 40\nsystem_prompt = "Be brief."\n'
                      'target_modules = "q_proj, v_proj"\n'))
    assert cfg.lr == 1.0 and type(cfg.lr) is float and type(cfg.beta) is float and cfg.length_normalize is False
    assert cfg.max_steps == 40 and cfg.system_prompt == "Be brief." and cfg.target_modules == ["q_proj", "v_proj"]
    assert load_preset(preset('target_modules = "all-linear"\n')).target_modules == "all-linear"
    assert load_preset(preset('target_modules = ["qkv_proj"]\n')).target_modules == ["qkv_proj"]


def test_every_wrong_type_of_a_file_is_reported_at_once(preset):
    assert error_of(preset('beta = "0.1"\nseed = 1.5\n')) == (
        """presets/mine.toml: 'beta' must be a number, got the string "0.1"; 'seed' must be a whole number, """
        "got the number 1.5")


def test_the_message_names_the_file_of_the_extends_chain_that_holds_the_value(preset):
    preset('lora_r = 8.0\n', name="base")
    preset('extends = "presets/base.toml"\nbeta = 0.5\n', name="middle")
    child = preset('extends = "presets/middle.toml"\n')
    assert error_of(child) == "presets/base.toml: 'lora_r' must be a whole number, got the number 8.0"
    preset('extends = "presets/middle.toml"\nbeta = "0.5"\n', name="child2")
    preset('lora_r = 8\n', name="base")
    assert error_of("presets/child2.toml") == """presets/child2.toml: 'beta' must be a number, got the string "0.5\""""


def test_a_shipped_preset_is_named_by_its_file(preset):
    """A bad value in a file that extends a shipped preset names the user's file; the shipped one loads."""
    path = preset('extends = "llama3-8b-qlora"\nlength_normalize = "no"\n')
    assert error_of(path) == """presets/mine.toml: 'length_normalize' must be true or false, got the string "no\""""
    same_name = preset('extends = "llama3-8b-qlora"\nbatch_size = 1\n', name="llama3-8b-qlora")
    cfg = load_preset(same_name)  # a local copy named like the shipped preset extends it: not a loop
    assert cfg.batch_size == 1 and cfg.model == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_extends_loop_and_bad_extends_name_the_file(preset):
    preset('extends = "presets/b.toml"\n', name="a")
    preset('extends = "presets/a.toml"\n', name="b")
    assert error_of("presets/a.toml") == "presets/b.toml: 'extends' loops back to presets/a.toml (a -> b -> a)"
    assert error_of(preset("extends = 3\n")) == ("presets/mine.toml: 'extends' must be a preset name or a .toml file, "
                                                 "got the number 3")


def test_command_line_values_are_checked_with_source_command_line():
    with pytest.raises(ConfigError, match="^command line: 'beta' must be a number, got the string \"0.1\"$"):
        override(TrainConfig(), {"beta": "0.1"}, "command line")


def test_cli_prints_a_bad_preset_as_one_line_exit_2(preset):
    path = preset('length_normalize = "false"\n')
    out = infopo("train", "--preset", path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == """error: presets/mine.toml: 'length_normalize' must be true or false, got the string "false\""""


def test_validate_checks_the_types_of_a_config_built_in_code():
    with pytest.raises(ConfigError, match="""^'batch_size' must be a whole number, got the string "8"$"""):
        TrainConfig(batch_size="8").validate()


# --- 2. limits on every number -------------------------------------------------------------------------

BAD = [("save_every", -1, ">= 0"), ("eval_every", -5, ">= 0"), ("keep_checkpoints", 0, "> 0"),
       ("max_bad_steps", 0, "> 0"), ("seed", -1, ">= 0"), ("max_grad_norm", -0.5, ">= 0"),
       ("weight_decay", -0.01, ">= 0"), ("sft_weight", -1.0, ">= 0"), ("gamma", -0.5, ">= 0"),
       ("gamma_min", -0.1, ">= 0"), ("gamma_max", -1.0, ">= 0"), ("rdpo_alpha", -0.1, ">= 0"),
       ("tdpo_alpha", -0.5, ">= 0"), ("max_steps", 0, "> 0"), ("epochs", 0.0, "> 0"), ("lr", 0.0, "> 0"),
       ("beta", -1.0, "> 0"), ("eval_batch_size", 0, "> 0"), ("lora_alpha", -1, "> 0"),
       ("warmup_ratio", 1.0, "in [0, 1)"), ("lora_dropout", -0.1, "in [0, 1)")]


@pytest.mark.parametrize("name, value, rule", BAD)
def test_a_value_out_of_range_is_refused_by_validate_and_names_its_source(preset, name, value, rule):
    message = f"{name} must be {rule} (got {value!r})"
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{name: value}).validate()
    assert str(err.value) == message
    with pytest.raises(ConfigError) as err:
        override(load_preset("smollm2-135m"), {name: value}, "command line")
    assert str(err.value) == f"command line: {message}"
    assert error_of(preset(f"{name} = {value!r}\n")) == f"presets/mine.toml: {message}"


@pytest.mark.parametrize("name", ["save_every", "eval_every", "seed", "max_grad_norm", "weight_decay", "sft_weight",
                                  "gamma", "warmup_ratio", "lora_dropout"])
def test_zero_is_allowed_where_it_means_off(name):
    TrainConfig(**{name: 0.0 if HINTS[name] != int else 0}).validate()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match=f"^lr must be a finite number \\(got {value}\\)$"):
        TrainConfig(lr=value).validate()
    with pytest.raises(ConfigError, match="max_grad_norm must be a finite number"):
        merge(TrainConfig(), {"max_grad_norm": value}, "command line")


def test_validate_gathers_every_problem_including_combinations():
    with pytest.raises(ConfigError) as err:
        TrainConfig(save_every=-1, keep_checkpoints=0, max_length=64, max_prompt_length=64, gamma_min=2.0,
                    gamma_max=1.0).validate()
    assert str(err.value) == ("keep_checkpoints must be > 0 (got 0); save_every must be >= 0 (got -1); "
                              "max_prompt_length (64) must be < max_length (64): the prompt's share of each row (a preset sets both; "
                              "give --max-prompt-length too); gamma_min (2.0) must be <= gamma_max (1.0)")


# --- 3. a run's config.toml reads back to the same settings -------------------------------------------

def round_trip(cfg: TrainConfig, tmp_path) -> TrainConfig:
    path = tmp_path / "config.toml"
    path.write_text("# infopo test\n" + to_toml(cfg.to_dict()), encoding="utf-8")
    return load_preset(str(path))


@pytest.mark.parametrize("name", sorted(available()))
def test_every_shipped_preset_validates_and_round_trips_through_config_toml(name, tmp_path):
    from infopo_cli.losses.registry import resolve

    cfg = load_preset(name)
    cfg.validate()
    assert cfg.preset == name and cfg.model and cfg.target_modules
    assert round_trip(cfg, tmp_path) == cfg
    # what a run writes: the settings with the loss's resolved parameters (its defaults filled in)
    _, params = resolve(cfg.loss, cfg.loss_overrides())
    run = TrainConfig(**{**cfg.to_dict(), **params, "output": str(tmp_path / "run"), "dtype": "fp32"})
    assert round_trip(run, tmp_path) == run


def test_every_field_type_round_trips(tmp_path):
    """Each field set away from its default (awkward strings, small and large floats, lists, None)."""
    cfg = TrainConfig(model='we"ird\\path\n\t\x7f\x01 ünï 😀', target_modules=["q_proj", "v_proj"], lr=2e-4, beta=1e-5,
                      gamma=1e20, epochs=0.1 + 0.2, length_normalize=False, prior="simpo", max_steps=7,
                      eval_data="", eval_split=None, system_prompt="", sft_weight=0.0, seed=0, output="runs/x",
                      preset="p")
    assert round_trip(cfg, tmp_path) == cfg
    for field in FIELDS:
        assert getattr(round_trip(cfg, tmp_path), field) == getattr(cfg, field), field


def test_only_fields_defaulting_to_none_may_be_none():
    """to_toml writes None as a comment, read back as the default: so None must be the default where allowed."""
    for name, hint in HINTS.items():
        if typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in typing.get_args(hint):
            assert FIELDS[name].default is None, name
    assert all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in FIELDS.values())


# --- 4. the shipped presets say what they are for; merging flags -----------------------------------------------

def test_default_preset_trains_the_embedded_model_on_bundled_data():
    cfg = load_preset("smollm2-135m")
    assert cfg.model == "embedded:smollm2-135m-instruct" and cfg.data == "bundled:arith_train"
    assert cfg.load_in_4bit and cfg.share_prompt
    assert cfg.gradient_checkpointing == "off"  # a CPU demo: recomputing costs time and RAM is plentiful


def test_llama3_preset_targets_a_24gb_gpu():
    cfg = load_preset("llama3-8b-qlora")
    assert cfg.model == "meta-llama/Meta-Llama-3-8B-Instruct" and cfg.load_in_4bit and cfg.gradient_checkpointing == "auto"
    assert cfg.max_length >= 1024 and cfg.optimizer == "auto"


def test_unknown_setting_suggests_the_right_one(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text("lora_rank = 8\n")
    with pytest.raises(ConfigError, match="unknown setting 'lora_rank' \\(did you mean 'lora_r'\\?\\)"):
        load_preset(str(bad))


def test_merge_coerces_values_as_a_preset_file_would():
    cfg = merge(TrainConfig(), {"lr": 1, "target_modules": "q_proj, v_proj"}, "test")
    assert cfg.lr == 1.0 and cfg.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="'lora_r' must be a whole number"):
        merge(TrainConfig(), {"lora_r": "big"}, "test")


def test_a_source_weight_is_a_number_after_the_last_colon():
    from infopo_cli.config import source_weight

    assert source_weight("d/a.jsonl:0.3") == ("d/a.jsonl", "0.3")
    assert source_weight("bundled:arith_train") == ("bundled:arith_train", None)
    assert source_weight("C:\\data.jsonl") == ("C:\\data.jsonl", None)
    assert source_weight("C:\\data.jsonl:1") == ("C:\\data.jsonl", "1")
    assert source_weight(":0.5") == (":0.5", None)  # nothing before the colon: a name, not a weight
    assert source_weight("a.jsonl:2") == ("a.jsonl", "2")  # split here; data/mixing.py refuses the range
