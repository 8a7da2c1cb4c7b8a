"""Every process's settings, read from KRONOS_* environment variables by one loader.

The settings classes are pydantic-settings classes: the shared ones (KronosSettings, with the job limits) and
Flower's here, the worker's in worker/settings.py. Each field is the variable KRONOS_<FIELD> (or KRONOS_<ALIAS>
where the variable's name says its unit, e.g. KRONOS_MAX_BATCH_WAIT_MS for a field in seconds). `load` reads
them all, from the environment or from a given mapping, and turns the first invalid one into a SettingsError
of one line naming the variable. Nothing is read at import: a process reads its settings when it first needs
them (current_settings()), so a bad variable stops the command or the worker with that line, not an import.

Every variable is documented in docs/CONFIGURATION.md (tests/unit/test_settings_doc.py keeps the two in step).
An unset or blank variable takes its default.
"""

import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from schemas.limits import Limits

ENV_PREFIX = "KRONOS_"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"
RESULT_BACKEND_DB = 1
DEFAULT_MODELS = ("kronos-small", "kronos-base", "kronos-mini")
# Added to twice the longest job in the default visibility timeout: covers clock skew between the host
# that fetched a message (its clock scores the unacked entry) and the host whose sweep compares against it.
VISIBILITY_MARGIN_SECONDS = 60

# Names end up in Redis keys and in `celery worker -Q` lists: keep them free of separators and spaces.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A producer name is also its Redis ACL user and the prefix of its job ids ("<producer>:<id>"): no dots,
# so that one producer's key patterns can never match another's ("a" vs "a.b").
PRODUCER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# Our transport options (visibility timeout, priority steps, socket timeouts) are kombu-Redis specific.
# sentinel:// is Celery's and kombu's form for Redis Sentinel: "sentinel://host:26379/0;sentinel://host2:26379/0",
# one URL per sentinel, the master's name in KRONOS_SENTINEL_MASTER (tasks/connections.py).
_REDIS_SCHEMES = ("redis", "rediss", "sentinel")
SENTINEL_SCHEME = "sentinel"
SENTINEL_SEPARATOR = ";"


class SettingsError(ValueError):
    """A KRONOS_* variable holds an unusable value; the message, one line, names the variable."""


# --- the loader -------------------------------------------------------------------------------------

# The variables `load` was given for the settings being built (None: the process's environment). A context
# variable because pydantic-settings builds its sources inside the class, out of reach of `load`'s arguments.
_given_environ: ContextVar[Mapping[str, str] | None] = ContextVar("kronos_given_environ", default=None)


class KronosEnvironment(PydanticBaseSettingsSource):
    """The KRONOS_* variables of the settings' fields, as raw strings. Blank counts as unset (compose files and
    Helm charts often pass "" for "not configured"); nothing is JSON-decoded, the fields' parsers read the text.
    A field holding a plain model (the limits) takes its own fields' variables, KRONOS_<SUBFIELD>."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        given = _given_environ.get()
        self.environ = os.environ if given is None else given

    def _raw(self, variable: str) -> str | None:
        return self.environ.get(variable, "").strip() or None

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if _is_model(field.annotation):
            nested = {name: self._raw(variable) for name, variable in _nested_variables(field.annotation)}
            return {name: raw for name, raw in nested.items() if raw is not None} or None, field_name, False
        variable = _variable(field_name, field)
        return self._raw(variable), variable, False

    def __call__(self) -> dict[str, Any]:
        values = {}
        for name, field in self.settings_cls.model_fields.items():
            if field.exclude:  # context the loader passes in (worker/settings.py), not a variable
                continue
            value, _, _ = self.get_field_value(field, name)
            if value is not None:
                values[field.alias or name] = value
        return values


class KronosBaseSettings(BaseSettings):
    """Settings read from KRONOS_* variables through `load`. Only fields given `validate_default` run their
    validators on their default: a derived default (default_factory) is built from values already checked."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, validate_default=False, extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, *_: Any, **__: Any
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env files, no secrets directory: a deployment sets variables (and names secret files in them).
        return init_settings, KronosEnvironment(settings_cls)


