"""Request and response models of the HTTP API (OpenAI-compatible where OpenAI defines the shape)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 1024


class RouterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str | None = Field(default=None, description="Policy that routes this request (default: active).")
    max_cost_usd: float | None = Field(default=None, ge=0, description="Per-request cost cap in USD (every call of a mode counts).")
    mode: Literal["route", "cascade", "parallel", "fuse", "refine", "s2p"] | None = Field(
        default=None, description="Answer-aware mode (default: the config's modes.default)."
    )
    judge: Literal["scorer", "verify"] | None = Field(
        default=None, description="What scores a cascade's answers (default: the config's modes.cascade_judge)."
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return " ".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return ""


class ChatCompletionRequest(BaseModel):
    """OpenAI chat request; fields the router does not use (temperature, tools, ...) pass through."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(default="auto", description='"auto" routes; a backend name pins that backend.')
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    router: RouterOptions | None = None

    @field_validator("messages")
    @classmethod
    def _needs_text(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text().strip() for m in messages):
            raise ValueError("messages: at least one message needs text content")
        if any("\x00" in m.text() for m in messages):
            raise ValueError("messages: text must not contain NUL characters")
        return messages

    def query_text(self) -> str:
        """What the router embeds: the last user turn (the question being asked), else all text."""
        for message in reversed(self.messages):
            if message.role == "user" and message.text().strip():
                return message.text()
        return "\n".join(m.text() for m in self.messages if m.text())

    def prompt_text(self) -> str:
        return "\n".join(m.text() for m in self.messages)

    def output_token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CallInfo(BaseModel):
    """One backend call of an answer-aware mode."""

    role: str = Field(description="answer | candidate | verify | draft | refine | fuse")
    backend: str
    status: str
    delivered: bool
    score: float | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None


class RouterInfo(BaseModel):
    """The response's `router` object: the decision as the client sees it."""

    decision_id: str
    backend: str = Field(description="The backend that answered (or, on /v1/route, the one chosen).")
    chosen_backend: str = Field(description="The policy's choice; differs from `backend` after a failover.")
    policy: str
    propensity: float = Field(description="The policy's probability of `chosen_backend`.")
    cost_usd: float | None = None
    predicted_cost_usd: float
    max_cost_usd: float | None = None
    over_budget: bool = Field(description="No backend fitted the cap; the cheapest was chosen.")
    failed_backends: list[str] = Field(default_factory=list)
    scores: dict[str, float] = Field(default_factory=dict)
    mode: str = "route"
    calls: list[CallInfo] = Field(default_factory=list, description="Every call of an answer-aware mode (empty for route).")


class RouteResponse(BaseModel):
    router: RouterInfo


class RewardRequest(BaseModel):
    """A scalar reward in [0, 1], or a pairwise preference between two backends, for one decision."""

    model_config = ConfigDict(extra="forbid")

    decision_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    reward: float | None = Field(default=None, ge=0.0, le=1.0)
    winner: str | None = Field(default=None, min_length=1, max_length=64)
    loser: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_kind(self) -> RewardRequest:
        pairwise = self.winner is not None or self.loser is not None
        if self.reward is None and not pairwise:
            raise ValueError("give either reward, or winner and loser")
        if self.reward is not None and pairwise:
            raise ValueError("give either reward, or winner and loser, not both")
        if pairwise and (self.winner is None or self.loser is None):
            raise ValueError("a preference needs both winner and loser")
        if pairwise and self.winner == self.loser:
            raise ValueError("winner and loser must differ")
        return self


class RewardResponse(BaseModel):
    decision_id: str
    kind: Literal["reward", "preference"]
    duplicate: bool = Field(description="This feedback was already recorded; nothing changed.")


class ErrorBody(BaseModel):
    """OpenAI's error object: `type` is the kind of error, `code` a string naming the case."""

    message: str
    type: str
    code: str | None = None


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`, in OpenAI's shape."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llm-router"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorResponse(BaseModel):
    error: ErrorBody


class ActivePolicyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str = Field(min_length=1, max_length=64)


class ActivePolicyResponse(BaseModel):
    active_policy: str


class DashboardPolicySeries(BaseModel):
    """One policy over time, one value per bucket (null until there is something to estimate from)."""

    rewards: list[int] = Field(description="Rewards of the policy's own decisions so far in the window.")
    mean_reward: list[float | None] = Field(description="Running mean reward of the policy's own decisions.")
    ips: list[float | None] = Field(description="Running off-policy estimate (IPS) over every rewarded decision.")
    snips: list[float | None] = Field(description="Running self-normalised estimate (SNIPS).")


class DashboardKeyBurnDown(BaseModel):
    max_spend_usd: float
    period: str
    remaining_usd: list[float | None] = Field(description="Budget left at each bucket's end (null before the current period began).")


class DashboardSpend(BaseModel):
    spent_usd: list[float] = Field(description="Cumulative spend from the window's start.")
    allowance_usd: list[float] | None = Field(description="What the pacing target allows over the same time (null: no target).")
    keys: dict[str, DashboardKeyBurnDown] = Field(description="Each budgeted key's budget burning down.")


class DashboardDecision(BaseModel):
    decision_id: str
    created_at: datetime
    kind: str
    tenant: str | None = Field(description="The key that made it (null: open mode); only that key may give feedback on it.")
    query: str = Field(description="The query, cut short.")
    policy: str
    backend: str
    status: str
    mode: str
    cost_usd: float | None
    predicted_cost_usd: float | None
    latency_ms: float | None
    over_budget: bool
    error: str | None
    reward: float | None
    preference: tuple[str, str] | None = Field(description="(winner, loser), when the feedback was a preference.")


class DashboardResponse(BaseModel):
    """`GET /v1/dashboard`: the dashboard's series (bucket ends in `t`, unix seconds) and the newest decisions."""

    caller: str | None = Field(description="The key that asked (null: open mode).")
    active_policy: str
    start: float
    end: float
    bucket_s: float
    t: list[float]
    policies: dict[str, DashboardPolicySeries]
    spend: DashboardSpend
    decisions: list[DashboardDecision]
