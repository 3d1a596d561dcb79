"""Configuration: every validation rule, overrides, round trips, fuzzing, and the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megalite import config as C
from megalite.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
RUN_CONFIGS = sorted((REPO / "configs" / "runs").glob("*.json"))
MODEL_PRESETS = sorted((REPO / "configs" / "models").glob("*.json"))
DS_CONFIGS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


def base() -> dict:
    """A small valid run config as a raw dict."""
    return {
        "model": {"vocab_size": 1000, "hidden_size": 64, "num_layers": 4, "num_heads": 4, "max_position_embeddings": 64},
        "parallel": {"tensor": 1, "pipeline": 1},
        "data": {"prefixes": ["x"], "seq_length": 32},
        "train": {"steps": 10},
        "deepspeed": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                      "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 1}},
    }


def with_change(path: str, value, raw: dict | None = None) -> dict:
    raw = copy.deepcopy(raw or base())
    node = raw
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return raw


_DELETE = object()

# (change, world size, fragment the message must contain)
BAD = [
    ("model.hidden_sise", 64, 1, "model.hidden_sise: unknown key (did you mean 'hidden_size'?)"),
    ("trian", {}, 1, "config.trian: unknown key (did you mean 'train'?)"),
    ("train.logging.metric_file", "x", 1, "did you mean 'metrics_file'"),
    ("deepspeed.zero_optimisation", {"stage": 1}, 1, "deepspeed.zero_optimisation: unknown DeepSpeed key (did you mean 'zero_optimization'?)"),
    ("deepspeed.zero_optimization.stag", 1, 1, "deepspeed.zero_optimization.stag: unknown key (did you mean 'stage'?)"),
    ("deepspeed.bf16", {"enable": True}, 1, "deepspeed.bf16.enable: unknown key (did you mean 'enabled'?)"),
    ("model.hidden_size", "64", 1, "model.hidden_size: expected an integer, got '64'"),
    ("model.bias", "yes", 1, "model.bias: expected true or false, got 'yes'"),
    ("model.norm_eps", "small", 1, "model.norm_eps: expected a finite number"),
    ("model.norm", "batchnorm", 1, "model.norm: 'batchnorm' is not one of 'layernorm', 'rmsnorm'"),
    ("model.mlp", "swiglo", 1, "did you mean 'swiglu'"),
    ("data.prefixes", "x", 1, "data.prefixes: expected list of str"),
    ("model.vocab_size", _DELETE, 1, "model.vocab_size: required key is missing"),
    ("model.num_layers", 0, 1, "model.num_layers: must be > 0, got 0"),
    ("model.hidden_size", -64, 1, "model.hidden_size: must be > 0, got -64"),
    ("parallel.tensor", 0, 1, "parallel.tensor: must be > 0, got 0"),
    ("data.seq_length", 0, 1, "data.seq_length: must be > 0"),
    ("train.steps", -1, 1, "train.steps: must be > 0, got -1"),
    ("deepspeed.train_micro_batch_size_per_gpu", 0, 1, "deepspeed.train_micro_batch_size_per_gpu: must be a positive integer"),
    ("deepspeed.train_batch_size", 6, 2, "deepspeed.train_batch_size: 6 != micro 2 x gradient_accumulation 2 x data parallel 2 = 8"),
    ("parallel.tensor", 2, 3, "world size 3 is not divisible by parallel.tensor x parallel.pipeline = 2 x 1"),
    ("model.num_heads", 3, 1, "model.hidden_size: 64 is not divisible by model.num_heads=3"),
    ("model.num_kv_heads", 3, 1, "model.num_kv_heads: 3 does not divide model.num_heads=4"),
    ("parallel.tensor", 8, 8, "model.num_heads: 4 is not divisible by parallel.tensor=8"),
    ("model.num_layers", 2, 1, None),  # placeholder, replaced below (needs pipeline)
    ("data.seq_length", 128, 1, "data.seq_length: 128 exceeds model.max_position_embeddings=64"),
    ("model.hidden_dropout", 1.5, 1, "model.hidden_dropout: must be in [0, 1)"),
    ("train.keep_checkpoints", 1, 1, "train.keep_checkpoints: must be >= 2"),
    ("data.split", "90,10", 1, "data.split: '90,10' must be three non-negative numbers"),
    ("deepspeed.optimizer", {"type": "Adamw", "params": {}}, 1, "deepspeed.optimizer.type: 'Adamw' is not one of AdamW, Adam, SGD (did you mean 'AdamW'?)"),
    ("deepspeed.scheduler", {"type": "Cosine"}, 1, "deepspeed.scheduler.type: 'Cosine' is not one of"),
    ("deepspeed.zero_optimization.stage", 4, 1, "deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got 4"),
    ("train.resume", "always", 1, "train.resume: 'always' is not one of 'auto', 'must', 'never'"),
    ("train.kernels", "cuda", 1, "train.kernels: 'cuda' is not one of"),
    ("model.loss_chunk_tokens", -1, 1, "model.loss_chunk_tokens: must be >= 0, got -1"),
    ("model.z_loss", -0.1, 1, "model.z_loss: must be >= 0, got -0.1"),
    ("model.rope_scaling", {"type": "linear", "factor": 2.0}, 1, "model.rope_scaling: needs model.position='rope'"),
    ("model.rope_scaling", {"type": "yarn", "factor": 2.0}, 1, "model.rope_scaling.type: 'yarn' is not one of 'linear', 'llama3'"),
    ("model.rope_scaling", {"type": "linear"}, 1, "model.rope_scaling.factor: required key is missing"),
    ("model.rope_scaling", {"type": "linear", "factr": 2.0}, 1, "model.rope_scaling.factr: unknown key (did you mean 'factor'?)"),
]
BAD = [b for b in BAD if b[3] is not None]


def run_rule(change, value, world, fragment) -> str:
    with pytest.raises(ConfigError) as exc:
        C.from_dict(with_change(change, value), world_size=world)
    assert fragment in str(exc.value), str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("change,value,world,fragment", BAD, ids=[b[0] for b in BAD])
def test_each_rule_names_key_and_value(change, value, world, fragment):
    run_rule(change, value, world, fragment)


def test_structural_rules_needing_two_changes():
    raw = with_change("parallel.tensor", 2, with_change("model.num_kv_heads", 1))
    with pytest.raises(ConfigError, match=r"model.num_kv_heads: 1 is not divisible by parallel.tensor=2"):
        C.from_dict(raw, world_size=2)
    raw = with_change("parallel.pipeline", 8, with_change("model.num_layers", 4))
    with pytest.raises(ConfigError, match=r"model.num_layers: 4 layers cannot fill parallel.pipeline=8 stages"):
        C.from_dict(raw, world_size=8)
    for stage in (2, 3):
        raw = with_change("deepspeed.zero_optimization.stage", stage, with_change("parallel.pipeline", 2))
        with pytest.raises(ConfigError, match=rf"ZeRO-{stage} cannot be combined with parallel.pipeline=2.*ZeRO-1"):
            C.from_dict(raw, world_size=2)
    bf16_zero0 = with_change("deepspeed.bf16", {"enabled": True}, with_change("deepspeed.zero_optimization.stage", 0))
    with pytest.raises(ConfigError, match=r"deepspeed.zero_optimization.stage: ZeRO-0 with bf16 is refused.*stage 1.*"
                                          r"grad_accum_dtype to \"bf16\""):
        C.from_dict(bf16_zero0)
    for accum in ("fp32", "float32"):
        with pytest.raises(ConfigError, match="ZeRO-0 with bf16 is refused"):
            C.from_dict(with_change("deepspeed.data_types", {"grad_accum_dtype": accum}, bf16_zero0))
    cfg = C.from_dict(with_change("deepspeed.data_types", {"grad_accum_dtype": "bf16"}, bf16_zero0))
    assert (cfg.precision, cfg.zero_stage) == ("bf16", 0)  # DeepSpeed's FP16_Optimizer in bf16: allowed
    assert C.from_dict(with_change("deepspeed.zero_optimization.stage", 1, bf16_zero0)).zero_stage == 1
    raw = with_change("parallel.tensor", 4, with_change("model.make_vocab_size_divisible_by", 2))
    raw = with_change("model.vocab_size", 1002, raw)
    with pytest.raises(ConfigError, match=r"padded vocabulary 1002 is not divisible by parallel.tensor=4"):
        C.from_dict(raw, world_size=4)


def test_rope_scaling_rules_and_round_trip():
    rope = with_change("model.position", "rope")
    raw = with_change("model.rope_scaling", {"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                             "high_freq_factor": 4.0}, rope)
    with pytest.raises(ConfigError, match=r"llama3 needs 0 < low_freq_factor < high_freq_factor, got 4.0 and 4.0"):
        C.from_dict(raw, world_size=1)
    with pytest.raises(ConfigError, match=r"model.rope_scaling.factor: must be > 0, got 0.0"):
        C.from_dict(with_change("model.rope_scaling", {"type": "linear", "factor": 0.0}, rope), world_size=1)
    good = with_change("model.rope_scaling", {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16},
                       rope)
    cfg = C.from_dict(good, world_size=1)
    assert cfg.model.rope_scaling == C.RopeScalingConfig(type="llama3", factor=8.0, original_max_position_embeddings=16)
    assert C.from_dict(cfg.to_dict(), world_size=1) == cfg
    over = C.apply_overrides(good, ["model.rope_scaling.factor=4"])
    assert C.from_dict(over, world_size=1).model.rope_scaling.factor == 4.0
    assert C.model_config_from_dict(good["model"]) == cfg.model
    with pytest.raises(ConfigError, match=r"saved/model.json.rope_scaling.type: 'ntk' is not one of"):
        C.model_config_from_dict({**good["model"], "rope_scaling": {"type": "ntk", "factor": 2.0}}, "saved/model.json")


def test_every_error_is_reported_at_once():
    raw = with_change("model.num_layers", 0, with_change("train.steps", 0, with_change("model.typo", 1)))
    with pytest.raises(ConfigError) as exc:
        C.from_dict(raw)
    text = str(exc.value)
    assert "model.typo: unknown key" in text
    assert len(exc.value.problems) == 1  # type/key errors stop before numeric rules...
    raw = with_change("model.num_layers", 0, with_change("train.steps", 0))
    with pytest.raises(ConfigError) as exc:
        C.from_dict(raw)
    assert len(exc.value.problems) == 2  # ...and numeric rules are all collected
    assert "model.num_layers" in str(exc.value) and "train.steps" in str(exc.value)


def test_batch_arithmetic_and_derived_values():
    cfg = C.from_dict(with_change("deepspeed.train_batch_size", 8), world_size=2)
    assert cfg.global_batch_size(2) == 8 and cfg.dp_size(2) == 2
    ds = C.resolve_deepspeed(cfg, 4)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    derived = C.summary(cfg, 2)
    assert derived["tokens_per_step"] == 8 * 32
    assert derived["padded_vocab_size"] == 1024


def test_deepspeed_key_list_matches_deepspeed():
    """Keys DeepSpeed itself parses (its constants module) must all be accepted by our check."""
    import deepspeed.runtime.constants as K

    names = ["TRAIN_BATCH_SIZE", "TRAIN_MICRO_BATCH_SIZE_PER_GPU", "GRADIENT_ACCUMULATION_STEPS", "OPTIMIZER",
             "SCHEDULER", "FP16", "BFLOAT16", "GRADIENT_CLIPPING", "STEPS_PER_PRINT",
             "WALL_CLOCK_BREAKDOWN", "PRESCALE_GRADIENTS", "DATA_TYPES", "COMMUNICATION_DATA_TYPE"]
    for name in names:
        assert getattr(K, name) in C.DEEPSPEED_TOP_LEVEL_KEYS, name
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    assert ZERO_OPTIMIZATION in C.DEEPSPEED_TOP_LEVEL_KEYS


def test_overrides_reach_every_section(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(base()))
    cfg = C.load(path, ["train.steps=100", "parallel.tensor=2", "deepspeed.zero_optimization.stage=3",
                        "model.norm=rmsnorm", "data.split=98,1,1", "train.logging.plot=false"], world_size=2)
    assert cfg.train.steps == 100 and cfg.parallel.tensor == 2
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3
    assert cfg.model.norm == "rmsnorm" and cfg.data.split == "98,1,1" and cfg.train.logging.plot is False
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        C.load(path, ["train.steps"])
    with pytest.raises(ConfigError, match=r"train.stepz: unknown key \(did you mean 'steps'\?\)"):
        C.load(path, ["train.stepz=3"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        C.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {\n  "vocab_size": 10,\n}')
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON: .* line 3 column 1"):
        C.load(bad)
    raw = base()
    raw["deepspeed"] = "no_such_deepspeed_config"
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="DeepSpeed config file not found: 'no_such_deepspeed_config'.*shipped: .*zero1"):
        C.load(path)
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 1},, }')
    raw["deepspeed"] = "ds.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"deepspeed: .*ds.json is not valid JSON: .*line 1 column"):
        C.load(path)
    raw["deepspeed"] = base()["deepspeed"]
    raw["model"] = {"preset": "gpt2-124mm"}
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="model.preset: no preset 'gpt2-124mm'"):
        C.load(path)


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines(tmp_path):
    """JSON keeps the last of two equal keys: a second "train" object would silently replace the first. Refused in
    run files, DeepSpeed JSONs, model presets and --set values, naming the file, the key and both lines."""
    def lines_of(text: str, needle: str) -> list[int]:
        return [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]

    text = json.dumps(base(), indent=2)
    text = text.replace('\n  "model"', '\n  "train": {"steps": 5, "seed": 3},\n  "model"', 1)
    first, second = lines_of(text, '"train"')
    run = tmp_path / "run.json"
    run.write_text(text)
    with pytest.raises(ConfigError) as info:
        C.load(run)
    assert f'{run}: duplicate key "train" at lines {first} and {second}' in str(info.value), str(info.value)
    # Deeper, and where both are on one line.
    raw = base()
    raw["train"] = {"steps": 10}
    text = json.dumps(raw, indent=2).replace('"steps": 10', '"steps": 10,\n    "log_interval": 2, "steps": 20')
    run.write_text(text)
    first, second = lines_of(text, '"steps"')
    with pytest.raises(ConfigError, match=f'duplicate key "steps" at lines {first} and {second}'):
        C.load(run)
    run.write_text('{"model": {"preset": "tiny-gpt"}, "model": {"preset": "tiny-llama"}}')
    with pytest.raises(ConfigError, match='duplicate key "model" at lines 1 and 1'):
        C.load(run)
    # A DeepSpeed file and a model preset named by path.
    ds = tmp_path / "ds.json"
    ds.write_text('{\n "zero_optimization": {"stage": 3},\n "train_micro_batch_size_per_gpu": 2,\n'
                  ' "zero_optimization": {"stage": 1}\n}\n')
    raw = base()
    raw["deepspeed"] = str(ds)
    run.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r'deepspeed: .*ds.json: duplicate key "zero_optimization" at lines 2 and 4'):
        C.load(run)
    preset = tmp_path / "preset.json"
    preset.write_text('{"vocab_size": 100,\n"hidden_size": 64, "num_layers": 2, "num_heads": 4,\n"vocab_size": 200}')
    raw = base()
    raw["model"] = str(preset)
    run.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r'model.preset: .*preset.json: duplicate key "vocab_size" at lines 1 and 3'):
        C.load(run)
    run.write_text(json.dumps(base()))
    with pytest.raises(ConfigError, match=r'--set .*: duplicate key "stage"'):
        C.load(run, ['deepspeed.zero_optimization={"stage": 1, "stage": 3}'])
    # Equal keys in different objects are fine.
    raw = base()
    raw["deepspeed"]["bf16"] = {"enabled": False}
    raw["deepspeed"]["fp16"] = {"enabled": False}
    run.write_text(json.dumps(raw, indent=1))
    assert C.load(run).train.steps == 10
    # `config check` says so instead of OK.
    text = json.dumps(base(), indent=2).replace('\n  "model"', '\n  "train": {"steps": 5},\n  "model"', 1)
    run.write_text(text)
    check = _cli("config", "check", str(run))
    assert check.returncode == 2 and 'duplicate key "train" at lines 2 and' in check.stdout + check.stderr, check


def test_set_model_to_a_preset_name_works_like_the_run_file(tmp_path):
    """`--set model=NAME` (and `--set deepspeed=NAME`) name a shipped preset as the run file's `"model": NAME` does;
    overrides after it change the preset's fields."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps(base()))
    in_file = tmp_path / "preset-run.json"
    in_file.write_text(json.dumps({**base(), "model": "tiny-llama", "deepspeed": "zero2"}))
    want = C.load(in_file)
    assert want.model.norm == "rmsnorm" and want.model.num_kv_heads == 4 and want.zero_stage == 2
    by_set = C.load(path, ["model=tiny-llama", "deepspeed=zero2"])
    assert by_set.model == want.model and by_set.deepspeed == want.deepspeed
    assert C.load(path, ["model=tiny-llama", "model.num_layers=2"]).model.num_layers == 2
    assert C.load(path, ['model={"preset": "tiny-llama", "num_layers": 3}']).model.num_layers == 3
    with pytest.raises(ConfigError, match=r"model.preset: no preset 'tiny-lama'.*did you mean 'tiny-llama'"):
        C.load(path, ["model=tiny-lama"])