Settings = TypeVar("Settings", bound=KronosBaseSettings)


def load(settings_class: type[Settings], environ: Mapping[str, str] | None = None, **context: Any) -> Settings:
    """`settings_class` from `environ` (default: this process's environment); `context`: values of fields that are
    not variables. Raises SettingsError, one line naming the variable, on the first invalid value."""
    token = _given_environ.set(environ)
    try:
        return settings_class(**context)
    except ValidationError as exc:
        raise SettingsError(_one_line(exc, settings_class)) from None
    finally:
        _given_environ.reset(token)


def environment_variables(settings_class: type[BaseModel]) -> Iterator[str]:
    """Every KRONOS_* variable `settings_class` reads."""
    for name, field in settings_class.model_fields.items():
        if field.exclude:
            continue
        if _is_model(field.annotation):
            yield from (variable for _, variable in _nested_variables(field.annotation))
        else:
            yield _variable(name, field)


def _one_line(error: ValidationError, settings_class: type[BaseModel]) -> str:
    first = error.errors(include_url=False)[0]
    problem = first["msg"].removeprefix("Value error, ")
    fields = settings_class.model_fields
    field_name = next((name for name, f in fields.items() if first["loc"][:1] in ((name,), (f.alias,))), None)
    if field_name is None:
        # A rule across fields: its message names the variables itself, or the fields it involves.
        return problem if problem.startswith(ENV_PREFIX) else _blame_fields(problem, fields.items())
    field = fields[field_name]
    if _is_model(field.annotation):
        nested = dict(_nested_variables(field.annotation))
        if len(first["loc"]) == 1:
            return _blame_fields(problem, field.annotation.model_fields.items(), nested)
        variable = nested[str(first["loc"][1])]
    else:
        variable = _variable(field_name, field)
    if first["type"] != "value_error":  # pydantic's own check (the limits' ranges): its message, and the value
        return f"{variable}: {problem}, got {first['input']!r}"
    # Our parsers phrase a problem to follow the variable's name: "must be ...", or ": cannot read ...".
    return f"{variable}{'' if problem.startswith(':') else ' '}{problem}"


def _blame_fields(problem: str, fields, variables: Mapping[str, str] | None = None) -> str:
    """'<variable> / <variable>: <problem>' for the fields `problem` mentions, in its order."""
    mentioned = sorted((problem.find(name), name) for name, _ in fields if re.search(rf"\b{name}\b", problem))
    culprits = [(variables or {}).get(name) or f"{ENV_PREFIX}{name.upper()}" for _, name in mentioned]
    return f"{' / '.join(culprits)}: {problem}" if culprits else problem


def _variable(field_name: str, field: FieldInfo) -> str:
    return ENV_PREFIX + (field.alias or field_name).upper()


def _nested_variables(model: type[BaseModel]) -> Iterator[tuple[str, str]]:
    return ((name, _variable(name, field)) for name, field in model.model_fields.items())


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# --- parsers: each reads a variable's text; values set in code (defaults, copies) pass unchanged ------------


def parsed_by(parse: Callable[[str], Any]) -> BeforeValidator:
    return BeforeValidator(lambda value: parse(value) if isinstance(value, str) else value)


def _whole_number(raw: str, *, unit: str = "", least: int = 1) -> int:
    if not (raw.isascii() and raw.isdigit()) or int(raw) < least:
        raise ValueError(f"must be a whole number{unit} >= {least}, got {raw!r}")
    return int(raw)


def _positive(raw: str, *, unit: str = "seconds") -> float:
    try:
        number = float(raw)
    except ValueError:
        number = math.nan
    if not 0 < number < math.inf:
        raise ValueError(f"must be a number of {unit} > 0, got {raw!r}")
    return number


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError(f"must be 1 (on) or 0 (off), got {raw!r}")
    return raw == "1"


