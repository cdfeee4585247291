"""Service settings, read once from the environment (TARQ_ prefix).

Every default is the embedded mode: one machine, no Redis, no Docker. Celery runs over kombu's
filesystem transport in folders under the data dir, job records live in SQLite there, and
uploads/artifacts in a local folder there. Pointing TARQ_BROKER_URL at redis://, TARQ_DATABASE_URL
at postgresql+psycopg:// and TARQ_STORAGE_URL at s3:// gives the scaled-out deployment with no code
change. This module imports neither celery nor sqlalchemy: the worker and the API both read it.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tarq.config import (
    COMPRESSION_RATIO_THRESHOLD,
    LOGPROB_THRESHOLD,
    NO_SPEECH_THRESHOLD,
    ComputeDtype,
    CpuBf16,
)

QUEUES = ("quantize", "transcribe")
# what a key may do (TARQ_API_KEYS entry `<key>@<role>`): all (the default), or transcribe: the audio
# routes and reading the model list, for the applications that only send audio
KEY_ROLES = ("all", "transcribe")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tarq"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TARQ_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    broker_url: str = ""  # empty: the filesystem transport under data_dir/broker
    result_backend: str = ""  # empty: redis broker -> same redis; otherwise db+sqlite under data_dir
    database_url: str = ""  # empty: sqlite:///data_dir/tarq.sqlite
    storage_url: str = ""  # empty: data_dir/storage; or s3://bucket/prefix
    s3_endpoint_url: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    s3_region: str = ""
    # Comma-separated keys; an entry "sha256:<hex>" is an already-hashed key, so a deployment can keep
    # plaintext keys out of its environment altogether.
    api_keys: str = ""
    model_roots: str = ""  # comma-separated server folders a job may name as its model

    # upload limits
    max_files: int = 512
    max_file_bytes: int = 64 * 1024 * 1024
    max_total_bytes: int = 1024 * 1024 * 1024
    max_audio_seconds: float = 600.0
    max_archive_ratio: float = 200.0  # uncompressed/compressed, per member: zip bombs go far beyond this
    # one uploaded model folder (POST /v1/models), per file and in all: whisper-large-v3 is 3.1 GB in fp16
    max_model_bytes: int = 8 * 1024 * 1024 * 1024

    # submissions (POST /v1/quantizations) per API key and minute, token bucket; 0 turns the limit off
    rate_limit_per_minute: float = 30.0
    rate_limit_burst: int = 0  # bucket size; 0: one minute's worth
    # transcriptions and translations one API key may have waiting at once in each API process (429 past
    # it); 0: no cap
    max_transcriptions_per_key: int = Field(default=0, ge=0)

    # jobs
    heartbeat_seconds: float = 5.0
    stale_after_seconds: float = 120.0  # a running job whose heartbeat is older is presumed lost
    max_attempts: int = 3
    # a job whose worker could not reach the artifact store is queued again after this long, doubled at
    # each attempt (at most half of stale_after_seconds, so the reaper does not take the wait for a loss)
    storage_retry_seconds: float = Field(default=30.0, gt=0)
    # job callbacks (app.callbacks): tries per job, the wait before the second (doubled after each), the
    # timeout of one POST, and whether a callback may go to a private, loopback or link-local address
    # (off: a key holder could otherwise make the service call into its own network)
    callback_attempts: int = Field(default=5, ge=1)
    callback_retry_seconds: float = Field(default=10.0, gt=0)
    callback_timeout_seconds: float = Field(default=10.0, gt=0)
    callback_private_ok: bool = False
    quantize_time_limit: int = 6 * 3600
    transcribe_time_limit: int = 600
    transcribe_wait_seconds: float = 600.0
    # a transcription seen this long taken by no live worker (its message gone, never started; or started
    # and its beat, every heartbeat_seconds, stopped) is sent again: app.task_wait
    transcribe_lost_after_seconds: float = 20.0
    device: str = "auto"  # worker device: auto (cuda if present), cpu, cuda, cuda:1 ...
    # transcription compute dtype (tarq.transcribe.compute_dtype); auto: float16 on CUDA, bfloat16 on
    # CPUs where a bf16 matmul measures faster (tarq.qlinear.cpu_bf16_pays), float32 elsewhere. bf16 scored
    # the same WER as float32 at 1.8-2.7x the speed on an AMX Xeon (bench/results/dtype.md)
    dtype: ComputeDtype = "auto"
    # a transcription leaves out a window whose no-speech probability is above this and whose tokens average
    # a log-probability below logprob_threshold (tarq.config.NO_SPEECH_THRESHOLD: text made up on silence and
    # noise, bench/results/silence.md); 1 keeps every window
    no_speech_threshold: float = Field(default=NO_SPEECH_THRESHOLD, ge=0.0, le=1.0)
    logprob_threshold: float = LOGPROB_THRESHOLD
    # openai/whisper's temperature fallback (OpenAI's API at temperature 0, tarq.fallback): a window whose text
    # loops (zlib compression ratio above compression_ratio_threshold) or whose tokens average a log-probability
    # below logprob_threshold is decoded again this much hotter, up to 1.0; 0.2 is openai's. 0 (the default)
    # leaves it off: it made WER no better on real speech (tarq.config.TEMPERATURE_INCREMENT)
    temperature_increment_on_fallback: float = Field(default=0.0, ge=0.0, le=1.0)
    compression_ratio_threshold: float = Field(default=COMPRESSION_RATIO_THRESHOLD, gt=0.0)
    # whether int4 layers run their CPU dequantize-and-matmul path in bf16. tarq.qlinear reads
    # TARQ_CPU_BF16 itself (the library runs without the service); declared here so that serve and
    # worker refuse a bad value at start instead of failing the first job that reaches such a layer
    cpu_bf16: CpuBf16 = "auto"
    # Cap on the address space (RLIMIT_AS) each worker pool process may add once its libraries are
    # loaded: a task that needs more fails with "out of memory" and the process lives on. 0: no cap.
    # For CPU workers: CUDA reserves far more address space than it uses, so leave it 0 on GPU hosts.
    worker_memory_limit_mb: int = 0
    # CPU threads torch may use in each worker pool process. 0: the cores divided among the pool's
    # processes, so that two jobs at once do not each spin a thread per core (an OMP_NUM_THREADS set in
    # the environment is then left alone).
    torch_threads: int = Field(default=0, ge=0)
    model_cache_size: int = 2  # loaded models kept per worker process
    # comma-separated models (as a transcription's `model` names them) each worker process loads when it
    # starts, so that the first request for them does not wait for the load
    preload_models: str = ""
    default_model: str = ""  # what "whisper-1" (the OpenAI client's habit) maps to; empty: refused
    hub_offline: bool = False  # accept a Hub id only if it is already in the local HF cache

    @model_validator(mode="after")
    def _lost_after_spans_beats(self) -> Settings:
        if self.transcribe_lost_after_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(f"TARQ_TRANSCRIBE_LOST_AFTER_SECONDS ({self.transcribe_lost_after_seconds:g}) must be at "
                             f"least twice TARQ_HEARTBEAT_SECONDS ({self.heartbeat_seconds:g}): a running "
                             "transcription beats that often")
        return self

    @field_validator("api_keys", mode="after")
    @classmethod
    def _known_roles(cls, value: str) -> str:
        for entry in (e.strip() for e in value.split(",")):
            if "@" in entry and entry.rpartition("@")[2] not in KEY_ROLES:
                raise ValueError(f"TARQ_API_KEYS: role {entry.rpartition('@')[2]!r} is not one of "
                                 f"{', '.join(KEY_ROLES)} (an entry is <key> or <key>@<role>)")
            if entry.startswith("@") or entry.endswith("@"):
                raise ValueError("TARQ_API_KEYS: an entry is <key> or <key>@<role>, with neither part empty")
        return value

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    # derived ------------------------------------------------------------------------------------------
    @property
    def api_key_file(self) -> Path:
        return self.data_dir / "api_key"

    @property
    def broker(self) -> str:
        # the host is named: without one kombu warns on every connection that it falls back to localhost
        return self.broker_url or "filesystem://localhost//"

    @property
    def embedded_broker(self) -> bool:
        return self.broker.startswith("filesystem:")

    @property
    def redis_broker(self) -> bool:
        return self.broker.startswith(("redis://", "rediss://"))

    @property
    def backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.redis_broker:
            return self.broker
        return f"db+sqlite:///{self.data_dir / 'celery-results.sqlite'}"

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tarq.sqlite'}"

    @property
    def storage(self) -> str:
        return self.storage_url or str(self.data_dir / "storage")

    @property
    def storage_options(self) -> dict:
        if not self.storage.startswith("s3://"):
            return {}
        options: dict = {}
        if self.s3_access_key_id:
            options["key"] = self.s3_access_key_id
            options["secret"] = self.s3_secret_access_key
        client: dict = {}
        if self.s3_endpoint_url:
            client["endpoint_url"] = self.s3_endpoint_url
        if self.s3_region:
            client["region_name"] = self.s3_region
        if client:
            options["client_kwargs"] = client
        return options

    @property
    def preload(self) -> list[str]:
        return [m.strip() for m in self.preload_models.split(",") if m.strip()]

    @property
    def roots(self) -> list[Path]:
        return [Path(p.strip()).expanduser().resolve() for p in self.model_roots.split(",") if p.strip()]

    def key_hashes(self) -> frozenset[str]:
        """sha256 of every accepted key: TARQ_API_KEYS if set, else the key `tarq serve` generated."""
        return frozenset(self.key_roles())

    def key_roles(self) -> dict[str, str]:
        """sha256 of every accepted key -> its role: `all`, or what an entry's `@role` suffix says."""
        entries = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        if not entries and self.api_key_file.is_file():
            entries = [self.api_key_file.read_text().strip()]
        roles = {}
        for entry in entries:
            key, _, role = entry.rpartition("@") if "@" in entry else (entry, "", "all")
            roles[key[7:].lower() if key.startswith("sha256:") else hash_key(key)] = role
        return roles

    def celery_config(self) -> dict:
        """The Celery settings the API (sender) and the worker (consumer) must agree on."""
        config: dict = {
            "broker_url": self.broker,
            "result_backend": self.backend,
            "task_serializer": "json",
            "result_serializer": "json",
            "accept_content": ["json"],
            "task_default_queue": "quantize",
            "task_routes": {"tarq.quantize": {"queue": "quantize"}, "tarq.transcribe": {"queue": "transcribe"}},
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "task_track_started": True,
            "worker_prefetch_multiplier": 1,
            "result_expires": 3600,
            "broker_connection_retry_on_startup": True,
        }
        if self.embedded_broker:
            folder = self.data_dir / "broker"
            config["broker_transport_options"] = {
                # one folder both ways: the API writes where the worker reads
                "data_folder_in": str(folder / "queue"),
                "data_folder_out": str(folder / "queue"),
                "control_folder": str(folder / "control"),
                "processed_folder": str(folder / "processed"),
                "store_processed": False,
                # an idle worker looks for messages this often (kombu's default, 1 s, was on average half a
                # second of every transcription's latency: bench/preload.py); listing a folder is cheap
                "polling_interval": 0.1,
            }
            config["database_engine_options"] = {"connect_args": {"timeout": 30}}
        elif self.redis_broker:
            # A quantization can run for hours: the message must not be redelivered to a second worker
            # while the first still works on it (the job's heartbeat catches real loss sooner).
            config["broker_transport_options"] = {"visibility_timeout": self.quantize_time_limit + 600,
                                                  "socket_connect_timeout": 5}
            # a Redis outage must answer the client in seconds, not after minutes of reconnecting
            config["result_backend_transport_options"] = {"retry_policy": {"timeout": 5.0}}
            config["redis_socket_connect_timeout"] = 5
        return config

    def ensure_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.embedded_broker:
            for name in ("queue", "control", "processed"):
                (self.data_dir / "broker" / name).mkdir(parents=True, exist_ok=True)
        if not self.storage.startswith("s3://") and "://" not in self.storage:
            Path(self.storage).mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