def test_echoed_values_are_cut_short(tmp_path):
    """A huge bad value (or key) is not echoed whole: each problem names the key and the value's size."""
    huge = "x" * 10_000_000
    path = tmp_path / "run.json"
    types = {"model.norm": huge, "train.resume": huge, "train.steps": [huge], "parallel." + huge: 1}
    ranges = {"data.split": huge, "deepspeed.optimizer.type": huge, "deepspeed.gradient_clipping": huge,
              "deepspeed." + huge: 1, "deepspeed.zero_optimization.stage": huge}
    for changes in (types, ranges):  # the value checks run once the types are right
        raw = base()
        for key, value in changes.items():
            raw = with_change(key, value, raw)
        path.write_text(json.dumps(raw))
        with pytest.raises(ConfigError) as info:
            C.load(path)
        problems = info.value.problems
        assert len(problems) == len(changes), [p[:200] for p in problems]
        for key in changes:
            named = [p for p in problems if key[:40] in p]
            assert named, (key, [p[:200] for p in problems])
            assert len(named[0]) < 1000 and "10,000,000 characters" in named[0], named[0][:2000]
    path.write_text(json.dumps(base()))
    with pytest.raises(ConfigError) as info:
        C.load(path, ["train.steps=" + huge[:200_000]])
    assert len(str(info.value)) < 1000 and "train.steps" in str(info.value)
    with pytest.raises(ConfigError) as info:
        C.load(path, [huge[:200_000]])
    assert len(str(info.value)) < 1000 and "expected KEY=VALUE" in str(info.value)
    path.write_text('{"train": {"steps": ' + "1" * 5000 + "}}")  # more digits than Python converts
    with pytest.raises(ConfigError, match="run.json is not valid JSON"):
        C.load(path)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=[p.stem for p in RUN_CONFIGS])
