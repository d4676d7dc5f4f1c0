"""A model directory's tokenizer: ``tokenizers`` for the text <-> ids, jinja2 for the chat template.

Loading follows transformers 5 on a directory that has a ``tokenizer.json``:
- the post-processor in ``tokenizer.json`` decides which special tokens ``encode`` adds; transformers 5
  drops ``add_bos_token`` / ``add_eos_token`` from ``tokenizer_config.json`` when ``tokenizer.json``
  exists, and so do we (our ``encode`` equals ``AutoTokenizer.from_pretrained(dir).encode``);
- named special tokens of ``tokenizer_config.json`` (or, in older checkpoints, ``special_tokens_map.json``)
  missing from the vocabulary are added as special;
- the chat template is ``chat_template.jinja`` (plus ``additional_chat_templates/*.jinja``) when present,
  else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of ``{name, template}``).
``decode`` never applies ``clean_up_tokenization_spaces`` (transformers 5 skips it for BPE too), so the
incremental detokenizer can reproduce it exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import jinja2.utils
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from hetserve.core.errors import ModelLoadError, ValidationError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# transformers' named special tokens; the chat template sees each one that is set, as a string
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
VALID_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template. Build with ``Tokenizer.from_dir``."""

    def __init__(
        self,
        backend: HFTokenizer,
        special_tokens: Mapping[str, str],
        chat_templates: Mapping[str, str],
        generation_eos_token_ids: Sequence[int] = (),
        name: str = "",
    ) -> None:
        self._backend = backend
        # template context names -> token strings (bos_token, eos_token, ... and model-specific extras)
        self.special_tokens = dict(special_tokens)
        # template name -> jinja source; a single template is stored under "default"
        self.chat_templates = dict(chat_templates)
        self.name = name
        eos_ids = set(generation_eos_token_ids)
        eos = self.special_tokens.get("eos_token")
        if eos is not None and (eos_id := backend.token_to_id(eos)) is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        named_ids = {backend.token_to_id(t) for t in self.special_tokens.values()}
        added_special_ids = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        # every id that decode(skip_special_tokens=True) drops, plus the named special tokens
        self.all_special_ids: list[int] = sorted(i for i in named_ids | added_special_ids if i is not None)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        model_dir = Path(path)
        tokenizer_file = model_dir / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ModelLoadError(TOKENIZER_FILE, f"missing in {model_dir}")
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise ModelLoadError(TOKENIZER_FILE, f"cannot be loaded from {model_dir}: {exc}") from exc
        # transformers turns these off unless a call asks for them; a server never truncates silently
        backend.no_truncation()
        backend.no_padding()

        config = _read_json(model_dir / TOKENIZER_CONFIG_FILE)
        if "added_tokens_decoder" not in config:
            # older checkpoints name their special tokens here; transformers lets it override the config
            config = {**config, **_read_json(model_dir / SPECIAL_TOKENS_MAP_FILE)}
        generation_config = _read_json(model_dir / GENERATION_CONFIG_FILE)

        special_tokens: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            token = _token_content(config.get(key), TOKENIZER_CONFIG_FILE, key)
            if token is not None:
                special_tokens[key] = token
        extra = config.get("extra_special_tokens")
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                token = _token_content(value, TOKENIZER_CONFIG_FILE, f"extra_special_tokens.{key}")
                if token is not None:
                    special_tokens[str(key)] = token
        extra_list: list[str] = []
        for key in ("additional_special_tokens", "extra_special_tokens"):
            values = config.get(key)
            if isinstance(values, list):
                for i, value in enumerate(values):
                    token = _token_content(value, TOKENIZER_CONFIG_FILE, f"{key}[{i}]")
                    if token is not None:
                        extra_list.append(token)
        missing = [t for t in [*special_tokens.values(), *extra_list] if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            )

        generation_eos = generation_config.get("eos_token_id")
        if isinstance(generation_eos, int):
            generation_eos = [generation_eos]
        if generation_eos is None:
            generation_eos = []
        if not isinstance(generation_eos, list) or not all(isinstance(i, int) for i in generation_eos):
            raise ModelLoadError(
                f"{GENERATION_CONFIG_FILE}:eos_token_id", f"must be an int or a list of ints, got {generation_eos!r}"
            )

        return cls(
            backend=backend,
            special_tokens=special_tokens,
            chat_templates=_load_chat_templates(model_dir, config),
            generation_eos_token_ids=generation_eos,
            name=str(model_dir),
        )

    @property
    def backend(self) -> HFTokenizer:
        return self._backend

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    def _token_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self._backend.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def get_chat_template(self, chat_template: str | None = None, tools: list[Any] | None = None) -> str:
        """The template source to use: a name of one of the model's templates, a template source, or
        (None) the model's: ``tool_use`` when tools are given and the model has one, else ``default``."""
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if self.chat_templates:
            raise ValidationError(
                "chat_template",
                f"the model has several chat templates and no default; pass one of {sorted(self.chat_templates)}",
            )
        raise ValidationError("chat_template", f"the tokenizer of {self.name or 'this model'} has no chat template")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` as transformers' ``apply_chat_template(..., tokenize=False)`` does.

        ``continue_final_message`` leaves the last message open (no end-of-turn after it) so the model
        continues it; it excludes ``add_generation_prompt``."""
        source = self.get_chat_template(chat_template, tools)
        validate_messages(messages)
        if continue_final_message and add_generation_prompt:
            raise ValidationError(
                "continue_final_message", "cannot be combined with add_generation_prompt; set one of them"
            )
        # transformers drops None-valued keys: templates handle a missing key better than a None
        chat = [_alias_reasoning({k: _plain(v) for k, v in m.items() if v is not None}) for m in messages]
        final_text = _mark_final_message(chat) if continue_final_message else ""
        context = {**self.special_tokens, **_plain(kwargs)}
        try:
            template = _compile(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValidationError("chat_template", f"invalid jinja: {exc}") from exc
        try:
            rendered = template.render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(context.pop("documents", None)),
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except jinja2.exceptions.SecurityError as exc:
            raise ValidationError("chat_template", f"the chat template did something unsafe: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise ValidationError("messages", f"the chat template rejected the conversation: {exc}") from exc
        if not continue_final_message:
            return rendered
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise ValidationError(
                "continue_final_message", "the chat template does not render the final message's text verbatim"
            )
        cut = rendered.rindex(tag)
        # a template that trims the message also trimmed the tag's trailing space: trim what precedes it
        if rendered[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return rendered[:cut]
        return rendered[:cut].rstrip()


# appended to the final message's text to find where it ends in the rendered chat
_CONTINUE_TAG = "HETSERVE_CONTINUE_FINAL_MESSAGE_HERE "
# names a message's reasoning may come under; templates read the first (and gpt-oss ones "thinking")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """Expose a message's reasoning under both names templates read, as transformers does."""
    reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    aliased = dict(message)
    aliased.setdefault("thinking", reasoning)
    aliased["reasoning_content"] = reasoning
    return aliased


def _mark_final_message(chat: list[dict[str, Any]]) -> str:
    """Append the continue tag to the last message's text; return that text (without the tag)."""
    final = chat[-1]
    content = final.get("content")
    if isinstance(content, str):
        final["content"] = content + _CONTINUE_TAG
        return content
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text = part["text"]
                part["text"] = text + _CONTINUE_TAG
                return text
    raise ValidationError(f"messages[{len(chat) - 1}].content", "has no text to continue")


def validate_messages(messages: object) -> None:
    """Raise ValidationError naming the first bad field of an OpenAI-style message list."""
    if not isinstance(messages, list):
        raise ValidationError("messages", f"must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValidationError("messages", "must contain at least one message")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValidationError(where, f"must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role is None:
            raise ValidationError(f"{where}.role", "is missing")
        if not isinstance(role, str) or role not in VALID_ROLES:
            raise ValidationError(f"{where}.role", f"invalid role {role!r}; expected one of {sorted(VALID_ROLES)}")
        content = message.get("content")
        may_omit_content = role == "assistant" and bool(message.get("tool_calls"))
        if content is None and not may_omit_content:
            raise ValidationError(f"{where}.content", "is missing")
        if content is not None and not isinstance(content, (str, list)):
            raise ValidationError(
                f"{where}.content", f"must be a string or a list of content parts, got {type(content).__name__}"
            )
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                    raise ValidationError(f"{where}.content[{j}]", "must be an object with a string 'type'")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path.name, f"cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(path.name, f"must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: object, file_name: str, key: str) -> str | None:
    """A special token as a string; configs store it as a string or a serialised AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise ModelLoadError(f"{file_name}:{key}", f"must be a string or an AddedToken object, got {value!r}")


def _load_chat_templates(model_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    templates: dict[str, str] = {}
    jinja_file = model_dir / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        templates["default"] = _read_text(jinja_file)
    extra_dir = model_dir / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = _read_text(path)
    if templates:
        # separate template files take priority over the config's entry, as in transformers
        return templates
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        for i, entry in enumerate(value):
            if not (
                isinstance(entry, Mapping)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ModelLoadError(
                    f"{TOKENIZER_CONFIG_FILE}:chat_template[{i}]", "must be an object with string name and template"
                )
            templates[entry["name"]] = entry["template"]
        return templates
    raise ModelLoadError(
        f"{TOKENIZER_CONFIG_FILE}:chat_template", f"must be a string or a list, got {type(value).__name__}"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(path.name, f"cannot be read: {exc}") from exc


def _plain(value: Any) -> Any:
    """A copy made of JSON-like types only, so the sandboxed template never sees a caller's objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


class _GenerationTag(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (marks assistant text for training) as a no-op."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _SafeNamespace(jinja2.utils.Namespace):
    """jinja's ``namespace`` without underscore-prefixed attributes (no reach into python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for key in attrs:
            _SafeNamespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes; chat templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict`` for templates: builds plain dicts without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _SafeNamespace
    return env.from_string(source)
