"""Hostile config: random values for every key of the daemon's config, unknown keys, wrong nesting,
broken YAML and environment overrides, through the loader ``defectsam serve`` starts with.

The rule (docs/service.md): a config that cannot be used stops start-up with one line naming the
dotted key (and the variable, when one set it); a config that loads has taken every value as
written, converted to the field's type at most (``"10"`` -> 10, ``3`` -> 3.0), never replaced,
dropped or reinterpreted (``true`` is not the number 1). Hypothesis draws the cases (seeded:
DEFECTSAM_FUZZ_SEED; a failure prints the config that broke the rule); a few error cases also go
through a real ``defectsam serve`` process, which must exit 2 with that one line and no traceback.
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr

from service.config import ConfigError, DaemonConfig, load_config
from service.config.loader import ENV_PREFIX

from .conftest import REPO

SEED = int(os.environ.get("DEFECTSAM_FUZZ_SEED", "20261122"))
SCALE = int(os.environ.get("DEFECTSAM_FUZZ_SCALE", "1"))  # more examples for a deeper run than CI's
EXAMPLES = 400 * SCALE  # per test; load_config takes about a millisecond
SERVE_CASES = 4  # real 'defectsam serve' processes (about 1 s each: a config error stops it before the heavy imports)
# documented: "empty or null: ..." (engine.bundle, engine.bundle_store); the optional files (OptionalFile)
BLANK_MEANS_NULL = {("engine", "bundle"), ("engine", "bundle_store"), ("mqtt", "tls", "ca_file"),
                    ("mqtt", "tls", "cert_file"), ("mqtt", "tls", "key_file"), ("opcua", "certificate"),
                    ("opcua", "private_key")}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])


def _tree(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _tree(value, (*path, key))


DEFAULTS = DaemonConfig().model_dump(mode="json", by_alias=True)
LEAVES = sorted(path for path, value in _tree(DEFAULTS) if path and not isinstance(value, dict))
# () is the top level; an empty dict by default is a map (recipes, opcua.users), whose keys are the user's
SECTIONS = sorted(path for path, value in _tree(DEFAULTS) if isinstance(value, dict) and (value or not path))


def default_at(path: tuple[str, ...]) -> Any:
    node: Any = DEFAULTS
    for part in path:
        node = node[part]
    return node


def _field_names() -> set[str]:
    """Every key any config model accepts (names and aliases; every pydantic model loaded, to be safe),
    so that an 'unknown' key is really unknown."""
    def models(cls: type[BaseModel]) -> Iterator[type[BaseModel]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from models(sub)

    return {key for model in models(BaseModel) for name, info in model.model_fields.items()
            for key in (name, info.alias or name)}


KNOWN_KEYS = _field_names()

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 3), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 65535, 65536, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-9, 0.5, 1.0, 1e308]),
    st.text(max_size=24), st.sampled_from(["", " ", "10", "1e3", "0x10", "yes", "off", "null", "auto", "cpu",
                                           "127.0.0.1", "10.0.0.0/8", "::1", "~", "-1", "nan", "inf"]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=8), scalars, max_size=2),
)
keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True).filter(lambda k: k.lower() not in KNOWN_KEYS)


def nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return data


def dump_at(config: DaemonConfig, path: tuple[str, ...]) -> Any:
    node: Any = config.model_dump(mode="python", by_alias=True)
    for part in path:
        node = node[part]
    return node


_TRUTHY = {"1", "on", "t", "true", "y", "yes"}
_FALSY = {"0", "off", "f", "false", "n", "no"}


def taken(given: Any, got: Any) -> bool:
    """Whether ``got`` (the loaded value) is ``given`` (what the user wrote), at most converted to its type."""
    if isinstance(got, SecretStr):
        got = got.get_secret_value()
    if given is None:
        return got is None
    if isinstance(given, bool):
        return got is given
    if isinstance(given, (int, float)):
        if isinstance(got, bool):
            return given in (0, 1) and got == bool(given)  # 0 and 1 are read as false and true, as YAML 1.1 does
        if not isinstance(got, (int, float)):
            return False
        return got == given or (math.isnan(given) and math.isnan(got))
    if isinstance(given, str):
        if isinstance(got, str):
            return got == given
        if isinstance(got, Path):
            return got == Path(given) and given.strip() != ""
        if isinstance(got, bool):
            return given.strip().lower() in (_TRUTHY if got else _FALSY)
        if isinstance(got, (int, float)):
            try:
                return float(given) == got or (math.isnan(got) and math.isnan(float(given)))
            except ValueError:
                return False
        return False
    if isinstance(given, list):
        return isinstance(got, list) and len(got) == len(given) and all(map(taken, given, got))
    if isinstance(given, dict):
        return isinstance(got, dict) and given.keys() == got.keys() and all(taken(given[k], got[k]) for k in given)
    return False


def names_key(message: str, path: tuple[str, ...]) -> bool:
    """The message names ``path``, a key inside it, or (a rule across keys) a section holding it."""
    named = re.findall(r"key '([^']*)'", message)
    dotted = ".".join(path)
    return any(
        key == dotted or key.startswith((dotted + ".", dotted + "[")) or (key and dotted.startswith(key + "."))
        for key in named
    )


def check_one_line(message: str) -> None:
    assert "\n" not in message and message.startswith("config: ") and "Traceback" not in message, message


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config") / "defectsam.yaml"


def load(file: Path, data: Any, environ: dict[str, str] | None = None) -> DaemonConfig | str:
    file.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        return load_config(file, environ or {})
    except ConfigError as exc:
        check_one_line(str(exc))
        return str(exc)


@FUZZ
@seed(SEED)
@given(path=st.sampled_from(LEAVES), value=values)
def test_any_value_for_any_key_is_taken_or_refused_naming_the_key(config_file: Path, path: tuple[str, ...],
                                                                 value: Any) -> None:
    result = load(config_file, nest(path, value))
    if isinstance(result, str):
        assert names_key(result, path), f"{'.'.join(path)} = {value!r}: the error does not name it: {result}"
    else:
        got = dump_at(result, path)
        if path in BLANK_MEANS_NULL and isinstance(value, str) and not value.strip():
            assert got is None, f"{'.'.join(path)} = {value!r} loaded as {got!r}"
        else:
            assert taken(value, got), f"{'.'.join(path)} = {value!r} loaded as {got!r}"


@FUZZ
@seed(SEED)
@given(section=st.sampled_from(SECTIONS), key=keys, value=values)
def test_unknown_keys_are_refused_by_name(config_file: Path, section: tuple[str, ...], key: str, value: Any) -> None:
    result = load(config_file, nest((*section, key), value) if section else {key: value})
    dotted = ".".join((*section, key))
    assert isinstance(result, str), f"unknown key {dotted} was accepted"
    assert f"key '{dotted}'" in result and "unknown key" in result, result


@FUZZ
@seed(SEED)
@given(section=st.sampled_from([s for s in SECTIONS if s]), value=st.one_of(scalars, st.lists(scalars, max_size=3)),
       moved=st.sampled_from(LEAVES))
def test_wrong_nesting_is_refused_by_name(config_file: Path, section: tuple[str, ...], value: Any,
                                         moved: tuple[str, ...]) -> None:
    """A section given as a value, and a key written one level too high (in the section above its own)."""
    dotted = ".".join(section)
    result = load(config_file, nest(section, value))
    if value is None and isinstance(result, DaemonConfig):
        pytest.fail(f"{dotted}: null taken as the defaults")  # would hide a section whose keys were all deleted
    assert isinstance(result, str) and names_key(result, section), f"{dotted} = {value!r}: {result}"
    if len(moved) > 1 and moved[-1] not in default_at(moved[:-2]):
        result = load(config_file, nest((*moved[:-2], moved[-1]), default_at(moved)))
        assert isinstance(result, str), f"{'.'.join(moved)} written one level up was accepted"
        assert names_key(result, (*moved[:-2], moved[-1])), result


def env_text(value: Any) -> str:
    """How a user would write ``value`` in a variable: strings as they are, the rest as YAML flow."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


