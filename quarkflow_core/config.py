"""The one typed settings object. Every ``QF_*`` variable is read here and nowhere else."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from quarkflow_core.errors import ConfigError

DB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2")
STORAGE_SCHEMES = ("file", "gs")
DEV_SECRET = "dev-insecure-secret-change-me"  # noqa: S105 - laptop default; set QF_SECRET_KEY


class Settings(BaseSettings):
    """Quarkflow settings. Each field ``x`` is read from ``QF_X`` (or a ``.env`` file)."""

    model_config = SettingsConfigDict(
        env_prefix="QF_", env_file=".env", extra="ignore", validate_default=True
    )

    data_dir: Path = Field(Path(".quarkflow"), description="Local state: outbox, caches.")
    database_url: str = Field(
        "sqlite:///.quarkflow/quarkflow.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql://user:pw@host/db",
    )
    migration_database_url: str | None = Field(
        None,
        description="URL of the role that owns the tables, for `quarkflow db ...` and "
        "`quarkflow init` (migrations, grants); unset = QF_DATABASE_URL.",
    )
    database_app_role: str | None = Field(
        None,
        description="Postgres role the API and workers connect as (not the table owner); "
        "`quarkflow db upgrade` / `init` grant it its privileges after migrating.",
    )
    storage_url: str = Field(
        "file://.quarkflow/store", description="file://folder or gs://bucket/prefix"
    )
    storage_emulator_host: str | None = Field(
        None,
        validation_alias=AliasChoices("QF_STORAGE_EMULATOR_HOST", "STORAGE_EMULATOR_HOST"),
        description="fake-gcs-server address; google-cloud-storage reads the same variable.",
    )
    gcs_project: str = Field("quarkflow", description="GCP project used by the GCS client.")

    labelstudio_url: str = Field("http://127.0.0.1:8080", description="Label Studio base URL.")
    labelstudio_token: SecretStr | None = Field(None, description="Label Studio API token.")
    labelstudio_project: str = Field("Quarkflow review", description="Label Studio project title.")
    labelstudio_sync_s: int = Field(300, ge=10, description="Periodic Label Studio sync.")
    public_api_url: str | None = Field(
        None, description="Address of this API as Label Studio's users reach it (image links)."
    )
    prefect_api_url: str | None = Field(None, description="Prefect server; unset = ephemeral.")

    review_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Calibrated confidence below which predictions go to review, for every "
        "model; unset = each served model's own calibrated threshold (else 0.8).",
    )
    review_strategy: Literal["uncertainty", "diverse"] = Field(
        "diverse",
        description="Order of the review queue's next items: 'uncertainty' = the champion's "
        "most uncertain first; 'diverse' = from the most uncertain, class-balanced and spread "
        "out (k-center on the model's output distribution). See quarkflow_core.queue.",
    )
    review_rescore: bool = Field(
        True,
        description="Re-score the open review items with each new champion the API loads "
        "(new priorities; items it is sure of close themselves).",
    )
    secret_key: SecretStr = Field(
        SecretStr(DEV_SECRET), description="Key for hashing API tokens (HMAC pepper)."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    user: str | None = Field(None, description="Who the CLI acts as (or pass --user).")

    serving_backend: str = Field(
        "auto",
        description="auto (the GPU when CUDA is usable, else ONNX Runtime when exported, else "
        "eager) | eager | onnxruntime | cuda (eager fp16 on the GPU; where it cannot run, the "
        "CPU, with the reason on /readyz)",
    )
    serving_max_batch: int = Field(32, ge=1, le=1024, description="Micro-batch size limit.")
    serving_max_wait_ms: float = Field(
        1.0, ge=0.0, le=1000.0, description="Longest wait for a micro-batch to fill."
    )
    serving_adaptive_wait_ms: float = Field(
        50.0,
        ge=0.0,
        le=1000.0,
        description="Adaptive micro-batching: a batch waits only for requests already being "
        "decoded, at most this long (and at most half the model's time per batch); 0 = the "
        "fixed QF_SERVING_MAX_WAIT_MS instead.",
    )
    model_poll_s: float = Field(2.0, gt=0.0, description="How often serving checks the champion.")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest accepted image.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest accepted width x height.")
    max_batch_files: int = Field(32, ge=1, description="Images per batch request.")
    max_request_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Pixels (width x height, summed over the images) one prediction request "
        "may carry, read from the headers before anything is decoded (413 too_many_pixels).",
    )
    max_decoding_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Pixels this process decodes at once, over all requests; decoding costs "
        "at most ~9 bytes a pixel (RGBA), so the default bounds it near 450 MB. An image "
        "waits for room (first come, first served), then 503 busy; one larger than this "
        "decodes alone.",
    )
    decode_wait_s: float = Field(
        10.0, gt=0.0, description="Longest wait for decoding room before a 503 busy."
    )
    max_json_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest request body of the JSON routes under /api (upload routes allow "
        "their files: QF_MAX_UPLOAD_BYTES each, QF_MAX_BATCH_FILES in a batch).",
    )
    anonymous_demo: bool | None = Field(
        None,
        description="Allow unauthenticated predictions and feedback; unset = only when the "
        "server is bound to localhost.",
    )
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol's gRPC service, run by the API "
        "server next to its REST routes, on the same address (8001, Triton's; 0 = off).",
    )
    api_url: str | None = Field(
        "http://127.0.0.1:8000", description="The serving API (the promote flow waits on it)."
    )
    retrain_cron: str = Field("0 3 * * 1", description="Cron of the retrain schedule.")
    retrain_schedule_enabled: bool = Field(False, description="Whether that schedule runs.")
    retrain_min_new_labels: int = Field(
        200, ge=0, description="Start retrain after this many new labels (0 = never)."
    )
    retrain_min_per_class: int | None = Field(
        None, ge=1, description="...and at least this many in every class that got labels."
    )
    label_trigger_s: int = Field(300, ge=10, description="How often the label trigger checks.")
    holdout_share: float = Field(
        0.2,
        gt=0.0,
        le=0.5,
        description="Share of newly settled labels (per class) that joins the hold-out.",
    )

    policy_noninferiority_margin: float = Field(
        0.005, ge=0.0, le=1.0, description="Promotion: allowed accuracy loss (CI lower bound)."
    )
    policy_max_class_recall_drop: float = Field(
        0.03, ge=0.0, le=1.0, description="Promotion: largest allowed drop in any class recall."
    )
    policy_max_ece_increase: float = Field(
        0.02, ge=0.0, le=1.0, description="Promotion: largest allowed calibration (ECE) increase."
    )

    @field_validator("database_url", "migration_database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:  # QF_MIGRATION_DATABASE_URL unset: QF_DATABASE_URL is used
            return None
        scheme = urlsplit(value).scheme
        if scheme not in DB_SCHEMES:
            raise ValueError(
                f"unknown scheme {scheme!r} in {value!r}; use one of: "
                + ", ".join(f"{s}://" for s in DB_SCHEMES)
            )
        if scheme == "postgresql":
            # psycopg2 is the driver we pin; say so explicitly for SQLAlchemy.
            value = "postgresql+psycopg2" + value[len("postgresql") :]
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in STORAGE_SCHEMES:
            raise ValueError(
                f"unknown scheme {parts.scheme!r} in {value!r}; use file://folder or "
                "gs://bucket/prefix"
            )
        if parts.scheme == "gs" and not parts.netloc:
            raise ValueError(f"{value!r} names no bucket; use gs://bucket/prefix")
        if parts.scheme == "file" and not (parts.netloc + parts.path):
            raise ValueError(f"{value!r} names no folder; use file://folder")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"{value!r} is not a logging level")
        return value

    @field_validator("serving_backend")
    @classmethod
    def _check_backend(cls, value: str) -> str:
        if value not in {"auto", "eager", "onnxruntime", "cuda"}:
            raise ValueError(f"{value!r}: use auto, eager, onnxruntime or cuda")
        return value

    @property
    def database_backend(self) -> str:
        """'sqlite' or 'postgresql'."""
        return "sqlite" if self.database_url.startswith("sqlite") else "postgresql"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"


def _env_name(loc: tuple) -> str:
    field = str(loc[0]) if loc else "?"
    if field.startswith(("QF_", "STORAGE_")):
        return field
    return "QF_" + field.upper()


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning validation errors into one ConfigError line per variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{_env_name(err['loc'])}: {msg}")
        raise ConfigError("; ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings. Tests call ``get_settings.cache_clear()`` to override."""
    return load_settings()


def child_environment(**overrides: str) -> dict[str, str]:
    """The environment for a process Quarkflow starts (`quarkflow demo`'s services): this
    process's environment, so they read the same settings, plus ``overrides``."""
    return {**os.environ, **overrides}
