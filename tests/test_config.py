"""Config: YAML mirrored by dataclasses, dotted overrides, whole validation."""

import pytest

from lora_dist.config import BUILTIN_DATASET, Config, ConfigError, dump_config, load_config
from lora_dist.model import LoRAConfig
from lora_dist.tiny import DEFAULT_DATASET


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_sections_build_the_typed_dataclasses(tmp_path):
    path = _write(tmp_path, """
model: {path: some/model, bits: 8}
lora: {rank: 4, alpha: 8, target_modules: [q_proj]}
data: {path: builtin:tiny-instructions, max_seq_len: 64}
train: {lr: 1.0e-3, max_steps: 7}
distributed: {zero_stage: 3}
wandb: {mode: disabled}
""")
    cfg = load_config(path)
    assert isinstance(cfg, Config) and isinstance(cfg.lora, LoRAConfig)
    assert (cfg.model.bits, cfg.lora.rank, cfg.data.max_seq_len, cfg.train.max_steps) == (8, 4, 64, 7)
    assert (cfg.distributed.zero_stage, cfg.wandb.mode) == (3, "disabled")


def test_dotted_overrides_parse_numbers_lists_and_null():
    cfg = load_config(None, [
        "model.path=some/model", f"data.path={BUILTIN_DATASET}", "train.lr=2e-4",
        "lora.target_modules=[q_proj,v_proj]", "model.bits=null", "train.max_steps=12",
    ])
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.bits is None and cfg.train.max_steps == 12


@pytest.mark.parametrize("word", ["none", "None", "null"])
def test_model_bits_none_means_a_dense_base(word):
    cfg = load_config(None, ["model.path=some/model", f"data.path={BUILTIN_DATASET}", f"model.bits={word}"])
    assert cfg.model.bits is None


def test_pyyaml_exponent_without_dot_is_read_as_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads `2e-4` as the string "2e-4"; users write it that way all the time.
    path = _write(tmp_path, f"model: {{path: m}}\ndata: {{path: {BUILTIN_DATASET}}}\ntrain: {{lr: 2e-4}}\n")
    assert load_config(path).train.lr == pytest.approx(2e-4)


def test_override_word_off_stays_a_word_not_false():
    with pytest.raises(ConfigError, match=r"wandb.mode must be one of .* got 'off'"):
        load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}", "wandb.mode=off"])


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}", "train.lr=-1",
                           "train.micro_batch_size=abc", "lora.rank=0", "distributed.zero_stage=5"])
    problems = err.value.problems
    assert len(problems) == 4, problems
    assert "\n" not in str(err.value)
    for needle in ("train.lr", "train.micro_batch_size", "lora: rank", "distributed.zero_stage"):
        assert any(needle in p for p in problems), needle


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown key train.micro_batch_sise \(did you mean 'micro_batch_size'"):
        load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}", "train.micro_batch_sise=1"])
    with pytest.raises(ConfigError, match=r"unknown key train.learning_rate \(did you mean 'lr'\?\)"):
        load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}", "train.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(did you mean 'train'\?\)"):
        load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}", "trian.lr=1"])


def test_builtin_dataset_name_resolves_to_the_shipped_file():
    cfg = load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}"])
    assert cfg.data.path == str(DEFAULT_DATASET)


def test_global_batch_size_gives_accumulation_per_world_size():
    cfg = load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}",
                             "train.micro_batch_size=4", "train.global_batch_size=32"])
    assert [cfg.train.accumulation(w) for w in (1, 2, 8)] == [8, 4, 1]
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.train.accumulation(3)


def test_wandb_runs_offline_without_a_key_and_online_with_one(monkeypatch):
    cfg = load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}"])
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert cfg.wandb.resolved_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert cfg.wandb.resolved_mode() == "online"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}", "lora.rank=4", "train.lr=1e-3"])
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg


# ------------------------------------------------------------------ random shapes, random tokens, fused kernels

RANDOM_RUN = ["model.path=random:tiny", "data.path=random-tokens", "train.max_steps=2"]


def test_random_model_and_random_tokens_load():
    cfg = load_config(None, RANDOM_RUN)
    assert cfg.model.random_shape() == "tiny" and cfg.model.fused_kernels == "auto"


def test_unknown_random_shape_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown random shape; use one of .*random:llama3-8b.*random:tiny"):
        load_config(None, ["model.path=random:llama9", "data.path=random-tokens", "train.max_steps=2"])


def test_random_model_without_random_tokens_is_refused():
    with pytest.raises(ConfigError, match=r"has no tokenizer; train it on data.path=random-tokens"):
        load_config(None, ["model.path=random:tiny", "data.path=builtin:tiny-instructions"])


def test_random_tokens_without_max_steps_are_refused():
    with pytest.raises(ConfigError, match=r"random-tokens has no epochs; set train.max_steps"):
        load_config(None, ["model.path=random:tiny", "data.path=random-tokens"])


def test_fused_kernels_value_is_checked():
    with pytest.raises(ConfigError, match=r"model.fused_kernels must be one of auto, on, off, got 'yes'"):
        load_config(None, [*RANDOM_RUN, "model.fused_kernels=yes"])


def test_a_files_bare_on_and_off_are_the_words_where_a_choice_holds_them(tmp_path):
    # YAML 1.1 (PyYAML) reads `off` as False: for model.fused_kernels and model.fp8_base it is the word; a
    # bool field keeps its bool, and a choice without on/off still refuses a bool
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: random:tiny, fused_kernels: off, fp8_base: off, activation_offload: off}\n"
                    "data: {path: random-tokens}\ntrain: {max_steps: 2}\n")
    cfg = load_config(path, [])
    assert (cfg.model.fused_kernels, cfg.model.fp8_base, cfg.model.activation_offload) == ("off", "off", False)
    path.write_text("model: {path: random:tiny, fused_kernels: on}\ndata: {path: random-tokens}\ntrain: {max_steps: 2}\n")
    assert load_config(path, []).model.fused_kernels == "on"
    path.write_text("model: {path: random:tiny, fp8_base: on}\ndata: {path: random-tokens}\ntrain: {max_steps: 2}\n")
    with pytest.raises(ConfigError, match=r"model.fp8_base must be one of off, backward, all, got 'on'"):
        load_config(path, [])
    path.write_text("model: {path: random:tiny}\ndata: {path: random-tokens}\ntrain: {max_steps: 2}\nwandb: {mode: off}\n")
    with pytest.raises(ConfigError, match=r"wandb.mode must be one of"):
        load_config(path, [])


def test_profile_steps_need_diagnostics_and_fit_in_the_run():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*RANDOM_RUN, "train.profile_steps=[2,3]"])
    assert "ends after train.max_steps (2)" in str(err.value)
    assert "needs train.diagnostics=true" in str(err.value)


def test_overwrite_output_dir_with_resume_is_refused():
    with pytest.raises(ConfigError, match="overwrite_output_dir=true deletes the checkpoints train.resume"):
        load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}", "train.resume=auto",
                           "train.overwrite_output_dir=true"])
