"""Text conditioning: a caption → per-token features for cross-attention (LDM paper §4.3, τθ for text).

A caption is tokenized with open_clip's CLIP byte-pair encoding (lower-cased, ftfy-cleaned, wrapped in
start/end tokens and padded to ``context_length``) and encoded by an open_clip ``TextTransformer``. The
output is the final layer-normed hidden state of every position, ``(B, context_length, width)``, with
a key-padding mask that is True from the start token through the end token and False on padding
(padding positions are also zeroed). The UNet's cross-attention reads these tokens.

Two modes:

- **from scratch** (default): the transformer is sized by the config and trained jointly with the
  UNet, as the paper's text-to-image LDM (LDM-KL-8-G, a transformer τθ trained from scratch);
  attention is bidirectional (padding masked out) unless ``causal: true``;
- **pretrained**: ``pretrained: path/to/open_clip_text.safetensors`` loads a text tower from a local
  file (a full open_clip CLIP state dict or one with ``text.`` prefixes; the image tower and the pooled
  projection are ignored). Causal attention, as CLIP was trained. ``trainable`` defaults to false
  (the core freezes it). Pickle files (``.pt``, ``.bin``) are refused unless ``allow_pickle: true``,
  and even then read with ``torch.load(weights_only=True)``. Nothing is ever downloaded.

The null (classifier-free guidance, condition dropout) is the encoding of the empty caption ``""``
(start and end tokens only), as in the paper and Stable Diffusion; from scratch it is learned through
the same weights. An empty (or all-whitespace) caption is therefore accepted and means "no caption".
"""

from __future__ import annotations

import functools
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ldmkit import (
    Conditioner,
    ConditionerConfig,
    ConditionerSpec,
    ConditionInputError,
    ConditionOutput,
    Route,
    hookimpl,
)

__all__ = ["TextConfig", "TextConditioner", "SPEC", "ldmkit_conditioners", "CLIP_VOCAB_SIZE", "load_text_tower_state",
           "caption_token_ids", "prune_vocabulary"]

#: Size of the CLIP BPE vocabulary (49,152 merges + 256 bytes, start and end tokens): token ids < this.
CLIP_VOCAB_SIZE = 49408
#: Whitespace control characters a caption may contain (the tokenizer folds them into spaces).
_ALLOWED_CONTROLS = frozenset("\t\n\r")