@FUZZ
@seed(SEED)
@given(path=st.sampled_from(LEAVES), value=values, in_file=values)
def test_environment_overrides_are_taken_or_refused_naming_the_variable(config_file: Path, path: tuple[str, ...],
                                                                        value: Any, in_file: Any) -> None:
    text = env_text(value).replace("\x00", "")
    variable = ENV_PREFIX + "__".join(part.upper() for part in path)
    result = load(config_file, nest(path, in_file), {variable: text})
    if isinstance(result, str):
        assert names_key(result, path), f"{variable}={text!r}: the error does not name it: {result}"
        if f"key '{'.'.join(path)}" in result:  # the problem is the variable's own value
            assert f"(from {variable})" in result, result
    else:
        got = dump_at(result, path)
        want = as_the_loader_reads(text)
        if path in BLANK_MEANS_NULL and isinstance(want, str) and not want.strip():
            want = None
        assert taken(want, got), f"{variable}={text!r} loaded as {got!r}"


def as_the_loader_reads(text: str) -> Any:
    """docs/service.md: a variable's value is YAML when it is a list, a mapping or null, else a string."""
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
    return value if value is None or isinstance(value, (list, dict)) else text


@FUZZ
@seed(SEED)
@given(name=st.text(st.characters(codec="ascii", exclude_characters="\x00="), max_size=20), text=st.text(max_size=10))
def test_malformed_variable_names_are_refused_or_ignored(config_file: Path, name: str, text: str) -> None:
    variable = ENV_PREFIX + name
    result = load(config_file, {}, {variable: text.replace("\x00", "")})
    if isinstance(result, DaemonConfig):  # then it named a key, and set it
        assert tuple(part.lower() for part in name.split("__")) in LEAVES, f"{variable} was ignored"


