"""Settings from the environment (prefix ``EPICRISIS_``), one object for the whole process."""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from epicrisis.errors import ConfigurationError


class Limits(BaseSettings):
    """Bounds on what one request may carry; each is stated in the README."""

    model_config = SettingsConfigDict(env_prefix="EPICRISIS_LIMIT_", frozen=True)

    max_bundle_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_entries: int = Field(100_000, gt=0)
    # orjson refuses JSON nested deeper than 1024 levels anywhere in the document; inside an
    # entry that the summary reads we allow far less, since no FHIR resource needs it.
    max_resource_depth: int = Field(64, gt=2)


class Settings(BaseSettings):
    """Process-wide settings. Secrets (serving) join this class when serving needs them."""

    model_config = SettingsConfigDict(
        env_prefix="EPICRISIS_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    limits: Limits = Field(default_factory=Limits)
    tokenizer_path: Path | None = None
    grpc_host: str = "127.0.0.1"  # 0.0.0.0 in a container; loopback by default
    grpc_port: int = Field(50051, ge=0, le=65535)
    embedded_concurrency: int = Field(2, gt=0)  # jobs run at once by the embedded worker
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    max_input_tokens: int = Field(8192 - 1536, gt=256)


@functools.cache
def get_settings() -> Settings:
    """The process settings, read once; a malformed ``EPICRISIS_*`` value is a deployment error.

    Tests that change the environment call ``get_settings.cache_clear()``.
    """
    try:
        return Settings()
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        # Name the settings only: their values may be secrets.
        raise ConfigurationError(f"invalid EPICRISIS_ setting(s): {', '.join(fields)}") from None