class TextConfig(ConditionerConfig):
    """Config of the ``text`` conditioner."""

    type: Literal["text"] = "text"
    key: str = "caption"
    context_length: int = Field(
        default=24, ge=3, le=1024,
        description="tokens per caption including the start and end tokens (M, the cross-attention length)",
    )
    vocab_size: int = Field(
        default=CLIP_VOCAB_SIZE, ge=3,
        description="token embedding rows: at least 49,408 (CLIP BPE), or len(vocabulary) when a vocabulary is set",
    )
    vocabulary: list[int] | None = Field(
        default=None, min_length=3,
        description="a pruned vocabulary: the CLIP BPE token ids this model knows, in embedding-row order (start "
                    "and end tokens included); captions with other tokens are refused. null: all of CLIP BPE. "
                    "Written by prune_vocabulary (a trained model keeps only the rows its data used)",
    )
    width: int = Field(default=128, ge=8, le=4096, description="transformer width = output token width d")
    layers: int = Field(
        default=2, ge=0, le=64,
        description="self-attention blocks; 0: none -- each output token is its embedding plus its position "
                    "(LayerNormed), so a word's features do not depend on the words around it",
    )
    neighbour_mix: int = Field(
        default=0, ge=0, le=8,
        description="k: before the blocks, each token gets a learned linear map of the k tokens on each side added "
                    "to it (a 1-D convolution of width 2k+1 over the caption, padding excluded, zero at the start so "
                    "a model trained without it loads unchanged). With layers 0 a word then carries its neighbours "
                    "additively -- e.g. a shape word its colour word -- a sum that exists for word pairs never seen "
                    "together. 0: off",
    )
    heads: int = Field(default=4, ge=1, le=64)
    mlp_ratio: float = Field(default=4.0, gt=0, le=16)
    causal: bool | None = Field(
        default=None,
        description="causal self-attention; default (null): false from scratch, true for a pretrained CLIP tower",
    )
    overflow: Literal["error", "truncate"] = Field(
        default="error",
        description="a caption longer than context_length: refuse it (error) or cut it with a warning (truncate)",
    )
    pretrained: str | None = Field(
        default=None, min_length=1,
        description="local path of an open_clip checkpoint (safetensors) whose text tower is loaded; "
                    "trainable then defaults to false",
    )
    allow_pickle: bool = Field(
        default=False, description="allow a pickle (.pt/.bin) pretrained file, read with torch.load(weights_only=True)",
    )

    @model_validator(mode="before")
    @classmethod
    def _pretrained_is_frozen_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("pretrained") is not None and "trainable" not in data:
            data = {**data, "trainable": False}
        return data

    @model_validator(mode="after")
    def _check(self) -> "TextConfig":
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.vocabulary is None and self.vocab_size < CLIP_VOCAB_SIZE:
            raise ValueError(f"vocab_size ({self.vocab_size}) must be at least {CLIP_VOCAB_SIZE} (the CLIP BPE "
                             "vocabulary) unless a pruned vocabulary is given")
        if self.vocabulary is not None:
            bad = [i for i in self.vocabulary if not 0 <= i < CLIP_VOCAB_SIZE]
            if bad:
                raise ValueError(f"vocabulary holds ids outside 0..{CLIP_VOCAB_SIZE - 1}: {bad[:5]}")
            if len(set(self.vocabulary)) != len(self.vocabulary):
                raise ValueError("vocabulary holds repeated token ids")
            if self.vocab_size not in (CLIP_VOCAB_SIZE, len(self.vocabulary)):
                raise ValueError(f"vocab_size ({self.vocab_size}) must equal len(vocabulary) "
                                 f"({len(self.vocabulary)}) when a vocabulary is given (or be left out)")
            self.vocab_size = len(self.vocabulary)
            if self.pretrained is not None:
                raise ValueError("a pruned vocabulary cannot be combined with a pretrained tower; prune after loading")
        if self.neighbour_mix and self.is_causal:
            raise ValueError(f"neighbour_mix ({self.neighbour_mix}) would show each token the words after it, which "
                             "a causal tower must not see; set causal: false or neighbour_mix: 0")
        if self.allow_pickle and self.pretrained is None:
            raise ValueError("allow_pickle only applies to a pretrained file; set pretrained: PATH or drop it")
        return self

    @property
    def is_causal(self) -> bool:
        return self.causal if self.causal is not None else self.pretrained is not None


