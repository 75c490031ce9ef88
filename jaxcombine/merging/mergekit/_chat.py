"""``chat_template``: ``auto`` (the most common template among the inputs), a built-in
name, or a Jinja template string, written as the output's ``chat_template.jinja``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from jaxcombine.errors import ConfigError

BUILTIN = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}


def model_chat_template(model_dir: Path) -> str | None:
    """A model's chat template (chat_template.jinja, else tokenizer_config.json)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, dict):
            template = template.get("default")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def resolve_chat_template(setting: str | None, model_dirs: list[Path]) -> str | None:
    """The template text for a ``chat_template`` setting (None: leave the tokenizer's)."""
    if not setting:
        return None
    if setting == "auto":
        found = [t.strip() for t in map(model_chat_template, model_dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if setting in BUILTIN:
        return BUILTIN[setting]
    if "{" not in setting or len(setting) < 20:
        raise ConfigError(
            f"unknown chat template {setting!r}",
            where="chat_template",
            fix=f"use auto, one of {sorted(BUILTIN)}, or a Jinja template string",
        )
    return setting


def write_chat_template(template: str, out_dir: Path) -> None:
    """Write ``chat_template.jinja`` and drop any template kept in tokenizer_config.json."""
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    config = out_dir / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.pop("chat_template", None) is not None:
            config.write_text(json.dumps(data, indent=2))
