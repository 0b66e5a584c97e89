"""The encoder (any `AutoModel` directory, mean-pooled, with a small head) and the two predictors.

The head's last layer starts with zero weights and its bias at the training means, so an untrained
model is exactly the constant baseline and training starts from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from router.embedding import packaged_minilm_path

Kind = Literal["forc", "hybrid", "scorer"]
KINDS: tuple[Kind, ...] = ("forc", "hybrid", "scorer")  # the encoder predictors; every kind: router.config.PREDICTOR_KINDS
WEIGHTS_FILE = "weights.safetensors"  # backbone and head together
PREDICTOR_FILE = "predictor.json"
ENCODER_DIR = "encoder"  # the backbone's config and the tokenizer


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Network(torch.nn.Module):
    """Backbone, mean pooling over the real tokens, then a two-layer head."""

    def __init__(self, backbone: torch.nn.Module, outputs: int) -> None:
        super().__init__()
        hidden = int(backbone.config.hidden_size)
        self.backbone = backbone
        self.head = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(hidden, outputs)
        )
        torch.nn.init.zeros_(self.head[-1].weight)

    @property
    def outputs(self) -> int:
        return self.head[-1].out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # token_type_ids are not passed: DistilBERT takes none and DeBERTa-v2 may have no such embedding
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


class TextModel:
    """Tokenizer and network, as both predictors use them."""

    def __init__(self, network: Network, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_backbone(cls, directory: str, outputs: int, max_length: int) -> TextModel:
        network = Network(AutoModel.from_pretrained(directory), outputs)
        return cls(network, AutoTokenizer.from_pretrained(directory), max_length)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def collate(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids padded to the longest row, and the attention mask."""
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = 1
        return ids, mask

    @torch.no_grad()
    def outputs(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Head outputs in eval mode, batched by token length (a batch is padded to its longest text)."""
        self.network.eval()
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda index: len(ids[index]))
        result = torch.zeros((len(ids), self.network.outputs))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            result[chunk] = self.network(*self.collate([ids[index] for index in chunk]))
        return result

    def save(self, directory: Path) -> None:
        self.network.backbone.config.save_pretrained(directory / ENCODER_DIR)
        self.tokenizer.save_pretrained(directory / ENCODER_DIR)
        save_model(self.network, str(directory / WEIGHTS_FILE))

    @classmethod
    def load(cls, directory: Path, outputs: int, max_length: int) -> TextModel:
        network = Network(AutoModel.from_config(AutoConfig.from_pretrained(directory / ENCODER_DIR)), outputs)
        load_model(network, str(directory / WEIGHTS_FILE), strict=True)
        return cls(network.eval(), AutoTokenizer.from_pretrained(directory / ENCODER_DIR), max_length)


class Prediction(NamedTuple):
    """FORC's estimate for one backend on one prompt."""

    quality: float
    output_tokens: float | None  # exp(predicted log1p tokens) - 1, a median-like estimate; None: never observed


class ForcConfig(StrictModel):
    kind: Literal["forc"] = "forc"
    max_length: int
    backends: list[str] = Field(min_length=1)
    lengths_seen: list[bool]  # per backend: whether training saw any output length of it


class HybridConfig(StrictModel):
    kind: Literal["hybrid"] = "hybrid"
    max_length: int
    small: str
    large: str
    tolerance: float
    threshold: float
    large_share: float = Field(ge=0, le=1)


class ForcPredictor:
    """FORC: per backend, the quality and the output length of a prompt."""

    kind: Kind = "forc"

    def __init__(self, model: TextModel, backends: list[str], lengths_seen: list[bool]) -> None:
        self.model = model
        self.backends = backends
        self.lengths_seen = lengths_seen

    def predict(self, texts: Sequence[str]) -> list[dict[str, Prediction]]:
        """Per text: backend -> (quality, output tokens)."""
        outputs = self.model.outputs(texts)
        count = len(self.backends)
        quality = torch.sigmoid(outputs[:, :count]).tolist()
        tokens = torch.expm1(outputs[:, count:]).clamp(min=0).tolist()
        return [
            {
                backend: Prediction(quality[row][column], tokens[row][column] if self.lengths_seen[column] else None)
                for column, backend in enumerate(self.backends)
            }
            for row in range(len(quality))
        ]

    @property
    def config(self) -> ForcConfig:
        return ForcConfig(max_length=self.model.max_length, backends=self.backends, lengths_seen=self.lengths_seen)

    def save(self, directory: str | Path) -> None:
        _save(Path(directory), self.model, self.config)

    @classmethod
    def load(cls, directory: str | Path) -> ForcPredictor:
        config = ForcConfig.model_validate_json((Path(directory) / PREDICTOR_FILE).read_text())
        model = TextModel.load(Path(directory), 2 * len(config.backends), config.max_length)
        return cls(model, config.backends, config.lengths_seen)


class HybridPredictor:
    """Hybrid-LLM: whether the small backend is good enough, and the calibrated cut-off for the large one."""

    kind: Kind = "hybrid"

    def __init__(
        self, model: TextModel, small: str, large: str, tolerance: float, threshold: float, large_share: float
    ) -> None:
        self.model = model
        self.small = small
        self.large = large
        self.tolerance = tolerance
        self.threshold = threshold
        self.large_share = large_share  # share of the validation prompts below `threshold`

    def prob_small_ok(self, texts: Sequence[str]) -> list[float]:
        """P(quality(small) >= quality(large) - tolerance) per text."""
        return torch.sigmoid(self.model.outputs(texts)[:, 0]).tolist()

    def use_large(self, texts: Sequence[str]) -> list[bool]:
        return [probability < self.threshold for probability in self.prob_small_ok(texts)]

    @property
    def config(self) -> HybridConfig:
        return HybridConfig(
            max_length=self.model.max_length, small=self.small, large=self.large, tolerance=self.tolerance,
            threshold=self.threshold, large_share=self.large_share,
        )

    def save(self, directory: str | Path) -> None:
        _save(Path(directory), self.model, self.config)

    @classmethod
    def load(cls, directory: str | Path) -> HybridPredictor:
        config = HybridConfig.model_validate_json((Path(directory) / PREDICTOR_FILE).read_text())
        model = TextModel.load(Path(directory), 1, config.max_length)
        return cls(model, config.small, config.large, config.tolerance, config.threshold, config.large_share)


Predictor = ForcPredictor | HybridPredictor


def _save(directory: Path, model: TextModel, config: ForcConfig | HybridConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory)
    (directory / PREDICTOR_FILE).write_text(config.model_dump_json(indent=1))


def build_tiny_backbone(kind: Literal["distilbert", "deberta-v2"], directory: str | Path) -> Path:
    """A randomly initialised (seed 0) one-layer, 32-wide encoder with the packaged MiniLM's tokenizer,
    saved to `directory`: a real backbone that trains in seconds, for tests."""
    from transformers import DebertaV2Config, DistilBertConfig

    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
    if kind == "distilbert":
        config = DistilBertConfig(
            vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:  # with relative attention, as DeBERTa-v3 models use it
        config = DebertaV2Config(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
            pad_token_id=tokenizer.pad_token_id,
        )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModel.from_config(config)
    target = Path(directory)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
