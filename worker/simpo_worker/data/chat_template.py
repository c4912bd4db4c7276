"""Rendering chat messages with a model's own Jinja chat template, the way HF transformers does.

Same environment as transformers' `apply_chat_template`: a sandbox (templates come with downloaded models),
`trim_blocks`/`lstrip_blocks`, loop controls, a `tojson` that does not HTML-escape, `raise_exception` and
`strftime_now`, and the named special tokens (`bos_token`, `eos_token`, ...) as variables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from simpo_worker.contract.errors import DataError, ModelError


class _TemplateRaised(Exception):
    """`raise_exception(...)` called by the template: the messages do not fit it (e.g. roles not alternating)."""


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template. `source` names where it came from, for error messages."""

    def __init__(self, template: str, source: str, special_tokens: Mapping[str, str]):
        self.template = template
        self.source = source
        # Named special tokens as template variables, e.g. {"bos_token": "<|im_start|>"}.
        self.special_tokens = dict(special_tokens)
        try:
            self._compiled = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ModelError(f"{source}: chat template does not compile: {e.message} (template line {e.lineno})") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message:
                raise DataError(f"chat message {i}: expected a mapping with `role` and `content`, got {message!r}")
        try:
            return self._compiled.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except _TemplateRaised as e:
            raise DataError(f"{self.source}: the chat template rejects these messages: {e}") from e
        except jinja2.TemplateError as e:
            raise ModelError(f"{self.source}: chat template failed to render: {e}") from e
