"""The daemon's one `Config`: TOML file < `STREAMD_*` environment < command-line flags.

Every setting has one dotted name, used the same way in all three places:

    TOML                        environment                     flag
    port = 8765                 STREAMD_PORT=8765               --port 8765
    [session] step_ms = 400     STREAMD_SESSION_STEP_MS=400     --set session.step_ms=400
    [vad] aggressiveness = 2    STREAMD_VAD_AGGRESSIVENESS=2    --set vad.aggressiveness=2
    [mqtt] url = "mqtt://h"     STREAMD_MQTT_URL=mqtt://h       --mqtt-url mqtt://h

`[vad]` and `[guards]` are the session's `vad` and `guards`; unknown names are errors (a typo
must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamd.engine.precision import ENCODER_PRECISIONS
from streamd.errors import ConfigError
from streamd.streaming.config import SessionConfig

DEFAULT_PORT = 8765
ENV_PREFIX = "STREAMD_"
# sections that live inside [session] but read better at the top level of the file
_SESSION_SUBSECTIONS = ("vad", "guards")


@dataclass(frozen=True)
class MqttConfig:
    """The MQTT sink; off unless `url` is set (mqtt://[user:password@]host[:port])."""

    url: str | None = None
    topic_prefix: str = "streamd"  # finals go to <prefix>/<session>/final
    partials: bool = False  # also publish partials to <prefix>/<session>/partial (QoS 0)
    qos: int = 1
    queue_size: int = 1000  # finals held while the broker is away; beyond that, journal only
    reconnect_s: float = 2.0


@dataclass(frozen=True)
class Config:
    """Everything `streamd serve` needs. Durations carry their unit in the name."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port (tests)
    token: str | None = None  # when set, clients must present it (header or ?token=)
    model: str = "tiny.en"
    engine: str = "torch"  # torch | neuron
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None = torch's default
    encoder_buckets_s: tuple[int, ...] = (30,)  # a lone stream: full context (quality)
    # while the engine is contended: smaller contexts are up to 4x cheaper (capacity)
    busy_encoder_buckets_s: tuple[int, ...] = (10, 20, 30)
    # an utterance's first partial step (no draft yet): a small context shows its first words
    # sooner and changes no final (docs/streaming.md, "First look"); empty: full context
    first_look_buckets_s: tuple[int, ...] = (10, 20, 30)
    # auto: bf16 where the CPU has it natively (streamd/engine/precision.py), else fp32
    encoder_precision: str = "auto"
    language: str | None = None  # default for sessions that do not say; None = detect
    max_sessions: int = 16
    max_frame_bytes: int = 1 << 20  # one binary frame; bigger ones are refused, not cut
    max_batch: int = 8  # windows per engine call
    batch_wait_ms: int = 5  # how long an idle engine waits for a batch to fill
    journal_dir: Path = field(default_factory=lambda: _default_state_dir() / "journal")
    web_dir: Path | None = None  # the captions page; None: clients/web of this checkout
    session: SessionConfig = field(default_factory=SessionConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.max_sessions < 1 or self.max_batch < 1 or self.batch_wait_ms < 0:
            raise ConfigError("max_sessions and max_batch must be >= 1, batch_wait_ms >= 0")
        if self.max_frame_bytes < 1024:
            raise ConfigError("max_frame_bytes must be at least 1024")
        if self.encoder_precision not in ENCODER_PRECISIONS:
            raise ConfigError(
                f"encoder_precision must be one of {', '.join(ENCODER_PRECISIONS)}, "
                f"got {self.encoder_precision!r}"
            )
        if self.engine not in ("torch", "neuron"):
            raise ConfigError(f"engine must be torch or neuron, got {self.engine!r}")
        if self.mqtt.qos not in (0, 1, 2):
            raise ConfigError(f"mqtt.qos must be 0, 1 or 2, got {self.mqtt.qos}")


def _default_state_dir() -> Path:
    state = os.environ.get("STATE_DIRECTORY")  # systemd's StateDirectory=
    if state:
        return Path(state.split(":")[0])
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "streamd"


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config from a TOML file, then `STREAMD_*` variables, then `overrides`.

    overrides: dotted names ("port", "session.step_ms") to values, already typed or strings.
    Raises ConfigError naming the file/variable/flag that is wrong.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        for name, value in _flatten(data):
            values[name] = (value, f"{path}: {name}")
    for var, raw in (os.environ if env is None else env).items():
        if var.startswith(ENV_PREFIX) and var not in _NOT_SETTINGS:
            values[_env_name(var)] = (raw, var)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = (value, f"--{name}")
    return _build(values)


# STREAMD_* variables that are not settings (read elsewhere)
_NOT_SETTINGS = frozenset({"STREAMD_CACHE_DIR", "STREAMD_TORCH_PIN", "STREAMD_CONFIG"})


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{name}."))
        else:
            out.append((name, value))
    return out


def _env_name(var: str) -> str:
    rest = var[len(ENV_PREFIX) :].lower()
    for section in ("session", "mqtt", *_SESSION_SUBSECTIONS):
        if rest.startswith(section + "_"):
            return f"{section}.{rest[len(section) + 1 :]}"
    return rest


def _canonical(name: str) -> str:
    """`vad.x` -> `session.vad.x`: the dataclass path of a setting."""
    head = name.split(".", 1)[0]
    return f"session.{name}" if head in _SESSION_SUBSECTIONS else name


def _build(values: Mapping[str, tuple[Any, str]]) -> Config:
    tree: dict[str, Any] = {}
    for name, (value, origin) in values.items():
        path = _canonical(name).split(".")
        cls, node = Config, tree
        for part in path[:-1]:
            _field(cls, part, origin)
            cls = _hints(cls)[part]
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"{origin}: {part} is not a section")
            node = node.setdefault(part, {})
        leaf = path[-1]
        _field(cls, leaf, origin)
        node[leaf] = (_coerce(value, _hints(cls)[leaf], origin), origin)
    return _instantiate(Config, tree)


def _instantiate(cls: Any, node: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    origins: list[str] = []
    for key, item in node.items():
        if isinstance(item, dict):
            kwargs[key] = _instantiate(_hints(cls)[key], item)
        else:
            kwargs[key], origin = item
            origins.append(origin)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{', '.join(origins) or cls.__name__}: {exc}") from exc


def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field(cls: Any, name: str, origin: str) -> dataclasses.Field[Any]:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    known = ", ".join(f.name for f in dataclasses.fields(cls))
    raise ConfigError(f"{origin}: unknown setting {name!r} (known here: {known})")


def _coerce(value: Any, kind: Any, origin: str) -> Any:
    """Turn a TOML value or a string from the environment/flags into `kind`."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        (kind,) = [a for a in args if a is not type(None)]
        args = typing.get_args(kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if typing.get_origin(kind) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(_coerce(i, args[0], origin) for i in items if str(i).strip())
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if kind is float:
            return float(value)
        if kind is Path:
            return Path(value).expanduser()
        if kind is str:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: {exc}") from exc
    raise ConfigError(f"{origin}: cannot set a {kind} from the configuration")
