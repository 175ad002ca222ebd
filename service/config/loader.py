"""Read the daemon's config: a YAML file, then ``DEFECTSAM__SECTION__KEY`` environment overrides.

Precedence: built-in defaults < the YAML file < environment variables. An environment variable
``DEFECTSAM__CAMERA__FPS=10`` sets ``camera.fps``: the prefix ``DEFECTSAM__``, then the dotted key
with ``__`` for each dot, in any case. Its value is read as a YAML scalar or flow collection, so
``10`` is a number, ``true`` a boolean, ``[cpu]`` a list and ``null`` clears a key.
``DEFECTSAM_CONFIG`` (one underscore) names the file when ``--config`` is not given.

Every problem ends in one ``ConfigError`` whose message is one line naming the dotted key, the
offending value (secrets redacted), why it was refused and where it came from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from engines.errors import DefectsamError
from service.config.models import KEY_ERROR, DaemonConfig

ENV_PREFIX = "DEFECTSAM__"
CONFIG_PATH_ENV = "DEFECTSAM_CONFIG"
SECRET_KEYS = frozenset({"token", "password", "secret"})
# Values a config file may hold once its aliases are expanded: the full example ('defectsam config
# example', every key) has 179; a 'billion laughs' bomb of 342 bytes has 387 million. And its depth:
# the example nests 4 levels.
MAX_YAML_VALUES = 10_000
MAX_YAML_DEPTH = 32


class ConfigError(DefectsamError):
    """A config that cannot be used; ``str()`` is one line, ``problems`` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        problems = [_printable(problem) for problem in problems]  # a key or file name may hold a newline
        self.problems = problems
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        super().__init__(f"config: {problems[0]}{more}")


def _printable(text: str) -> str:
    """``text`` on one line: control characters (a newline in a key, say) written as escapes."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def config_path_from_env(path: Path | str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The file to read: ``path`` if given, else ``$DEFECTSAM_CONFIG``, else None (defaults + environment)."""
    environ = os.environ if environ is None else environ
    if path is not None:
        return Path(path)
    value = environ.get(CONFIG_PATH_ENV, "").strip()
    return Path(value) if value else None


class YamlLimitError(yaml.YAMLError):
    """A YAML document past the loader's bounds: aliases expanding past MAX_YAML_VALUES values or
    referring to themselves, or nesting deeper than MAX_YAML_DEPTH."""


def safe_load_bounded(text: str) -> Any:
    """``yaml.safe_load``, but a document is refused (YamlLimitError) before it is built when its aliases
    (``*name``) would expand it past MAX_YAML_VALUES values or make it contain itself, or when it nests
    deeper than MAX_YAML_DEPTH (PyYAML's composer recurses: a few hundred levels overflow Python's stack).

    PyYAML builds an alias as a second reference to one object, so a few hundred bytes of nested
    aliases (a "billion laughs") load at once; but every later walk over the data (validation, an
    error message's repr of the value) visits each reference: 9 levels of 9 aliases are 387 million
    values. The composed node graph is counted first, each shared node once per place it appears.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YamlLimitError(f"its YAML nests deeper than {MAX_YAML_DEPTH} levels") from None
        if node is None:
            return None
        _count_values(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _count_values(root: yaml.Node) -> int:
    """Values in ``root`` with every alias expanded, up to MAX_YAML_VALUES; raises YamlLimitError past it
    (or past MAX_YAML_DEPTH levels). A node shared by aliases is counted once per place, measured once."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        line = node.start_mark.line + 1
        if id(node) in open_nodes:
            raise YamlLimitError(f"a YAML alias at line {line} refers to the value that holds it (a loop)")
        if depth > MAX_YAML_DEPTH:
            raise YamlLimitError(f"its YAML nests deeper than {MAX_YAML_DEPTH} levels (line {line})")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(key, depth + 1) + size(value, depth + 1) for key, value in node.value)
        open_nodes.discard(id(node))
        if total > MAX_YAML_VALUES:
            raise YamlLimitError(
                f"its YAML aliases (*name) expand to more than {MAX_YAML_VALUES} values (a 'billion laughs' "
                "alias bomb?); a config this size needs no aliases: write the values out"
            )
        sizes[id(node)] = total
        return total

    return size(root, 1)


def read_yaml(path: Path) -> dict[str, Any]:
    """The file's mapping; an empty file is ``{}``. Raises ConfigError naming the file and the cause."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file does not exist"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a YAML file"]) from None
    except PermissionError:
        raise ConfigError([f"{path}: cannot be read (permission denied)"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: is not UTF-8 text"]) from None
    try:
        data = safe_load_bounded(text)
    except YamlLimitError as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}: malformed YAML{where}: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([
            f"{path}: must hold a mapping of sections (camera:, engine:, ...), got {type(data).__name__}"
        ])
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], Any]:
    """``DEFECTSAM__A__B=v`` -> {("a", "b"): parsed v}. Raises ConfigError for a malformed name or value."""
    found: dict[tuple[str, ...], Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        if not parts or any(not part for part in parts):
            raise ConfigError([f"environment variable {name}: expected {ENV_PREFIX}SECTION__KEY (double underscores)"])
        found[parts] = _env_value(raw)
    return found


def _env_value(raw: str) -> Any:
    """Lists, mappings and null are parsed as YAML; scalars stay strings, which pydantic converts
    to the field's type (so a numeric token stays a string, and "10" still sets an int)."""
    try:
        value = safe_load_bounded(raw) if raw.strip() else raw
    except yaml.YAMLError:  # an alias bomb too: the value stays a string, which the key's type refuses
        return raw
    return value if value is None or isinstance(value, (list, dict)) else raw


