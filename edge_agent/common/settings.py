"""Settings loading that the agent and the hub share: one way to read, layer and reject config.

Each program declares its own typed settings (``edge_agent.config``, ``hub.config``); how they
are built is the same for both and lives here. Sources, highest priority first: keyword
overrides, the environment (a per-program prefix, nested keys joined by ``__``), the YAML (or
JSON, a subset of YAML) file, field defaults. Unknown keys are rejected everywhere, so a typo
never silently runs with a default. Every problem is reported at once, each as (field path,
message, offending value), and a program exits 2 on them. Secrets (passwords, tokens) are read
from files named in the config, never written in it, by ``read_secret``, which refuses a file
that other users can read (``check_secret_file``): a token in a world-readable file is a token
every account on the box holds.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import structlog
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

log = structlog.get_logger(__name__)

#: One config problem: (field path, message, offending value).
FieldError = tuple[str, str, Any]
#: What happens to a secret file other users can read: refused (an error naming the file and
#: the fix), or read with a warning.
SecretFilePolicy = Literal["refuse", "warn"]


class ConfigError(Exception):
    """A config that cannot be used. ``errors`` holds (field path, message, offending value).

    Each program's own ``ConfigError`` derives from this and from its error base, so the CLI
    scaffold prints one line per field and exits 2.
    """

    exit_code = 2

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(describe(e) for e in errors))


def describe(error: FieldError) -> str:
    """``field: message (got value)``, the one way a config error is shown."""
    path, msg, value = error
    return f"{path}: {msg} (got {value!r})"


class Section(BaseModel):
    """A settings section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class LogSettings(Section):
    """How the program logs: the least level written, and JSON lines or console lines."""

    #: Minimum level of log lines. Default info: one line per event or burst, never per frame.
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: JSON lines (true), console (false), or by TTY (null, default).
    json_lines: bool | None = None


class ProgramSettings(BaseSettings):
    """Base of a program's top-level settings; a subclass sets ``env_prefix`` and adds its
    sections to the one every program has, ``log``.

    The file's content is passed in as init keyword arguments by ``load``, so the environment
    must outrank them: the environment source comes first, then init; no dotenv, no secrets
    folder (secrets are files named in the config).
    """

    model_config = SettingsConfigDict(
        env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    log: LogSettings = LogSettings()
    #: A secret file (token, password, private key) that other users can read: ``refuse`` to
    #: start, naming the file and the fix (default), or ``warn`` and read it anyway. Readable
    #: by others is always too much; readable by a group only when the file belongs to root
    #: and the group is one this process runs in (a Kubernetes Secret mounted with
    #: ``defaultMode: 0440`` and the pod's ``fsGroup``), see docs/security.md.
    secret_files: SecretFilePolicy = "refuse"  # noqa: S105 - a policy, not a secret

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)


_S = TypeVar("_S", bound=BaseSettings)


def read_file(path: Path | str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) config file; ``error`` for an unreadable or bad file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise error([("(file)", f"cannot read config: {exc.strerror}", str(p))]) from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error([("(file)", f"not valid YAML: {exc}", str(p))]) from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise error([("(root)", "config must be a mapping", type(loaded).__name__)])
    return loaded


def field_errors(exc: ValidationError, prefix: str = "") -> list[FieldError]:
    """pydantic's errors as (field path, message, value); ``prefix`` names the section."""
    out: list[FieldError] = []
    for err in exc.errors():
        path = ".".join([*([prefix] if prefix else []), *(str(p) for p in err["loc"])])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        out.append((path or "(root)", msg, redact(err.get("input"))))
    return out


def redact(value: Any) -> Any:
    """``value`` fit to print in an error: a URL's password (``user:PASSWORD@``, or a
    ``password=`` query parameter) becomes ``***``; anything else is returned as it is."""
    if not isinstance(value, str) or "://" not in value:
        return value
    parts = urlsplit(value)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def load(
    cls: type[_S],
    path: Path | str | None,
    overrides: dict[str, Any],
    error: type[ConfigError] = ConfigError,
) -> _S:
    """Build ``cls`` from an optional file, the environment and ``overrides``.

    Raises ``error`` listing every problem as (field path, message, value).
    """
    data = read_file(path, error) if path is not None else {}
    data.update(overrides)
    try:
        return cls(**data)
    except ValidationError as exc:
        raise error(field_errors(exc)) from exc
    except ValueError as exc:  # a model-level check outside pydantic's error list
        raise error([("(root)", str(exc), None)]) from exc


def override(section: BaseModel, prefix: str, values: dict[str, Any],
             error: type[ConfigError] = ConfigError) -> Any:
    """``section`` with ``values`` applied and validated; ``error`` names ``prefix.field``."""
    try:
        return type(section).model_validate({**section.model_dump(), **values})
    except ValidationError as exc:
        raise error(field_errors(exc, prefix)) from exc


def secret_file_problem(path: Path | str) -> str | None:
    """Why other users could read the file at ``path`` (None: only this process's user can).

    Refused: any permission for others; any permission for a group, unless the file belongs
    to root and the group is one this process is in (how Kubernetes mounts a Secret for a
    non-root pod: ``root:<fsGroup>``, mode 0440). Blocking; ``OSError`` when it cannot be
    examined.
    """
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return f"readable by other users (mode {mode:04o})"
    if mode & 0o070:
        ours = {os.getegid(), *os.getgroups()}
        if st.st_uid != 0 or st.st_gid not in ours or os.geteuid() == 0:
            return f"readable by its group (mode {mode:04o}, group id {st.st_gid})"
    return None


def check_secret_file(path: Path | str, policy: SecretFilePolicy = "refuse") -> None:
    """Refuse (``PermissionError``, with the fix in its message) or warn about a secret file
    that other users can read; see ``secret_file_problem``. Blocking."""
    problem = secret_file_problem(path)
    if problem is None:
        return
    if policy == "warn":
        log.warning("secret_file_exposed", path=str(path), problem=problem,
                    fix="chmod 600 (or 0440 root:<your group>)")
        return
    raise PermissionError(
        errno.EACCES,
        f"secret file is {problem}: chmod 600 it (or give it to root:<this process's group> "
        "mode 0440), or set secret_files: warn",
        str(path),
    )


def read_secret(path: Path | str, policy: SecretFilePolicy = "refuse") -> str:
    """The secret held in a file (a mounted Secret): its text without trailing line breaks.

    Blocking; raises ``OSError`` for the caller to turn into its own error naming the field:
    also (``PermissionError``) for a file other users can read, unless ``policy`` is
    ``warn`` (``check_secret_file``). Only line breaks are stripped: a password may end in a
    space, and a file written by ``echo`` or an editor ends in a newline that is no part of it.
    """
    check_secret_file(path, policy)
    return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
