"""The run configuration: YAML -> frozen dataclasses, with dotted ``key=value`` overrides.

``sections`` holds the dataclasses (one per YAML section, each field documented by the comment
above it), ``load`` reads and writes them, ``checks`` resolves and validates a whole config,
``reference`` renders the documentation (``opsd-mm config reference``) and ``show`` a config with
each value's origin (``opsd-mm config show``). Every public name is importable from here.
"""

from opsd_mm.config.checks import resolve_config, validate_config
from opsd_mm.config.load import (
    SECRET_KEYS,
    SECRET_MASK,
    apply_overrides,
    build_config,
    config_to_dict,
    flatten_config,
    load_config,
    parse_override,
    read_config_file,
    save_config,
)
from opsd_mm.config.reference import reference_markdown
from opsd_mm.config.sections import (
    ColumnsConfig,
    DataConfig,
    LoggingConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    ProcessorConfig,
    RolloutConfig,
    RunConfig,
    TeacherConfig,
    TeacherModelConfig,
    TeacherSpec,
    TrainerConfig,
    teacher_key,
    teacher_specs,
    validate_loss_config,
)
from opsd_mm.config.show import show_config
from opsd_mm.errors import ConfigError

__all__ = [
    "ColumnsConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "ProcessorConfig",
    "RolloutConfig",
    "RunConfig",
    "SECRET_KEYS",
    "SECRET_MASK",
    "TeacherConfig",
    "TeacherModelConfig",
    "TeacherSpec",
    "TrainerConfig",
    "apply_overrides",
    "build_config",
    "config_to_dict",
    "flatten_config",
    "load_config",
    "parse_override",
    "read_config_file",
    "reference_markdown",
    "resolve_config",
    "save_config",
    "show_config",
    "teacher_key",
    "teacher_specs",
    "validate_config",
    "validate_loss_config",
]
