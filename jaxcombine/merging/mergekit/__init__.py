"""``jaxcombine merge``: mergekit's YAML configs, planned from headers, streamed to disk.

Three steps, each usable on its own::

    from jaxcombine.merging.mergekit import load_merge_config, plan_merge, run_merge

    config = load_merge_config("ties.yml")   # keys, types, methods, model directories
    plan = plan_merge(config)                # headers only: every output tensor, checked
    print(plan.describe())                   # what --dry-run prints
    run_merge(plan, "out/merged", seed=0)    # one tensor at a time, atomic output

The output equals ``mergekit-yaml CONFIG OUT`` for the same config (see the
tests), and the directory loads in ``transformers``.
"""

from jaxcombine.merging.mergekit._config import (
    MergeConfig,
    OutputSlice,
    SliceSource,
    TokenizerSettings,
    TokenSetting,
    load_merge_config,
    parse_merge_config,
)
from jaxcombine.merging.mergekit._plan import Input, MergePlan, PlannedTensor, plan_merge
from jaxcombine.merging.mergekit._run import run_merge
from jaxcombine.merging.mergekit._vocab import VocabPlan

__all__ = [
    "Input",
    "MergeConfig",
    "MergePlan",
    "OutputSlice",
    "PlannedTensor",
    "SliceSource",
    "TokenSetting",
    "TokenizerSettings",
    "VocabPlan",
    "load_merge_config",
    "parse_merge_config",
    "plan_merge",
    "run_merge",
]