def test_shipped_run_configs_round_trip(path):
    cfg = C.load(path)
    first = cfg.to_dict()
    again = C.from_dict(json.loads(json.dumps(first)), source=cfg.source)
    assert again == cfg
    assert again.to_dict() == first


def test_shipped_presets_and_deepspeed_configs_load():
    assert MODEL_PRESETS and DS_CONFIGS
    for preset in MODEL_PRESETS:
        raw = base()
        raw["model"] = {"preset": preset.stem}
        raw = C.expand_references(raw, None)
        raw["data"]["seq_length"] = 16
        cfg = C.from_dict(raw)
        assert cfg.model.vocab_size > 0
    for ds in DS_CONFIGS:
        raw = base()
        raw["deepspeed"] = ds.stem
        cfg = C.from_dict(C.expand_references(raw, None))
        assert cfg.micro_batch_size >= 1


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
KEYS = ["model", "parallel", "data", "train", "deepspeed", "name"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), JSON, max_size=6),
    st.lists(st.tuples(st.sampled_from(["model.hidden_size", "train.steps", "parallel.tensor", "model.norm",
                                        "deepspeed.zero_optimization.stage", "data.split", "model"]), JSON), max_size=3),
    st.integers(-2, 9),
)
def test_fuzz_loader_raises_only_config_error(raw, mutations, world):
    """No input makes the loader raise anything but ConfigError."""
    candidates = [raw, base()]
    for path, value in mutations:
        candidates.append(with_change(path, value))
    for candidate in candidates:
        try:
            C.from_dict(C.expand_references(candidate, None) if isinstance(candidate.get("model"), dict) else candidate,
                        world_size=world)
        except ConfigError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_fuzz_overrides_raise_only_config_error(text):
    try:
        C.apply_overrides(base(), [text])
    except ConfigError:
        pass