def _merge(data: dict[str, Any], key: tuple[str, ...], value: Any, origin: str) -> None:
    node = data
    for i, part in enumerate(key[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            dotted = ".".join(key[: i + 1])
            raise ConfigError([f"key '{dotted}' is not a section, so {origin} cannot set a key inside it"])
        node = child
    node[key[-1]] = value


def _dotted(loc: tuple[Any, ...], data: Any, *, last_is_key: bool = False) -> str:
    """A pydantic error location as the user's dotted key: union tags and members, validator names left out.

    A location step that is not in the user's data is never a key they wrote (a discriminated union's
    tag, a union member's or a validator's name, a key a before-validator added), except at the end of
    a missing or unknown key's location (``last_is_key``). Past a scalar (or a list met by a union)
    the steps name union members too.
    """
    parts: list[str] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict):
            if part in node:
                node = node[part]
                parts.append(str(part))
            elif i == len(loc) - 1 and last_is_key:
                parts.append(str(part))
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            parts.append(f"[{part}]")
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _origin(key: str, origins: Mapping[str, str]) -> str | None:
    """The variable that set ``key`` or a section holding it; else those that set keys inside it."""
    holders = [dotted for dotted in origins if key == dotted or key.startswith((dotted + ".", dotted + "["))]
    if holders:
        return origins[max(holders, key=len)]
    inside = sorted(variable for dotted, variable in origins.items() if dotted.startswith((key + ".", key + "[")))
    return ", ".join(inside) or None


def _booleans_as_numbers(given: Any, loaded: Any, path: str = "") -> Iterator[tuple[str, bool]]:
    """Keys where a true/false was taken as the number 1/0 (pydantic's lax mode does): (dotted key, value)."""
    if isinstance(given, bool):
        if isinstance(loaded, (int, float)) and not isinstance(loaded, bool):
            yield path, given
    elif isinstance(given, dict) and isinstance(loaded, dict):
        for key, value in given.items():
            if key in loaded:
                yield from _booleans_as_numbers(value, loaded[key], f"{path}.{key}" if path else str(key))
    elif isinstance(given, list) and isinstance(loaded, (list, tuple)) and len(given) == len(loaded):
        for i, (value, got) in enumerate(zip(given, loaded, strict=True)):
            yield from _booleans_as_numbers(value, got, f"{path}[{i}]")


def _show(key: str, value: Any) -> str:
    from service.capture.opencv import mask_credentials

    if key.rsplit(".", 1)[-1] in SECRET_KEYS:
        return "'***'"
    text = repr(mask_credentials(value) if isinstance(value, str) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_problems(
    error: ValidationError, data: dict[str, Any], origins: Mapping[str, str] | None = None
) -> list[str]:
    """One line per pydantic error: key, value, reason, and which variable set it if not the file."""
    problems = []
    for item in error.errors(include_url=False):
        key = _dotted(tuple(item["loc"]), data, last_is_key=item["type"] in ("extra_forbidden", "missing"))
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; 'defectsam config example' lists every key)"
        elif item["type"] == KEY_ERROR:  # a section's validator about one of its keys
            key = f"{key}.{item['ctx']['key']}" if key != "(top level)" else item["ctx"]["key"]
            item = {**item, "input": item["ctx"]["value"]}
        elif item["type"] == "union_tag_invalid":
            key = f"{key}.type"
            item = {**item, "input": item.get("ctx", {}).get("tag")}
            message = f"must be one of {item.get('ctx', {}).get('expected_tags')}"
        shown = "" if item["type"] == "missing" else f" = {_show(key, item.get('input'))}"
        origin = _origin(key, origins or {})
        problems.append(f"key '{key}'{shown}: {message}" + (f" (from {origin})" if origin else ""))
    return problems


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Defaults < YAML file (``path`` or $DEFECTSAM_CONFIG) < DEFECTSAM__* variables. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    file = config_path_from_env(path, environ)
    data: dict[str, Any] = read_yaml(file) if file is not None else {}
    origins: dict[str, str] = {}
    for key, value in env_overrides(environ).items():
        variable = ENV_PREFIX + "__".join(part.upper() for part in key)
        _merge(data, key, value, variable)
        origins[".".join(key)] = variable
    try:
        config = DaemonConfig.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc, data, origins)
    else:
        problems = [
            f"key '{key}' = {value}: expected a number, not {str(value).lower()}"
            + (f" (from {origin})" if (origin := _origin(key, origins)) else "")
            for key, value in _booleans_as_numbers(data, config.model_dump(mode="python", by_alias=True))
        ]
        if not problems:
            return config
    if file is not None:
        problems[0] = f"{file}: {problems[0]}"
    raise ConfigError(problems)


def redacted(config: DaemonConfig) -> dict[str, Any]:
    """The config as JSON-able data: secrets (SecretStr) dump as '**********', and a password in any
    string (an RTSP URL's, a GStreamer pipeline's user-pw=) is masked as '***'."""
    from service.capture.opencv import mask_credentials

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return mask_credentials(value)
        if isinstance(value, dict):
            return {key: scrub(item) for key, item in value.items()}
        if isinstance(value, list):
            return [scrub(item) for item in value]
        return value

    return scrub(config.model_dump(mode="json", by_alias=True))