@functools.lru_cache(maxsize=1)
def _clip_tokenizer() -> Any:
    """open_clip's CLIP BPE tokenizer (its vocabulary ships in the package: works offline)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class TextConditioner(Conditioner):
    """Caption → CLIP BPE tokens → open_clip TextTransformer → ``(B, M, width)`` tokens + padding mask."""

    route = Route.TOKENS

    def __init__(self, config: TextConfig, context: Any):
        super().__init__(config, context)
        from open_clip.transformer import TextTransformer

        self.output_dim = config.width
        self.num_tokens = config.context_length
        self.causal = config.is_causal
        tok = _clip_tokenizer()
        # Embedding row of each BPE id: the identity, or the position in a pruned vocabulary.
        self._rows: dict[int, int] | None = None
        if config.vocabulary is not None:
            self._rows = {token: row for row, token in enumerate(config.vocabulary)}
            missing = [name for name, t in (("start", tok.sot_token_id), ("end", tok.eot_token_id)) if t not in self._rows]
            if missing:
                raise ValueError(f"text conditioner: the vocabulary lacks the {' and '.join(missing)} token "
                                 f"(ids {tok.sot_token_id} and {tok.eot_token_id} are always needed)")
        self._sot, self._eot = self._row(int(tok.sot_token_id)), self._row(int(tok.eot_token_id))
        self.tower = TextTransformer(
            context_length=config.context_length,
            vocab_size=config.vocab_size,
            width=config.width,
            heads=config.heads,
            layers=max(config.layers, 1),  # open_clip cannot build (initialize) a tower without blocks
            mlp_ratio=config.mlp_ratio,
            output_dim=config.width,
        )
        if config.layers == 0:
            self.tower.transformer.resblocks = nn.ModuleList()
            self.tower.transformer.layers = 0
        self.mix: nn.Conv1d | None = None
        if config.neighbour_mix:
            k = config.neighbour_mix
            self.mix = nn.Conv1d(config.width, config.width, 2 * k + 1, padding=k, bias=False)
            nn.init.zeros_(self.mix.weight)
        # Per-token features only: the pooled projection and open_clip's own mask buffer are unused.
        self.tower.text_projection = None
        self.tower.attn_mask = None
        causal = torch.full((config.context_length, config.context_length), float("-inf")).triu_(1)
        self.register_buffer("causal_mask", causal, persistent=False)
        if config.pretrained is not None:
            state = load_text_tower_state(config.pretrained, allow_pickle=config.allow_pickle)
            _load_into(self.tower, state, config)

    # -- input ---------------------------------------------------------------------------------
    def validate_one(self, value: Any, index: int) -> list[int]:
        """A caption (str, or UTF-8 bytes) → its token ids, start and end tokens included."""
        cfg = self.config
        allowed = f"a caption string of at most {cfg.context_length - 2} BPE tokens"
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConditionInputError(self.key, f"bytes that are not valid UTF-8 ({exc.reason} at byte {exc.start})",
                                          allowed, index) from None
        if not isinstance(value, str):
            raise ConditionInputError(self.key, f"expected a string, got {type(value).__name__} {_short(value)}",
                                      allowed, index)
        for pos, ch in enumerate(value):
            cat = unicodedata.category(ch)
            if (cat == "Cc" and ch not in _ALLOWED_CONTROLS) or cat == "Cs":
                kind = "a lone surrogate" if cat == "Cs" else "a control character"
                raise ConditionInputError(self.key, f"the caption contains {kind} (U+{ord(ch):04X}) at position {pos}",
                                          allowed + " without control characters", index)
        try:
            ids = _clip_tokenizer().encode(value)
        except Exception as exc:  # the tokenizer should accept any clean str; never leak a traceback
            raise ConditionInputError(self.key, f"the caption could not be tokenized ({exc})", allowed, index) from None
        if self._rows is not None:
            unknown = [t for t in ids if t not in self._rows]
            if unknown:
                words = sorted({_clip_tokenizer().decode([t]).strip() for t in unknown})
                raise ConditionInputError(
                    self.key, f"this model's pruned vocabulary has no token for {', '.join(map(repr, words))}",
                    f"captions made of the words it knows: {', '.join(self.known_words())}", index)
            ids = [self._rows[t] for t in ids]
        room = cfg.context_length - 2
        if len(ids) > room:
            if cfg.overflow == "error":
                raise ConditionInputError(
                    self.key,
                    f"the caption is {len(ids)} BPE tokens long, more than context_length {cfg.context_length} "
                    f"minus the start and end tokens ({room})",
                    allowed + " (or set overflow: truncate)", index)
            warnings.warn(f"condition '{self.key}' (sample {index}): caption of {len(ids)} BPE tokens truncated "
                          f"to {room}: {value[:60]!r}", stacklevel=2)
            ids = ids[:room]
        return [self._sot, *ids, self._eot]

    def _row(self, token: int) -> int:
        return token if self._rows is None else self._rows[token]

    def known_words(self) -> list[str]:
        """The tokens of a pruned vocabulary as text, sorted (start and end tokens left out); [] for full BPE."""
        if self.config.vocabulary is None:
            return []
        tok = _clip_tokenizer()
        special = {tok.sot_token_id, tok.eot_token_id}
        return sorted(tok.decode([t]).strip() for t in self.config.vocabulary if t not in special)

    def collate(self, values: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.config.context_length
        ids = torch.zeros(len(values), m, dtype=torch.long)
        lengths = torch.tensor([len(v) for v in values])
        for i, v in enumerate(values):
            ids[i, : len(v)] = torch.tensor(v, dtype=torch.long)
        mask = torch.arange(m)[None, :] < lengths[:, None]
        return ids.to(device), mask.to(device)

    # -- output --------------------------------------------------------------------------------
    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> ConditionOutput:
        ids, mask = inputs
        tower = self.tower
        m = ids.shape[1]
        x = tower.token_embedding(ids) + tower.positional_embedding[:m]
        if self.mix is not None:  # padding rows zeroed first: a caption's features never depend on its padding
            x = x + self.mix((x * mask[..., None].to(x.dtype)).transpose(1, 2)).transpose(1, 2)
        if self.causal:
            # Real tokens precede padding, so causal attention never lets a real token see padding.
            attn = self.causal_mask[:m, :m].to(x.dtype)
        else:
            keys = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
            attn = keys[:, None, :].expand(-1, m, -1).repeat_interleave(self.config.heads, dim=0)
        x = tower.transformer(x, attn_mask=attn)
        x = tower.ln_final(x) * mask[..., None].to(x.dtype)
        return ConditionOutput(Route.TOKENS, x, mask)

    def null(self, batch_size: int) -> ConditionOutput:
        """The empty caption's encoding (start and end tokens only), the same for every sample."""
        device = self._device()
        ids, mask = self.collate([[self._sot, self._eot]], device)
        out = self.forward((ids, mask))
        return ConditionOutput(Route.TOKENS, out.value.expand(batch_size, -1, -1), out.mask.expand(batch_size, -1))


