"""``chat_template:`` of a merge config (mergekit 0.1.5's ``_set_chat_template``): the Jinja chat template written
into the output tokenizer.

The value is one of

* a name — ``chatml``, ``llama3``, ``mistral``, ``alpaca``, ``exaone``: the conversation formats mergekit ships
  under those names (written here as our own Jinja; they render the same text as mergekit's files under
  transformers' ``apply_chat_template``, which a test checks);
* ``auto`` — the template most of the merged models' tokenizers carry (compared after stripping surrounding
  whitespace; the first model's among equal counts); none carrying one: the base tokenizer's is kept;
* a literal Jinja template — a string with ``{`` of at least 20 characters.

Anything else (an unknown name, a short string without ``{``) is refused, as mergekit refuses it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError

_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
           "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

_LLAMA3 = ("{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
           "message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>\\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
           "{% endif %}")

_MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}{%- endfor %}"
)

#: alpaca: the last system message (trimmed) and a blank line, then one section per user / assistant /
#: user_context message, separated by a blank line
_ALPACA = (
    "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
    "{{ (system | last).content | trim if system else '' }}{{ '\\n\\n' }}"
    "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'} %}"
    "{% for message in messages %}{% if message['role'] in headers %}"
    "{{ headers[message['role']] + '\\n' + (message['content'] | trim) }}{% if not loop.last %}{{ '\\n\\n' }}"
    "{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}{% endif %}"
)

#: exaone, with the indentation mergekit's file renders with (its ``{{ }}`` lines keep their leading spaces)
_EXAONE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}"
    "{{ '    [|' + message['role'] + '|]' + message['content'] + '\\n        ' }}"
    "{% if message['role'] == 'user' %}{{ '\\n\\n' }}{% else %}{{ '[|endofturn|]\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '    [|assistant|]\\n' }}{% endif %}"
)

#: the templates mergekit 0.1.5 knows by name
NAMED_TEMPLATES = {"chatml": _CHATML, "llama3": _LLAMA3, "mistral": _MISTRAL, "alpaca": _ALPACA, "exaone": _EXAONE}


def resolve_chat_template(value: str, folders: Sequence[Path]) -> str | None:
    """The template text ``value`` names (see the module docstring); ``folders`` are the merged models' folders,
    read for ``auto``. None: ``auto`` found no template (the base tokenizer's stays)."""
    if value == "auto":
        from .tokenizer_merge import load_tokenizer

        found = []
        for folder in folders:
            try:
                template = load_tokenizer(folder).chat_template
            except Exception:
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        if value in NAMED_TEMPLATES:
            return NAMED_TEMPLATES[value]
        raise ConfigError(f"chat_template {value!r} is not a template name ({', '.join(NAMED_TEMPLATES)}), "
                          "`auto` or a Jinja template")
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"chat_template {value!r} is not a template name, `auto` or a Jinja template")
    return value


def check_chat_template(value: str) -> None:
    """Refuse a ``chat_template`` value that names no template (before any file is read)."""
    if value != "auto":
        resolve_chat_template(value, [])


__all__ = ["NAMED_TEMPLATES", "check_chat_template", "resolve_chat_template"]
