"""Settings, read from the environment (PROTOCOL.md §6)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; environment names are given by ``alias``."""

    model_config = SettingsConfigDict(populate_by_name=True, extra="ignore")

    host: str = Field("0.0.0.0", alias="HOST")
    port: int = Field(8080, alias="PORT")
    database_url: str | None = Field(None, alias="DATABASE_URL")
    redis_url: str | None = Field(None, alias="REDIS_URL")
    openai_api_key: str | None = Field(None, alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(None, alias="OPENAI_BASE_URL")
    openai_model: str = Field("gpt-4o-mini", alias="OPENAI_MODEL")
    analyzer: Literal["auto", "openai", "offline"] = Field("auto", alias="SMARTSORT_ANALYZER")
    jwt_secret: str | None = Field(None, alias="SMARTSORT_JWT_SECRET")
    allowed_origins: str = Field("", alias="SMARTSORT_ALLOWED_ORIGINS")
    data_dir: Path = Field(Path(".smartsort"), alias="SMARTSORT_DATA_DIR")
    demo: bool = Field(False, alias="SMARTSORT_DEMO")
    # Bearer token for the operators' jobs view (/admin); unset: open in demo mode only.
    admin_token: str | None = Field(None, alias="SMARTSORT_ADMIN_TOKEN")
    log_level: str = Field("INFO", alias="LOG_LEVEL")
    log_format: Literal["text", "json"] = Field("text", alias="LOG_FORMAT")

    lease_s: float = Field(30.0, alias="SMARTSORT_LEASE_S", gt=0)
    max_attempts: int = Field(3, alias="SMARTSORT_MAX_ATTEMPTS", ge=1)
    shutdown_grace_s: float = Field(5.0, alias="SMARTSORT_SHUTDOWN_GRACE_S", ge=0)
    event_retention_s: float = Field(7 * 86400, alias="SMARTSORT_EVENT_RETENTION_S", ge=86400)
    heartbeat_s: float = Field(25.0, alias="SMARTSORT_HEARTBEAT_S", gt=0)
    presence_ttl_s: float = Field(30.0, alias="SMARTSORT_PRESENCE_TTL_S", gt=0)
    max_message_bytes: int = Field(65536, alias="SMARTSORT_MAX_MESSAGE_BYTES", ge=1024)
    messages_per_second: float = Field(20.0, alias="SMARTSORT_MESSAGES_PER_SECOND", gt=0)
    sorts_per_minute: int = Field(30, alias="SMARTSORT_SORTS_PER_MINUTE", ge=1)
    max_connections_per_user: int = Field(20, alias="SMARTSORT_MAX_CONNECTIONS_PER_USER", ge=1)
    idle_timeout_s: float = Field(120.0, alias="SMARTSORT_IDLE_TIMEOUT_S", gt=0)
    send_queue_max: int = Field(1024, alias="SMARTSORT_SEND_QUEUE_MAX", ge=8)
    send_timeout_s: float = Field(10.0, alias="SMARTSORT_SEND_TIMEOUT_S", gt=0)
    progress_interval_s: float = Field(0.1, alias="SMARTSORT_PROGRESS_INTERVAL_S", ge=0)
    analysis_batch_size: int = Field(25, alias="SMARTSORT_ANALYSIS_BATCH_SIZE", ge=1, le=200)
    analysis_concurrency: int = Field(4, alias="SMARTSORT_ANALYSIS_CONCURRENCY", ge=1, le=64)
    llm_timeout_s: float = Field(60.0, alias="SMARTSORT_LLM_TIMEOUT_S", gt=0)
    llm_max_retries: int = Field(6, alias="SMARTSORT_LLM_MAX_RETRIES", ge=0)
    llm_retry_budget_s: float = Field(120.0, alias="SMARTSORT_LLM_RETRY_BUDGET_S", gt=0)
    llm_backoff_s: float = Field(0.5, alias="SMARTSORT_LLM_BACKOFF_S", gt=0)
    metadata: Literal["stored", "musicbrainz"] = Field("stored", alias="SMARTSORT_METADATA")
    musicbrainz_url: str = Field("https://musicbrainz.org", alias="SMARTSORT_MUSICBRAINZ_URL")
    # Test hook: slows each analysis batch so tests can watch a job while it runs.
    step_delay_s: float = Field(0.0, alias="SMARTSORT_STEP_DELAY_S", ge=0)
    poll_interval_s: float = Field(2.0, alias="SMARTSORT_POLL_INTERVAL_S", gt=0)
    db_pool_size: int = Field(10, alias="SMARTSORT_DB_POOL_SIZE", ge=2, le=200)

    def origins(self) -> frozenset[str]:
        """The explicitly allowed browser origins."""
        return frozenset(o.strip() for o in self.allowed_origins.split(",") if o.strip())

    def secret(self) -> str:
        """The JWT secret: the environment's, else one created once under the data dir."""
        if self.jwt_secret:
            return self.jwt_secret
        path = self.data_dir / "jwt_secret"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: when several processes start at once exactly one writes the secret.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
        for _ in range(100):
            text = path.read_text().strip()
            if text:
                self.jwt_secret = text
                return text
            # Another process created the file and is about to write it.
            import time

            time.sleep(0.01)
        raise RuntimeError(f"JWT secret file {path} is empty")

    def use_openai(self) -> bool:
        """Whether the OpenAI analyser is selected."""
        if self.analyzer == "auto":
            return bool(self.openai_api_key)
        return self.analyzer == "openai"


from aiohttp import web  # noqa: E402

SETTINGS_KEY = web.AppKey("settings", Settings)