# -- pretrained text towers ------------------------------------------------------------------------
_TOWER_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")


def load_text_tower_state(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The text tower's tensors from a local open_clip checkpoint file, keys as in ``TextTransformer``.

    Accepts a safetensors file; a pickle file only with ``allow_pickle`` (then ``torch.load(...,
    weights_only=True)``, which unpickles tensors and plain containers only). Keys may carry a
    ``module.`` (DDP) and/or ``text.`` (open_clip ``CustomTextCLIP``) prefix, or sit in a ``state_dict``
    entry; the image tower, ``text_projection``, ``logit_scale`` and ``attn_mask`` are dropped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text conditioner: pretrained file {str(path)!r} not found (weights are never downloaded)")
    with path.open("rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    is_safetensors = len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8
    if is_safetensors:
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    elif not allow_pickle:
        raise ValueError(
            f"text conditioner: {str(path)!r} is not a safetensors file; pickle checkpoints (.pt, .bin, .ckpt) are "
            "not loaded unless the config sets allow_pickle: true (convert it with safetensors.torch.save_file instead)"
        )
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"text conditioner: cannot read {str(path)!r} with torch.load(weights_only=True): {exc}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"text conditioner: {str(path)!r} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "text.token_embedding.weight" in state:
        prefix = "text."
    elif "token_embedding.weight" in state:
        prefix = ""
    else:
        raise ValueError(
            f"text conditioner: {str(path)!r} holds no open_clip text tower (no 'token_embedding.weight' or "
            "'text.token_embedding.weight'; Hugging Face text towers are not supported)"
        )
    out = {}
    for k, v in state.items():
        if k.startswith(prefix):
            name = k[len(prefix):]
            if name.startswith(_TOWER_PREFIXES) and name != "attn_mask":
                out[name] = v
    return out


def _load_into(tower: nn.Module, state: dict[str, torch.Tensor], cfg: TextConfig) -> None:
    vocab, width = state["token_embedding.weight"].shape
    pos = state.get("positional_embedding")
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    found = {"vocab_size": vocab, "width": width, "layers": layers}
    wrong = {k: v for k, v in found.items() if getattr(cfg, k) != v}
    if pos is None or wrong or pos.shape[0] < cfg.context_length:
        has = ", ".join(f"{k} {v}" for k, v in found.items())
        problem = f"set {', '.join(f'{k}: {v}' for k, v in wrong.items())}" if wrong else ""
        if pos is None:
            problem = "it has no positional_embedding"
        elif pos.shape[0] < cfg.context_length:
            problem = f"its context length is {pos.shape[0]}, below context_length {cfg.context_length}"
        raise ValueError(f"text conditioner: the text tower in {cfg.pretrained!r} ({has}) does not match the config: {problem}")
    state = {**state, "positional_embedding": pos[: cfg.context_length]}  # the first M positions (causal: exact)
    try:
        tower.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"text conditioner: cannot load the text tower in {cfg.pretrained!r} "
                         f"(do heads/mlp_ratio match?): {exc}") from None


# -- pruning ----------------------------------------------------------------------------------------
def caption_token_ids(captions: Any) -> list[int]:
    """The sorted set of CLIP BPE ids (start and end tokens included) that ``captions`` tokenize to."""
    tok = _clip_tokenizer()
    ids = {int(tok.sot_token_id), int(tok.eot_token_id)}
    for caption in captions:
        ids.update(tok.encode(caption))
    return sorted(ids)


def prune_vocabulary(config: TextConfig, state: dict[str, torch.Tensor], keep: list[int],
                     prefix: str = "") -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """A trained text conditioner with only the embedding rows of ``keep`` (BPE ids): its new config and state.

    From scratch, a token that never occurs in training keeps its random initial embedding, so a model
    gives nothing meaningful for it; pruning drops those rows (49,408 x width of them: 12.6 MB at width 128
    in float16) and makes the model refuse captions with unseen tokens instead. Outputs for captions made
    of kept tokens are unchanged. ``state`` holds the conditioner's tensors, keys under ``prefix``.
    A conditioner built from a ``pretrained`` file comes back detached from it (``pretrained`` unset,
    ``causal`` and ``trainable`` spelt out), so a model saved with the pruned config loads without the file.
    """
    keep = sorted(set(int(t) for t in keep) | set(caption_token_ids([])))
    old = list(range(config.vocab_size)) if config.vocabulary is None else list(config.vocabulary)
    rows = {t: r for r, t in enumerate(old)}
    missing = [t for t in keep if t not in rows]
    if missing:
        raise ValueError(f"prune_vocabulary: token ids {missing[:5]} are not in the model's vocabulary")
    name = prefix + "tower.token_embedding.weight"
    if name not in state:
        raise KeyError(f"prune_vocabulary: no {name!r} in the state")
    new_state = dict(state)
    new_state[name] = state[name][torch.tensor([rows[t] for t in keep])].clone()
    update: dict[str, Any] = {"vocabulary": keep, "vocab_size": len(keep)}
    if config.pretrained is not None:
        # the tower now lives in ``state``: forget its source file, keep how it attends and whether it trains
        update.update(pretrained=None, allow_pickle=False, causal=config.is_causal, trainable=config.trainable)
    new_config = config.model_copy(update=update)
    return TextConfig.model_validate(new_config.model_dump()), new_state


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


SPEC = ConditionerSpec(
    name="text",
    config_cls=TextConfig,
    build=TextConditioner,
    route=Route.TOKENS,
    description="caption -> CLIP BPE tokens -> open_clip TextTransformer -> per-token cross-attention context",
    example_inputs=("a small red circle above a blue square", "a green triangle", "a large cyan square left of a yellow circle"),
)


@hookimpl
def ldmkit_conditioners() -> list[ConditionerSpec]:
    return [SPEC]
