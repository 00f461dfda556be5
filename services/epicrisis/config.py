"""Settings from the environment (prefix ``EPICRISIS_``), one object for the whole process."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from epicrisis.errors import ConfigurationError


class Limits(BaseSettings):
    """Bounds on what one request may carry; each is stated in the README."""

    model_config = SettingsConfigDict(env_prefix="EPICRISIS_LIMIT_", frozen=True)

    max_bundle_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_entries: int = Field(100_000, gt=0)
    # The parsers (simdjson, orjson) refuse JSON nested deeper than 1024 levels anywhere; inside an
    # entry that the summary reads we allow far less, since no FHIR resource needs it.
    max_resource_depth: int = Field(64, gt=2)
    # The gRPC request beside the Bundle (serving/requests.py): bounded, so no field of a
    # request can carry megabytes into job records, Redis keys or logs.
    max_encounter_id_chars: int = Field(1024, gt=0)  # an id, Encounter/id or a fullUrl
    max_idempotency_key_chars: int = Field(256, gt=0)  # visible ASCII
    max_job_id_chars: int = Field(128, gt=0)  # server ids are 32 hex digits
    max_output_tokens: int = Field(4096, gt=0)  # SummaryOptions.max_output_tokens


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
    # Processes that validate Bundles for a server (0: a thread of the server's own process);
    # None: one per usable CPU but one, at most 4 (serving.ingest.default_processes).
    ingest_processes: int | None = Field(None, ge=0, le=64)
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    max_queued_jobs: int = Field(1000, gt=0)  # waiting per priority; past it RESOURCE_EXHAUSTED
    max_input_tokens: int = Field(8192 - 2048, gt=256)

    # -- who may call, and over what: TLS (mutual with a client CA), API keys --------------
    grpc_tls_cert_file: Path | None = None  # PEM certificate chain of the server
    grpc_tls_key_file: Path | None = None  # its PEM private key
    grpc_tls_client_ca_file: Path | None = None  # set: clients must present a cert it signed
    grpc_allow_plaintext: bool = False  # serve without TLS: local use only, never by default
    health_port: int | None = Field(None, ge=0, le=65535)  # grpc.health.v1 alone, plaintext
    api_keys_file: Path | None = None  # "caller sha256:<hex> [scope,...]" per line
    allow_anonymous: bool = False  # no API keys: every caller is "anonymous" (local use only)
    audit_key: SecretStr | None = None  # keys the patient hash of audit events (default: derived)

    # -- the queued mode: Redis (Celery broker and job store), jobs encrypted at rest -----
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "epicrisis"
    job_ttl_seconds: float = Field(24 * 3600, gt=0)  # every job key, payload and result
    job_timeout_seconds: float = Field(600, gt=0)  # one job's pipeline, LLM retries included
    job_max_retries: int = Field(5, ge=0)  # task retries after a retryable backend error
    job_retry_backoff_max_seconds: int = Field(120, gt=0)  # cap of the exponential backoff
    encryption_key: SecretStr | None = None  # base64 of 32 random bytes, or id:key,id:key
    encryption_key_file: Path | None = None  # a mounted secret holding the same text
    worker_heartbeat_seconds: float = Field(5.0, gt=0)  # workers report to the server's health
    # a worker with a free slot that takes no waiting job for this long restarts (serving.stall)
    worker_stall_seconds: float = Field(60.0, gt=0)

    # -- operations: metrics, logs (traces follow the standard OTEL_* environment) ----------
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container, for Prometheus to scrape
    metrics_port: int | None = Field(None, ge=0, le=65535)  # None: 9464 serve, 9465 worker
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: json unless on a terminal
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # -- the LLM backend: TGI, or any OpenAI-compatible server (vLLM, SGLang) ------------
    # EPICRISIS_LLM_URLS=http://tgi-0:8080,http://tgi-1:8080 (comma-separated, not JSON)
    llm_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    llm_api_key: SecretStr | None = None  # bearer token, for servers started with --api-key
    llm_timeout_seconds: float = Field(180.0, gt=0)  # one generation, sent to answered
    llm_connect_timeout_seconds: float = Field(5.0, gt=0)
    llm_max_output_tokens: int = Field(2048, gt=0)  # prompt.budget.OUTPUT_RESERVE_TOKENS
    llm_temperature: float = Field(0.2, gt=0, le=2)  # Med42's card samples at 0.4
    llm_top_p: float = Field(0.75, gt=0, lt=1)  # TGI refuses 1.0 (422)
    llm_seed: int | None = Field(None, ge=0)  # fixed sampling seed (a retry uses seed + 1)
    llm_max_in_flight: int | None = Field(None, gt=0)  # per endpoint; default: /info's limit
    llm_context_tokens: int = Field(8192, gt=256)  # for servers that do not report it
    llm_max_attempts: int = Field(6, gt=0)  # requests per summary, retries included
    llm_retry_seconds: float = Field(300.0, gt=0)  # bound on one summary, retries included

    @field_validator("llm_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        """A comma-separated string (the environment's form) or a list, as http(s) base URLs."""
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list | tuple):
            return value
        urls = [str(item).strip().rstrip("/") for item in value if str(item).strip()]
        if any(not url.startswith(("http://", "https://")) for url in urls):
            raise ValueError("every LLM URL must start with http:// or https://")
        return urls


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