@FUZZ
@seed(SEED)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=100).map(lambda b: b.decode("latin-1"))),
       raw=st.booleans())
def test_broken_yaml_is_one_line(config_file: Path, text: str, raw: bool) -> None:
    if raw:
        config_file.write_bytes(text.encode("latin-1", errors="replace"))
    else:
        config_file.write_text(text)
    try:
        load_config(config_file, {})
    except ConfigError as exc:
        check_one_line(str(exc))


def _serve_cases() -> list[tuple[str, dict[str, str], str]]:
    """A few seeded error cases for the real command: (YAML, environment, the key it must name)."""
    rng = random.Random(SEED)
    out: list[tuple[str, dict[str, str], str]] = []
    bad = [-1, "fast", [1, 2], {"x": 1}, True, 10**30, "", None]
    for _ in range(SERVE_CASES):
        path = rng.choice([p for p in LEAVES if isinstance(default_at(p), (int, float)) and default_at(p) is not True])
        value = rng.choice(bad)
        if rng.random() < 0.5:
            out.append((yaml.safe_dump(nest(path, value)), {}, ".".join(path)))
        else:
            variable = ENV_PREFIX + "__".join(part.upper() for part in path)
            out.append(("", {variable: env_text(value) or "[]"}, ".".join(path)))
    return out


@pytest.mark.parametrize(("text", "environ", "key"), [
    pytest.param(*case, id=f"{case[2]}-{'environment' if case[1] else 'file'}") for case in _serve_cases()])
def test_serve_refuses_a_fuzzed_config_with_one_line(tmp_path: Path, text: str, environ: dict[str, str],
                                                     key: str) -> None:
    file = tmp_path / "station.yaml"
    file.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("DEFECTSAM__", "DEFECTSAM_CONFIG"))}
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--config", str(file)], capture_output=True,
                          text=True, cwd=REPO, env={**env, "PYTHONPATH": str(REPO), **environ}, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("defectsam: error: config: ") and f"key '{key}" in lines[0], lines[0]


@pytest.mark.parametrize(("text", "environ", "fragment"), [
    ("api:\n  port: true\n", {}, "key 'api.port' = True: expected a number, not true"),
    ("camera:\n  fps: true\n", {}, "key 'camera.fps' = True: expected a number, not true"),
    ("plc:\n  allowlist: []\n  unit_id: false\n", {}, "key 'plc.unit_id' = False: expected a number, not false"),
    ("store:\n  path: ''\n", {}, "key 'store.path' = '': Value error, must name a directory"),
    ("", {"DEFECTSAM__STORE__PATH": " "}, "(from DEFECTSAM__STORE__PATH)"),
    ("api:\n  \"po\\nrt\": 1\n", {}, "key 'api.po\\nrt' = 1: unknown key"),
    ("", {"DEFECTSAM__API__\n": "1"}, "key 'api.\\n' = '1': unknown key (check the spelling"),
    ("camera:\n  height: 1521\n", {}, "key 'camera' = {"),  # was 'camera.synthetic', the union's tag
    ("", {"DEFECTSAM__ENGINE__BACKEND__PROVIDERS": "null"},
     "key 'engine.backend.providers' = None: Input should be a valid list"),
    ("", {"DEFECTSAM__ENGINE__BACKEND__PROVIDERS": "[gpu]"}, "(from DEFECTSAM__ENGINE__BACKEND__PROVIDERS)"),
    ("", {"DEFECTSAM__ENGINE__POSTPROCESS__SCORE_THRESHOLD": "0.2"},
     "(from DEFECTSAM__ENGINE__POSTPROCESS__SCORE_THRESHOLD)"),
])
def test_what_the_fuzzing_found(config_file: Path, text: str, environ: dict[str, str], fragment: str) -> None:
    """Each was a start with a wrong value, or an error on two lines, or one that named no key or variable."""
    config_file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(config_file, environ)
    check_one_line(str(info.value))
    assert fragment in str(info.value), str(info.value)


def test_a_blank_bundle_means_the_embedded_one(config_file: Path) -> None:
    config_file.write_text("engine:\n  bundle: ''\n")
    assert load_config(config_file, {}).engine.bundle is None  # was Path('.'): a bundle in the working directory
    assert load_config(None, {"DEFECTSAM__ENGINE__BUNDLE": ""}).engine.bundle is None
