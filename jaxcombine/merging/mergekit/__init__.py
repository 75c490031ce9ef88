"""``jaxcombine merge``: mergekit's YAML configs, planned from headers, streamed to disk.

Three steps, each usable on its own: :func:`load_merge_config` (keys, types,
methods, model directories), :func:`plan_merge` (headers only: every output
tensor, checked; ``plan.describe()`` is what ``--dry-run`` prints) and
:func:`run_merge` (one tensor at a time, atomic output). The output equals
``mergekit-yaml CONFIG OUT`` for the same config (see the tests), and the
directory loads in ``transformers``. The config format is mergekit's (Goddard
et al. 2024, arXiv:2403.13257).

Three two-layer checkpoints (every entry 0 in the base, 1 in ``math-ft``, 3 in
``code-ft``) merged by task arithmetic, ``math-ft``'s weight a layer gradient
from 0 to 1 (model paths are relative to the YAML file):

>>> import json, pathlib, tempfile
>>> import numpy as np
>>> from safetensors.numpy import load_file
>>> from jaxcombine.hf import write_shards
>>> from jaxcombine.merging.mergekit import load_merge_config, plan_merge, run_merge
>>> tmp = tempfile.TemporaryDirectory()
>>> root = pathlib.Path(tmp.name)
>>> hf_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
...              "num_hidden_layers": 2}
>>> for name, value in [("base-model", 0.0), ("math-ft", 1.0), ("code-ft", 3.0)]:
...     (root / name).mkdir()
...     _ = (root / name / "config.json").write_text(json.dumps(hf_config))
...     tensors = [(f"model.layers.{i}.mlp.weight", np.full((2, 2), value, np.float32))
...                for i in range(2)] + [("model.norm.weight", np.full(2, value, np.float32))]
...     _ = write_shards(tensors, root / name, max_shard_bytes=1 << 20)
>>> _ = (root / "ta.yml").write_text('''
... merge_method: task_arithmetic
... base_model: base-model
... models:
...   - model: math-ft
...     parameters: {weight: [0.0, 1.0]}
...   - model: code-ft
...     parameters: {weight: 0.5}
... ''')
>>> plan = plan_merge(load_merge_config(root / "ta.yml"))
>>> [(t.name, t.values["weight"]) for t in plan.tensors]
[('model.layers.0.mlp.weight', (0.0, 0.5)), ('model.layers.1.mlp.weight', (1.0, 0.5)),
 ('model.norm.weight', (0.0, 0.5))]
>>> summary = run_merge(plan, root / "merged", progress=False)
>>> merged = load_file(str(root / "merged" / "model.safetensors"))
>>> print(merged["model.layers.0.mlp.weight"][0], merged["model.layers.1.mlp.weight"][0])
[1.5 1.5] [2.5 2.5]
>>> tmp.cleanup()

(Layer 0: 0 + 0 * 1 + 0.5 * 3; layer 1: 0 + 1 * 1 + 0.5 * 3.)
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
