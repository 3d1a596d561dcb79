"""The one place for configuration: schema (typed sections), loading (presets, references, `--set`
overrides), validation (every rule that needs no hardware) and derived values.

Every problem is collected and raised together as one `ConfigError`; validation never uses `assert`,
so it holds under `python -O`. Checks that need hardware run at training start (engine.preflight).
"""

from megalite.config.derived import count_parameters, resolve_deepspeed, summary
from megalite.config.layout import STATE_AXES, Layout
from megalite.config.load import (
    CONFIGS_DIR,
    apply_overrides,
    expand_references,
    from_dict,
    list_presets,
    load,
    model_config_from_dict,
    parse_override,
    read_json,
)
from megalite.config.schema import (
    DEEPSPEED_SCHEDULERS,
    DEEPSPEED_SECTION_KEYS,
    DEEPSPEED_TOP_LEVEL_KEYS,
    OPTIMIZER_TYPES,
    OPTIMIZERS,
    SCHEDULER_TYPES,
    SCHEDULERS,
    Config,
    DataConfig,
    EvalTasksConfig,
    Float8Config,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RopeScalingConfig,
    TrainConfig,
    json_schema,
)
from megalite.config.validate import (
    check_model,
    context_errors,
    expert_parallel_errors,
    fp8_errors,
    fp8_precision_errors,
    kv_replication,
    model_errors,
    moe_errors,
    pipeline_schedule_errors,
    rope_scaling_errors,
    validate,
)

__all__ = [
    "CONFIGS_DIR", "DEEPSPEED_SCHEDULERS", "DEEPSPEED_SECTION_KEYS", "DEEPSPEED_TOP_LEVEL_KEYS", "OPTIMIZERS", "OPTIMIZER_TYPES", "SCHEDULERS", "SCHEDULER_TYPES",
    "Config", "DataConfig", "Layout", "STATE_AXES", "EvalTasksConfig", "Float8Config", "LoggingConfig", "ModelConfig",
    "MoEConfig", "ParallelConfig", "RopeScalingConfig",
    "TrainConfig", "apply_overrides", "check_model", "context_errors", "count_parameters", "expand_references",
    "expert_parallel_errors", "fp8_errors", "fp8_precision_errors", "from_dict", "json_schema", "kv_replication",
    "list_presets", "load", "model_config_from_dict", "model_errors", "moe_errors", "pipeline_schedule_errors",
    "parse_override", "read_json",
    "resolve_deepspeed", "rope_scaling_errors", "summary", "validate",
]