def _cli(*args: str, optimize: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable] + (["-O"] if optimize else []) + ["-m", "megalite.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_check_and_show(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(base()))
    ok = _cli("config", "check", str(path), "--world-size", "4")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("\n") == 1 and "OK" in ok.stdout and "DP4" in ok.stdout
    shown = _cli("config", "show", str(path), "--world-size", "2", "--set", "parallel.tensor=2")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["derived"]["data_parallel"] == 1 and data["config"]["deepspeed"]["train_batch_size"] == 4
    assert data["derived"]["parameters"] == C.count_parameters(C.load(path).model)["total"]
    helptext = _cli("--help")
    assert helptext.returncode == 0 and "config" in helptext.stdout


def test_cli_reports_every_error_under_python_O(tmp_path):
    """Validation must not depend on assert: run the same bad config with -O."""
    raw = with_change("model.num_heads", 3, with_change("train.keep_checkpoints", 1))
    raw = with_change("deepspeed.zero_optimization.stage", 3, with_change("parallel.pipeline", 2, raw))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    for optimize in (False, True):
        out = _cli("config", "check", str(path), "--world-size", "3", optimize=optimize)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "keep_checkpoints" in out.stdout
        bad_shape = with_change("model.num_heads", 3, with_change("train.keep_checkpoints", 2))
        bad_shape = with_change("deepspeed.zero_optimization.stage", 3, with_change("parallel.pipeline", 2, bad_shape))
        path.write_text(json.dumps(bad_shape))
        out = _cli("config", "check", str(path), "--world-size", "3", optimize=optimize)
        assert out.returncode == 2
        for fragment in ("not divisible by model.num_heads=3", "ZeRO-3 cannot be combined",
                         "world size 3 is not divisible"):
            assert fragment in out.stdout, out.stdout
        path.write_text(json.dumps(raw))


def test_precision_section_keys_match_deepspeed():
    """Our list of bf16/fp16 keys is DeepSpeed's own (its pydantic models forbid others)."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config

    assert C.DEEPSPEED_SECTION_KEYS["bf16"] == set(DeepSpeedBF16Config.model_fields)
    assert C.DEEPSPEED_SECTION_KEYS["fp16"] == set(DeepSpeedFP16Config.model_fields)


def test_json_schema_validates_shipped_runs_and_rejects_typos(tmp_path):
    """`megalite config schema` describes run files as users write them: every shipped run validates, a typo or
    a wrong type does not (so editors flag what `config check` flags)."""
    import jsonschema

    out = _cli("config", "schema", str(tmp_path / "schema.json"))
    assert out.returncode == 0, out.stderr
    schema = json.loads((tmp_path / "schema.json").read_text())
    assert schema == json.loads(json.dumps(C.json_schema()))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert RUN_CONFIGS
    for path in RUN_CONFIGS:
        errors = [e.message for e in validator.iter_errors(json.loads(path.read_text()))]
        assert not errors, (path.name, errors)
    assert not list(validator.iter_errors(base()))
    for change, value in (("model.hidden_sise", 64), ("train.stpes", 3), ("model.hidden_size", "64"),
                          ("model.norm", "batchnorm"), ("deepspeed.zero_optimisation", {})):
        assert list(validator.iter_errors(with_change(change, value))), change
        with pytest.raises(ConfigError):
            C.from_dict(with_change(change, value))  # the loader agrees with the schema
    preset_run = {"model": {"preset": "tiny-gpt", "num_layers": 3}, "deepspeed": "zero1"}
    assert not list(validator.iter_errors(preset_run))
    assert list(validator.iter_errors({"model": {"num_layers": 3}}))  # overrides without a preset are incomplete
