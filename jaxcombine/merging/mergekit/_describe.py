"""The ``--dry-run`` text: a summary, then one line per output tensor."""

from __future__ import annotations

import numpy as np


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(map(_value, v)) + ")"
    return str(v)


def _inputs(planned) -> str:
    def one(inp):
        return inp.model if inp.tensor == planned.name else f"{inp.model}:{inp.tensor}"

    text = ", ".join(one(i) for i in planned.models)
    if planned.base is not None:
        text = f"base={one(planned.base)}; {text}"
    return text


def describe_plan(plan) -> str:
    config = plan.config
    gb = plan.total_bytes / 1e9
    lines = [
        f"merge_method: {plan.method.name}",
        f"models: {', '.join(f'{ref} ({m.path})' for ref, m in plan.models.items())}",
        f"output: {len(plan.tensors)} tensors, {gb:.3f} GB, "
        f"{plan.out_config.get('num_hidden_layers', '?')} layers, config from {plan.donor}",
    ]
    if plan.vocab is not None:
        lines.append(
            f"tokenizer: {config.tokenizer.source}, {len(plan.vocab.vocab)} tokens, "
            f"{plan.vocab.size} embedding rows"
        )
    lines.append("")
    width = max(len(t.name) for t in plan.tensors)
    declared = {p.keyword for p in plan.method.params}
    for t in plan.tensors:
        shape = "x".join(map(str, t.shape))
        settings = ", ".join(
            f"{k}={_value(v)}" for k, v in sorted(t.values.items()) if k in declared
        )
        vocab = " vocab-aligned" if t.vocab else ""
        lines.append(
            f"{t.name:<{width}}  {shape:>12} {np.dtype(t.dtype).name:<8} t={t.t:.3g}{vocab}  "
            f"<- {_inputs(t)}  [{settings}]"
        )
    return "\n".join(lines)