def _name(raw: str) -> str:
    if not _NAME_PATTERN.fullmatch(raw):
        raise ValueError(f"must match {_NAME_PATTERN.pattern}, got {raw!r}")
    return raw


def _names(raw: str) -> tuple[str, ...]:
    names = tuple(item.strip() for item in raw.split(","))
    if not all(_NAME_PATTERN.fullmatch(name) for name in names):
        raise ValueError(f"must be a comma-separated list of names matching {_NAME_PATTERN.pattern}, got {raw!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"lists a model twice: {raw!r}")
    return names


def _producer(raw: str) -> str:
    if not PRODUCER_PATTERN.fullmatch(raw):
        raise ValueError(f"must match {PRODUCER_PATTERN.pattern} (no dots), got {raw!r}")
    return raw


def _producers(raw: str) -> tuple[str, ...]:
    names = tuple(item.strip() for item in raw.split(","))
    bad = [name for name in names if not PRODUCER_PATTERN.fullmatch(name)]
    if bad:
        raise ValueError(f": {', '.join(map(repr, bad))} must match {PRODUCER_PATTERN.pattern} (no dots)")
    if len(set(names)) != len(names):
        raise ValueError(f"lists a producer twice: {raw!r}")
    return names


def _readable_file(raw: str) -> str:
    if not os.access(raw, os.R_OK):
        raise ValueError(f": cannot read {raw!r}")
    return raw


def _secret_file(raw: str) -> str:
    """The first line of the file (a Docker or Kubernetes secret), never the variable's value itself."""
    lines = Path(_readable_file(raw)).read_text().strip().splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ValueError(f": {raw!r} is empty")
    return secret


def _redis_url(raw: str) -> str:
    scheme = urlsplit(raw).scheme
    # Only the scheme goes into the message: the rest of the URL may carry a password.
    if scheme not in _REDIS_SCHEMES:
        raise ValueError(f"must be a {' or '.join(s + '://' for s in _REDIS_SCHEMES)} URL, got scheme {scheme!r}")
    if scheme == SENTINEL_SCHEME:
        parts = raw.split(SENTINEL_SEPARATOR)
        if any(urlsplit(part).scheme != SENTINEL_SCHEME or not urlsplit(part).hostname for part in parts):
            raise ValueError(": every part of a Sentinel URL is sentinel://host:port[/db], ';'-separated")
    return raw


def one_of(*choices: str) -> BeforeValidator:
    def choose(raw: str) -> str:
        if raw not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return raw

    return parsed_by(choose)


WholeNumber = Annotated[int, parsed_by(_whole_number)]
Count = Annotated[int, parsed_by(lambda raw: _whole_number(raw, least=0))]
WholeSeconds = Annotated[int, parsed_by(lambda raw: _whole_number(raw, unit=" of seconds"))]
PositiveSeconds = Annotated[float, parsed_by(_positive)]
Milliseconds = Annotated[float, parsed_by(lambda raw: _positive(raw, unit="milliseconds") / 1000)]  # as seconds
Flag = Annotated[bool, parsed_by(_flag)]
Name = Annotated[str, parsed_by(_name)]
Names = Annotated[tuple[str, ...], parsed_by(_names)]
Producer = Annotated[str, parsed_by(_producer)]
Producers = Annotated[tuple[str, ...], parsed_by(_producers)]
ReadableFile = Annotated[str, parsed_by(_readable_file)]
SecretFile = Annotated[str, parsed_by(_secret_file)]
RedisUrl = Annotated[str, parsed_by(_redis_url)]


# --- the shared settings: producers, workers, Flower ------------------------------------------------


class KronosSettings(KronosBaseSettings):
    # The password of KRONOS_REDIS_PASSWORD_FILE, which the URLs below take in (so before them).
    redis_password: SecretFile | None = Field(None, alias="REDIS_PASSWORD_FILE", repr=False)
    # repr=False: the URLs may carry a password
    broker_url: RedisUrl = Field(DEFAULT_BROKER_URL, repr=False, validate_default=True)
    result_backend: RedisUrl = Field(
        default_factory=lambda data: _with_db(data.get("broker_url", DEFAULT_BROKER_URL), RESULT_BACKEND_DB),
        repr=False,
    )
    result_expires: WholeSeconds = 86400
    max_job_seconds: WholeSeconds = 600
    visibility_timeout: WholeSeconds = Field(
        default_factory=lambda data: 2 * data.get("max_job_seconds", 600) + VISIBILITY_MARGIN_SECONDS
    )
    prefetch_multiplier: WholeNumber = 1
    queue_prefix: Name = "kronos"
    models: Names = DEFAULT_MODELS
    default_model: Name = "kronos-small"
    unacked_restore_interval: WholeSeconds = 10
    socket_timeout: PositiveSeconds = 30.0
    socket_connect_timeout: PositiveSeconds = 5.0
    health_check_interval: WholeSeconds = 25
    producer: Producer | None = None  # who this process enqueues as; None: the shared queues
    producers: Producers = ()  # the producers a worker serves; (): the shared queues
    tls_ca_file: ReadableFile | None = Field(None, alias="REDIS_TLS_CA_FILE")
    tls_cert_file: ReadableFile | None = Field(None, alias="REDIS_TLS_CERT_FILE")
    tls_key_file: ReadableFile | None = Field(None, alias="REDIS_TLS_KEY_FILE")
    # Redis Sentinel: the monitored master's name, and the sentinels' own password (None: they need none)
    sentinel_master: Name | None = None
    sentinel_password: SecretFile | None = Field(None, alias="SENTINEL_PASSWORD_FILE", repr=False)
    sentinel_tls: Flag = False  # TLS to the sentinels and to the servers they name
    # Writes that must survive a failover (a job accepted, an answer stored) wait for this many replicas
    replicas_to_ack: Count = 0
    replica_ack_timeout: PositiveSeconds = 2.0
    # What a worker accepts of a job (its KRONOS_MAX_* / KRONOS_MIN_CANDLES variables)
    limits: Limits = Field(default_factory=Limits)

    @property
    def uses_sentinel(self) -> bool:
        return is_sentinel_url(self.broker_url)

    @field_validator("broker_url", "result_backend")
    @classmethod
    def _take_in_the_password(cls, url: str, info: ValidationInfo) -> str:
        password = info.data.get("redis_password")
        return url if password is None else _with_password(url, password)

    @model_validator(mode="after")
    def _check_together(self) -> Self:
        if self.visibility_timeout < self.max_job_seconds:
            raise ValueError(
                f"KRONOS_VISIBILITY_TIMEOUT ({self.visibility_timeout}) must be >= KRONOS_MAX_JOB_SECONDS "
                f"({self.max_job_seconds}): a job still unacknowledged when it expires is delivered to a second worker"
            )
        if self.default_model not in self.models:
            raise ValueError(
                f"KRONOS_DEFAULT_MODEL {self.default_model!r} is not one of KRONOS_MODELS ({', '.join(self.models)})"
            )
        sentinel = is_sentinel_url(self.broker_url)
        if self.sentinel_tls and not sentinel:
            raise ValueError("KRONOS_SENTINEL_TLS=1 needs sentinel:// URLs; with one Redis use rediss:// URLs")
        tls_urls = self.sentinel_tls or (_is_tls(self.broker_url) and _is_tls(self.result_backend))
        if (self.tls_ca_file or self.tls_cert_file or self.tls_key_file) and not tls_urls:
            raise ValueError(
                "KRONOS_REDIS_TLS_*_FILE are set but KRONOS_BROKER_URL/KRONOS_RESULT_BACKEND are not rediss:// URLs "
                "(nor sentinel:// URLs with KRONOS_SENTINEL_TLS=1): the certificates would be ignored and the "
                "connection would not be encrypted"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError(
                "KRONOS_REDIS_TLS_CERT_FILE and KRONOS_REDIS_TLS_KEY_FILE go together: set both or neither"
            )
        if sentinel != is_sentinel_url(self.result_backend):
            raise ValueError(
                "KRONOS_BROKER_URL and KRONOS_RESULT_BACKEND must both be sentinel:// URLs or both redis(s):// URLs"
            )
        if sentinel and self.sentinel_master is None:
            raise ValueError("KRONOS_SENTINEL_MASTER must name the master the sentinels monitor (sentinel:// URLs)")
        return self


def load_settings(environ: Mapping[str, str] | None = None) -> KronosSettings:
    """The shared settings from `environ` (default: this process's environment); SettingsError on a bad one."""
    return load(KronosSettings, environ)


@cache
def current_settings() -> KronosSettings:
    """This process's settings, read on first use and then kept, so that every module sees the same values."""
    return load_settings()


# --- Flower's (flowerconfig.py) ---------------------------------------------------------------------


class FlowerSettings(KronosBaseSettings):
    address: str = Field("127.0.0.1", alias="FLOWER_ADDRESS")
    port: WholeNumber = Field(5555, alias="FLOWER_PORT")
    basic_auth_file: ReadableFile | None = Field(None, alias="FLOWER_BASIC_AUTH_FILE")
    basic_auth: str | None = Field(None, alias="FLOWER_BASIC_AUTH", repr=False)
    unauthenticated: Flag = Field(False, alias="FLOWER_UNAUTHENTICATED")
    role: Annotated[Literal["monitor", "operator"], one_of("monitor", "operator")] = Field(
        "monitor", alias="FLOWER_ROLE"
    )
    db: str | None = Field(None, alias="FLOWER_DB")  # None: under $XDG_STATE_HOME
    state_save_interval: PositiveSeconds = Field(60.0, alias="FLOWER_STATE_SAVE_INTERVAL")

    @model_validator(mode="after")
    def _one_source_of_logins(self) -> Self:
        if self.basic_auth_file and self.basic_auth:
            raise ValueError("set KRONOS_FLOWER_BASIC_AUTH_FILE or KRONOS_FLOWER_BASIC_AUTH, not both")
        return self


# --- Redis URLs -------------------------------------------------------------------------------------


def is_sentinel_url(redis_url: str) -> bool:
    return urlsplit(redis_url).scheme == SENTINEL_SCHEME


def _each_url(redis_url: str, change: Callable[[str], str]) -> str:
    """`change` applied to each sentinel of a sentinel:// URL list, or to the one URL."""
    if not is_sentinel_url(redis_url):
        return change(redis_url)
    return SENTINEL_SEPARATOR.join(change(part) for part in redis_url.split(SENTINEL_SEPARATOR))


def _is_tls(redis_url: str) -> bool:
    return urlsplit(redis_url).scheme == "rediss"


def _with_password(redis_url: str, password: str) -> str:
    return _each_url(redis_url, lambda url: _one_with_password(url, password))


def _one_with_password(redis_url: str, password: str) -> str:
    parts = urlsplit(redis_url)
    if parts.password:
        raise ValueError("carries a password and KRONOS_REDIS_PASSWORD_FILE is set: keep one")
    # urlsplit leaves the user as written, percent-escapes included: unescape before quoting it again.
    user = quote(unquote(parts.username or "default"), safe="")
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host  # IPv6
    netloc = f"{user}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _with_db(redis_url: str, db: int) -> str:
    return _each_url(redis_url, lambda url: urlunsplit(urlsplit(url)._replace(path=f"/{db}")))
