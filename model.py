"""The encoder: a BERT-style Transformer written out by hand.

Read beside docs/transformer.md: every equation there carries a label (eq:attention, eq:gelu, ...), and the one
place in this file that computes it carries the same label in a comment.

    EncoderConfig -> Embeddings -> SelfAttention + FeedForward = Block -> Encoder
                  -> heads: LMHead (masked or causal LM), SequenceClassifier (pooler + linear),
                            SentenceEncoder (one pooled vector, no head: SimCSE),
                            TokenClassifier (a linear per token: NER), SpanExtractor (start/end logits: QA)

Layer names are our own; `HF_BERT_NAMES` near the bottom maps them to the Hugging Face BERT checkpoint
layout in one table, so `from_hf_bert` / `save_hf_bert` are a short, explicit translation.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import atomic_write
from config import PRESETS
from losses import binary_cross_entropy_with_logits, cross_entropy

# -----------------------------------------------------------------------------------------------------
# configuration


@dataclass
class EncoderConfig:
    vocab_size: int = 8192
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 0         # 0 means 4 * hidden_size, as in BERT
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1               # on embeddings and on each residual branch
    attention_dropout: float = 0.1     # on the attention probabilities
    layer_norm_eps: float = 1e-12
    norm: str = "post"                 # "post": BERT (LN after the residual add); "pre": LN before each branch
    embedding_norm: bool | None = None # LN on the embedding sum; None: yes for post (BERT), no for pre
    causal: bool = False               # True: each position sees only itself and the past (causal-LM)
    attention: str = "sdpa"            # "sdpa": fused F.scaled_dot_product_attention; "math": written out
    unpad: bool = False                # True: padding is dropped before the layers (see Unpadded)
    pad_id: int = 0
    layer_heads: list | None = None    # heads kept in each layer after head pruning (export.py); None: num_heads

    def __post_init__(self):
        if self.intermediate_size == 0:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.norm not in ("post", "pre"):
            raise ValueError(f"norm must be 'post' or 'pre', got {self.norm!r}")
        if self.embedding_norm is None:
            self.embedding_norm = self.norm == "post"
        elif self.norm == "post" and not self.embedding_norm:
            raise ValueError("embedding_norm=False needs norm='pre': a post-LN (BERT) stack normalises its embeddings")
        if self.attention not in ("sdpa", "math"):
            raise ValueError(f"attention must be 'sdpa' or 'math', got {self.attention!r}")
        if self.layer_heads is not None:
            self.layer_heads = [int(h) for h in self.layer_heads]
            if len(self.layer_heads) != self.num_layers or not all(1 <= h <= self.num_heads for h in self.layer_heads):
                raise ValueError(f"layer_heads must give 1..{self.num_heads} heads for each of the "
                                 f"{self.num_layers} layers, got {self.layer_heads}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "EncoderConfig":
        """The BERT miniatures family (Turc et al. 2019): layers / hidden / heads, intermediate = 4 x hidden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        layers, hidden, heads = PRESETS[name]
        return cls(num_layers=layers, hidden_size=hidden, num_heads=heads, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EncoderConfig fields {sorted(unknown)}")
        return cls(**d)



# -----------------------------------------------------------------------------------------------------
# building blocks


class LayerNorm(nn.LayerNorm):
    """y = (x - mean) / sqrt(var + eps) * gamma + beta over the last dim.  [eq:layernorm]

    The forward is torch's fused kernel (one pass, fused backward); `layer_norm_reference` below is the
    same equation in plain tensor ops, and tests/test_model.py checks they agree.
    """


def layer_norm_reference(x, gamma, beta, eps):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)       # the biased variance, as BERT uses
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta


def gelu_reference(x):
    """GELU(x) = x * Phi(x) = x/2 * (1 + erf(x / sqrt 2)), the exact form BERT uses.  [eq:gelu]"""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class Embeddings(nn.Module):
    """e_t = LayerNorm(E_tok[x_t] + E_pos[t] + E_seg[s_t]), then dropout.  [eq:embeddings]"""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=None)
        self.pos = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.seg = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        # a pre-LN stack normalises inside every block, so it may leave its embeddings un-normalised (our default);
        # Cramming keeps this LN in its pre-LN model: it puts every token's vector on one scale from step 0
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.embedding_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids, token_type_ids=None, position_ids=None):
        """position_ids (B, T): where each token sits, when not 0..T-1 (left padding, a KV cache)."""
        B, T = input_ids.shape
        if position_ids is None:
            if T > self.pos.num_embeddings:
                raise ValueError(f"sequence length {T} exceeds max_position {self.pos.num_embeddings}")
            x = self.tok(input_ids) + self.pos.weight[:T]                # (B, T, C) + (T, C)
        else:
            if int(position_ids.max()) >= self.pos.num_embeddings:
                raise ValueError(f"position {int(position_ids.max())} exceeds max_position {self.pos.num_embeddings}")
            x = self.tok(input_ids) + self.pos(position_ids)             # (B, T, C) + (B, T, C)
        x = x + (self.seg(token_type_ids) if token_type_ids is not None else self.seg.weight[0])
        return self.drop(self.norm(x))


def visible_keys(attention_mask, T, causal, device):
    """Which keys each query may attend to: a bool mask (B or 1, 1, T or 1, T), or None for 'all'.

    attention_mask: (B, T) with 1 for real tokens, 0 for padding. A query row that can see no key at all
    (a sequence of only padding) would give softmax over an empty set = 0/0 = NaN in every dtype; such rows
    are opened to all keys instead. Their outputs are meaningless but finite, and every loss ignores them.
    """
    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()[:, None, None, :]                  # (B, 1, 1, T): key padding
    if causal:
        tri = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T): key j <= query i
        mask = tri[None, None] if mask is None else mask & tri
    if mask is not None:
        mask = mask | ~mask.any(-1, keepdim=True)                       # no fully-masked rows, no NaN
    return mask


class Unpadded:
    """Where the real tokens of a padded batch sit, so the layers can skip the padding.

    A fine-tuning batch is padded to its longest sequence; for SST-2-like lengths about half its (B, T)
    positions are padding. Every Linear, LayerNorm, GELU and dropout acts on each position alone, so they
    run on the N real rows packed into (N, C) instead; only attention mixes positions, and it re-pads its
    q, k, v for the one fused SDPA call and packs its output again (torch.nested jagged tensors run the same
    attention on CPU one sequence at a time, and measured no faster: docs/performance.md)."""

    def __init__(self, attention_mask, causal: bool):
        self.shape = attention_mask.shape                                          # (B, T)
        self.real = attention_mask.flatten().nonzero().squeeze(1)                  # (N,) flat indices
        self.mask = visible_keys(attention_mask, self.shape[1], causal, attention_mask.device)

    def pack(self, x):
        return x.flatten(0, 1).index_select(0, self.real)                         # (B, T, ...) -> (N, ...)

    def unpack(self, x):
        full = x.new_zeros(self.shape.numel(), *x.shape[1:])                       # padding rows stay 0
        return full.index_copy(0, self.real, x).view(*self.shape, *x.shape[1:])   # (N, ...) -> (B, T, ...)

    def packed_index(self, flat):
        """Flat (B*T) indices of real tokens -> their rows in the packed (N, ...) tensor."""
        return torch.searchsorted(self.real, flat)


def left_padded_positions(attention_mask):
    """(B, S) 1/0 mask -> (B, S) position of each token counted from its row's first real token, so a
    left-padded prompt sees the positions it would alone (padding gets 0; it is masked anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LayerKV:
    """One layer's cached keys and values, K and V each (B, nh, S, hs) over the S positions so far."""

    def __init__(self):
        self.k = self.v = None

    def append(self, k, v):
        """Add the T new positions' (B, nh, T, hs) keys/values; return all of them, (B, nh, S, hs) each."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """Keys and values of every position decoded so far, so that each new token runs the stack on itself
    alone instead of on the whole prefix again.

    Causal attention only: the key and value at position s depend on tokens <= s alone, so they never change
    once computed, and the new query t needs K_{1..t}, V_{1..t} = [cached; new].  [eq:kv-cache]
    (With bidirectional attention a new token changes every earlier state, so nothing could be kept.)
        layers[i]: LayerKV of block i;   attention_mask: (B, S), 1 for real tokens, 0 for left padding
    """

    def __init__(self, cfg: EncoderConfig):
        if not cfg.causal:
            raise ValueError("a KV cache needs a causal model (config.causal=True): with bidirectional "
                             "attention every new token changes the states of all earlier ones")
        self.layers = [LayerKV() for _ in range(cfg.num_layers)]
        self.attention_mask = None

    def extend(self, attention_mask, input_ids):
        """Record the T new tokens' mask (B, T) (None: all real) and return, for them, which of all S keys
        each query sees, (B, 1, T, S), and their position ids (B, T)."""
        B, T = input_ids.shape
        new = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        self.attention_mask = new if self.attention_mask is None else torch.cat([self.attention_mask, new], dim=1)
        S = self.attention_mask.shape[1]
        causal = torch.ones(T, S, dtype=torch.bool, device=new.device).tril(S - T)   # new query i sits at S-T+i
        mask = self.attention_mask.bool()[:, None, None, :] & causal                  # (B, 1, T, S)
        mask = mask | ~mask.any(-1, keepdim=True)           # a padding query seeing no key: open all, no NaN
        return mask, left_padded_positions(self.attention_mask)[:, S - T:]


class SelfAttention(nn.Module):
    """Multi-head self-attention. One fused projection makes Q, K and V in a single matmul."""

    def __init__(self, cfg: EncoderConfig, num_heads: int | None = None):
        super().__init__()
        # after head pruning a layer keeps num_heads < cfg.num_heads heads, each still hs wide
        self.num_heads, self.head_dim = num_heads or cfg.num_heads, cfg.hidden_size // cfg.num_heads
        inner = self.num_heads * self.head_dim                           # C, or less after head pruning
        self.qkv = nn.Linear(cfg.hidden_size, 3 * inner)                 # [W_Q; W_K; W_V]
        self.proj = nn.Linear(inner, cfg.hidden_size)                    # W_O
        self.dropout = cfg.attention_dropout
        self.use_sdpa = cfg.attention == "sdpa"
        # Hook for prefix tuning (peft.py): a module returning learned (K, V) prefixes of shape
        # (nh, P, hs) that every query may attend to. None = plain attention.
        self.prefix = None
        # Hook for explain.py: a callable given the attention probabilities (B, nh, T, T) of each forward;
        # while one is set the explicit path runs, as SDPA does not return them. None = nothing recorded.
        self.record = None

    def forward(self, x, mask, layout=None, cache=None):
        """x (B, T, C) and the bool mask of visible keys (or None: all); with an Unpadded layout, x is the
        packed real rows (N, C), re-padded around the attention itself. cache: this layer's LayerKV when
        decoding with a KVCache (the mask then covers all S keys, cached and new)."""
        if layout is not None:
            return self.proj(layout.pack(self.attend(layout.unpack(self.qkv(x)), mask)))   # (N, C)
        return self.proj(self.attend(self.qkv(x), mask, cache))

    def attend(self, qkv, mask, cache=None):
        """The per-head attention of the fused projections qkv (B, T, 3C) -> (B, T, C), heads concatenated."""
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(C, dim=2)                                    # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)                                    # (B, nh, S, hs): the past + these T
        if self.prefix is not None:
            k, v, mask = with_prefix(self.prefix(), k, v, mask)          # keys: [prefix; x], (B, nh, P+T, hs)
        p_drop = self.dropout if self.training else 0.0
        if self.use_sdpa and self.record is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        else:
            # Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + M) V, M = -inf where a key is hidden  [eq:attention]
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, nh, T, T), or (B, nh, T, S) cached
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(dim=-1)
            if self.record is not None:
                self.record(probs)
            probs = F.dropout(probs, p_drop, self.training)
            y = probs @ v                                                # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, C)                        # concatenate heads: (B, T, C)


def with_prefix(prefix, k, v, mask):
    """Prefix tuning's learned keys and values (nh, P, hs) put before k and v (B, nh, T, hs); the mask
    gains P columns that every query sees."""
    (pk, pv), B, T = prefix, k.shape[0], k.shape[2]
    k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)     # (B, nh, P+T, hs)
    v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
    full = torch.ones(B, 1, T if mask is None else mask.shape[2], pk.shape[1], dtype=torch.bool, device=k.device)
    return k, v, full if mask is None else torch.cat([full, mask.expand(B, 1, -1, -1)], dim=-1)


class FeedForward(nn.Module):
    """FFN(x) = GELU(x W_1 + b_1) W_2 + b_2, applied to each position alone.  [eq:ffn]"""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))                             # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """One Transformer layer: attention then feed-forward, each wrapped in dropout + residual + LayerNorm.

    post-LN (BERT):  h = LN(x + Drop(Attn(x)));   y = LN(h + Drop(FFN(h)))         [eq:block-post]
    pre-LN:          h = x + Drop(Attn(LN(x)));   y = h + Drop(FFN(LN(h)))         [eq:block-pre]
    Pre-LN keeps an identity path from input to output, which trains stably at higher learning rates
    without warm-up tricks (Xiong et al. 2020; Cramming uses it).
    """

    def __init__(self, cfg: EncoderConfig, num_heads: int | None = None):
        super().__init__()
        self.attn = SelfAttention(cfg, num_heads)
        self.attn_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.pre_norm = cfg.norm == "pre"

    def forward(self, x, mask, layout=None, rows=None, cache=None):
        """mask, layout, cache: as SelfAttention takes them. rows: flat indices of the only output rows
        wanted, or None for all. Everything after attention acts on each row alone, so it runs on those M
        rows only and the result is (M, C)."""
        if self.pre_norm:
            a = self.attn(self.attn_norm(x), mask, layout, cache)
            x = select(x, rows) + self.drop(select(a, rows))
            return x + self.drop(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(select(x, rows) + self.drop(select(self.attn(x, mask, layout, cache), rows)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


def select(x, rows):
    """The rows (flat indices) of x (B, T, C) or (N, C) as (M, C); x itself when rows is None."""
    return x if rows is None else x.reshape(-1, x.shape[-1]).index_select(0, rows)


class Encoder(nn.Module):
    """Token ids (B, T) -> contextual hidden states (B, T, C)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg, cfg.layer_heads[i] if cfg.layer_heads else None)
                                    for i in range(cfg.num_layers))
        self.final_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm == "pre" else nn.Identity()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, embeddings=None, rows=None,
                position_ids=None, cache=None):
        """`embeddings`: the output of self.embed, passed in by adversarial training after it adds δ.
        `rows`: flat indices into B*T of the only outputs wanted (MLM: the masked positions), or None. The
        last block then runs its position-wise part on those rows alone, and the result is (M, C).
        `cache`: a KVCache (causal models): input_ids are then only the T new tokens after the cached ones."""
        if cache is not None:
            mask, position_ids = cache.extend(attention_mask, input_ids)   # (B, 1, T, S), (B, T)
        x = self.embed(input_ids, token_type_ids, position_ids) if embeddings is None else embeddings  # (B, T, C)
        layout, layer_kv = None, cache.layers if cache is not None else [None] * len(self.blocks)
        if cache is not None:
            pass                                                         # the mask came from the cache
        elif self.config.unpad and attention_mask is not None:
            layout = Unpadded(attention_mask, self.config.causal)        # padding rows come back as 0
            x, mask = layout.pack(x), layout.mask                        # (N, C): the real tokens only
            rows = None if rows is None else layout.packed_index(rows)
        else:
            mask = visible_keys(attention_mask, x.shape[1], self.config.causal, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, layout, rows if i == len(self.blocks) - 1 else None, layer_kv[i])
        x = self.final_norm(x)
        return layout.unpack(x) if layout is not None and rows is None else x   # (B, T, C) or (M, C)


# -----------------------------------------------------------------------------------------------------
# heads


class LMHead(nn.Module):
    """Language-model head shared by masked and causal LM: transform, then scores over the vocabulary.

    logits = LN(GELU(h W_t + b_t)) E_tok^T + b, with the decoder weight tied to the token embedding.
    `positions` (flat indices into B*T) runs it only where a loss is taken: for MLM that is ~15% of tokens,
    and the (C x V) decoder is the largest matmul of a small model, so this is a large saving (MosaicBERT,
    Cramming)."""

    def __init__(self, cfg: EncoderConfig, tok_embedding: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.tok_embedding = [tok_embedding]    # a list, so the tied weight is owned (and saved) once
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden, positions=None, vocab=None):
        """vocab: the ids whose scores are wanted (a cloze's class words), else all V of them."""
        if positions is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[positions]     # (M, C): only the selected rows
        h = self.norm(F.gelu(self.dense(hidden)))
        if vocab is not None:
            return F.linear(h, self.tok_embedding[0].weight[vocab], self.bias[vocab])   # (..., K)
        return F.linear(h, self.tok_embedding[0].weight, self.bias)      # (..., V)


class LanguageModel(nn.Module):
    """Encoder + LM head. Masked LM when config.causal is False, causal (next-token) LM when True."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.lm_head = LMHead(cfg, self.encoder.embed.tok)
        self.apply(init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, positions=None, targets=None,
                position_ids=None, cache=None):
        """positions: flat indices into B*T where the logits are wanted; the last block and the head then
        run on those M rows alone (MLM: ~15% of them). targets: the id to predict at each of those rows
        (B*T or M of them, -100 for none); when given, returns (logits, summed cross-entropy). The loss is
        taken here, inside the module, as nanoGPT's GPT.forward(idx, targets) does: torch.compile then fuses
        the log-softmax over the vocabulary with the head, instead of a dozen eager passes over the logits.
        position_ids (B, T): each token's position (left padding); cache: a KVCache (generate.py)."""
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, rows=positions,
                              position_ids=position_ids, cache=cache)    # (B, T, C) or (M, C)
        logits = self.lm_head(hidden)                                     # (B, T, V) or (M, V)
        if targets is None:
            return logits
        return logits, cross_entropy(logits.reshape(targets.numel(), -1), targets.reshape(-1), reduction="sum")


class ClozeClassifier(LanguageModel):
    """Classification asked as a cloze (PET, Schick & Schuetze 2021; LM-BFF, Gao et al. 2021): each input holds
    one [MASK] (the tokenizer's set_template puts the sentence into "{text} It was [MASK] ."), and the class
    scores are the masked LM's scores of one word per class (the verbalizer) there:

        s_c = LMHead(h_[MASK])[v_c]            v = (terrible, great): one vocabulary id per class

    so the "classifier" is the pre-trained LM head and the tied embedding rows of those words; nothing starts
    at random. The weights are a LanguageModel's, saved and loaded as one (BertForMaskedLM)."""

    def __init__(self, cfg: EncoderConfig, mask_id: int, word_ids: list[int]):
        super().__init__(cfg)
        self.mask_id, self.num_labels = mask_id, len(word_ids)
        self.register_buffer("word_ids", torch.tensor(word_ids, dtype=torch.long), persistent=False)   # (K,)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, embeddings=None):
        B, T = input_ids.shape
        at = (input_ids == self.mask_id).int().argmax(1)                  # (B,) each row's (first) [MASK]
        rows = torch.arange(B, device=input_ids.device) * T + at          # flat indices into B*T
        # only the [MASK] rows are read, so the last block and the head run on B rows
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, embeddings, rows=rows)   # (B, C)
        return self.lm_head(hidden, vocab=self.word_ids)                  # (B, K)  [eq:cloze-scores]


class ReplacedTokenDetection(nn.Module):
    """ELECTRA pre-training (Clark et al. 2020): a small masked-LM *generator* fills the masked positions with
    its own samples, and the *discriminator* -- the encoder kept for fine-tuning -- tells at every token
    whether it is the original or a replacement. The discriminator learns from all T tokens of a window
    instead of the ~15 % an MLM predicts, which is why ELECTRA needs far less compute for the same GLUE score.

    The generator shares the discriminator's embeddings (token, position, type, their LayerNorm): the
    generator's MLM loss is what trains them in ELECTRA, the discriminator's loss moves them little. ELECTRA
    shrinks the generator's width (1/4 to 1/2); here it is shallower instead (`generator_layers`, a quarter of
    the depth, at least 1), so the shared table needs no projection. A generator as strong as the
    discriminator makes the task too hard (the paper's Figure 3).

    forward(input_ids, labels, sample_generator) -> (generator logits (M, V), their targets (M,), summed MLM
    loss, discriminator logits (B, T), 1 where replaced (B, T), summed BCE over every token)."""

    def __init__(self, cfg: EncoderConfig, generator_layers: int | None = None):
        super().__init__()
        self.config = cfg
        self.generator_layers = generator_layers or max(1, cfg.num_layers // 4)
        if not 1 <= self.generator_layers <= cfg.num_layers:
            raise ValueError(f"generator_layers {self.generator_layers}: expected 1..{cfg.num_layers} "
                             "(the generator is at most as deep as the discriminator)")
        self.init_kwargs = {"generator_layers": self.generator_layers}       # to rebuild it (Parallel.plain)
        self.encoder = Encoder(cfg)                                           # the discriminator's encoder
        self.rtd_head = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU(),
                                      nn.Linear(cfg.hidden_size, 1))          # one logit per token: replaced?
        self.generator = LanguageModel(replace(cfg, num_layers=self.generator_layers, layer_heads=None))
        self.apply(init_weights)
        self.generator.encoder.embed = self.encoder.embed                    # shared embeddings, one tensor each
        self.generator.lm_head.tok_embedding = [self.encoder.embed.tok]      # its decoder tied to the shared table

    def forward(self, input_ids, labels, sample_generator=None):
        # 1. the generator: its masked-LM loss on the masked positions, as LanguageModel takes it
        flat = labels.reshape(-1)
        positions = (flat != -100).nonzero().squeeze(1)                            # (M,)
        targets = flat[positions]
        gen_logits, gen_loss = self.generator(input_ids, positions=positions, targets=targets)   # (M, V), sum
        # 2. its samples replace the masked tokens; no gradient flows through the sampling  [eq:rtd-sample]
        with torch.no_grad():
            probs = F.softmax(gen_logits.detach().float(), dim=-1)
            sampled = torch.multinomial(probs, 1, generator=sample_generator).squeeze(1)   # (M,)
        original = torch.where(labels != -100, labels, input_ids)                   # (B, T) the uncorrupted text
        corrupted = original.reshape(-1).clone()
        corrupted[positions] = sampled
        corrupted = corrupted.view_as(original)
        # a sample that happens to be the original token counts as original (the paper's choice)
        replaced = (corrupted != original).float()                                  # (B, T)
        # 3. the discriminator: BCE over every token  [eq:rtd-loss]
        logits = self.rtd_head(self.encoder(corrupted)).squeeze(-1)                 # (B, T)
        rtd_loss = binary_cross_entropy_with_logits(logits, replaced, reduction="sum")
        return gen_logits, targets, gen_loss, logits, replaced, rtd_loss


class SequenceClassifier(nn.Module):
    """Encoder + BERT pooler + linear: one vector of scores per sequence (num_labels=1: regression).

    pooling "cls" reads the [CLS] state, as BERT does; "mean" averages the real tokens' states, which a
    model pre-trained with MLM alone (no sentence-level objective ever shaped its [CLS]) can use from the
    first step of fine-tuning."""

    def __init__(self, cfg: EncoderConfig, num_labels: int = 2, classifier_dropout: float | None = None,
                 pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.config, self.num_labels, self.pooling = cfg, num_labels, pooling
        self.encoder = Encoder(cfg)
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.dropout if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        self.apply(init_weights)

    def pool(self, hidden, attention_mask=None):
        """pooled = tanh(W_p h_[CLS] + b_p): the first token's state, as BERT was pre-trained to use it;
        or tanh(W_p mean_t h_t + b_p) over the real tokens (pooling "mean")."""
        if self.pooling == "cls":
            return torch.tanh(self.pooler(hidden[:, 0]))                 # (B, C)
        m = (attention_mask if attention_mask is not None else hidden.new_ones(hidden.shape[:2]))[..., None]
        mean = (hidden * m.to(hidden.dtype)).sum(1) / m.sum(1).clamp(min=1).to(hidden.dtype)
        return torch.tanh(self.pooler(mean))                             # (B, C)

    def features(self, input_ids, attention_mask=None, token_type_ids=None, embeddings=None):
        """Dropout(pooled): what the classifier reads, (B, C)."""
        if self.pooling == "mean":
            hidden = self.encoder(input_ids, attention_mask, token_type_ids, embeddings)   # (B, T, C)
            return self.drop(self.pool(hidden, attention_mask))
        B, T = (input_ids if embeddings is None else embeddings).shape[:2]
        first = torch.arange(B, device=(input_ids if embeddings is None else embeddings).device) * T
        # only [CLS] is pooled, so the last block computes only the [CLS] rows: (B, C) -> (B, 1, C)
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, embeddings, rows=first).unsqueeze(1)
        return self.drop(self.pool(hidden))                               # (B, C)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, embeddings=None):
        return self.classifier(self.features(input_ids, attention_mask, token_type_ids, embeddings))  # (B, num_labels)


class MultiTaskClassifier(SequenceClassifier):
    """One encoder and pooler shared by several tasks, one Linear head per task: heads[name] maps the
    pooled (B, C) to that task's (B, K_t). forward(..., task=name) runs the shared part and that head
    only, so a step on task t gives the other heads no gradient at all (None, not 0): AdamW skips them,
    they neither decay nor drift on old momentum while another task trains (multitask.py samples a task
    per step)."""

    skips_parameters = True          # DDP must look for the unused heads each step (trainer.parallelize)

    def __init__(self, cfg: EncoderConfig, outputs: dict[str, int], classifier_dropout: float | None = None,
                 pooling: str = "cls"):
        super().__init__(cfg, 1, classifier_dropout, pooling)
        del self.classifier
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.hidden_size, k) for name, k in outputs.items()})
        self.heads.apply(init_weights)

    @classmethod
    def around(cls, base: SequenceClassifier, outputs: dict[str, int]) -> "MultiTaskClassifier":
        """A multi-task model on `base`'s encoder, pooler and dropout (taken, not copied), fresh heads."""
        with torch.device("meta"):   # no memory or time for an encoder that is replaced at once
            mt = cls(base.config, outputs)
        mt.encoder, mt.pooler, mt.drop, mt.pooling = base.encoder, base.pooler, base.drop, base.pooling
        mt.heads.to_empty(device=base.pooler.weight.device).apply(init_weights)
        return mt

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, embeddings=None, task=None):
        if task not in self.heads:
            raise ValueError(f"task must be one of {', '.join(self.heads)}, got {task!r}")
        return self.heads[task](self.features(input_ids, attention_mask, token_type_ids, embeddings))  # (B, K_t)

    def task_model(self, task: str) -> SequenceClassifier:
        """Task `task` alone as a plain SequenceClassifier sharing this model's modules (no copy): what
        save_finetuned writes, and what predict.py reads back, for that task."""
        with torch.device("meta"):
            single = SequenceClassifier(self.config, self.heads[task].out_features, pooling=self.pooling)
        single.encoder, single.pooler, single.drop, single.classifier = self.encoder, self.pooler, self.drop, self.heads[task]
        return single


class TokenClassifier(nn.Module):
    """Encoder + dropout + linear on every token: one vector of class scores per token (NER tags).
    Hugging Face's BertForTokenClassification, same weight names ("classifier")."""

    def __init__(self, cfg: EncoderConfig, num_labels: int = 9, classifier_dropout: float | None = None):
        super().__init__()
        self.config, self.num_labels = cfg, num_labels
        self.encoder = Encoder(cfg)
        self.drop = nn.Dropout(cfg.dropout if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        self.apply(init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, embeddings=None):
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, embeddings)     # (B, T, C)
        return self.classifier(self.drop(hidden))                                        # (B, T, num_labels)


class SpanExtractor(nn.Module):
    """Encoder + one linear to two scores per token: where the answer starts and where it ends
    (extractive QA, Devlin et al. 2019 sec. 4.2). Hugging Face's BertForQuestionAnswering ("qa_outputs")."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config, self.num_labels = cfg, 2
        self.encoder = Encoder(cfg)
        self.qa_outputs = nn.Linear(cfg.hidden_size, 2)
        self.apply(init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, embeddings=None):
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, embeddings)     # (B, T, C)
        return self.qa_outputs(hidden)              # (B, T, 2): [..., 0] start logits, [..., 1] end logits


class SentenceEncoder(nn.Module):
    """An encoder giving one vector per sequence: the [CLS] hidden state ("cls": SimCSE's
    cls-before-pooler) or the mean over real tokens ("mean")."""

    def __init__(self, encoder: nn.Module, pooling: str = "cls"):
        super().__init__()
        self.encoder, self.config, self.pooling = encoder, encoder.config, pooling

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, embeddings=None):
        h = self.encoder(input_ids, attention_mask, token_type_ids, embeddings)         # (B, T, C)
        if self.pooling == "cls":
            return h[:, 0]                                                                # (B, C)
        m = (attention_mask if attention_mask is not None else torch.ones_like(input_ids))[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)                                     # (B, C)


def init_weights(module):
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """What FSDP2 shards one by one (each unit gathers its full weights just before its forward and frees
    them after): the Transformer blocks; the embeddings and heads go with the root."""
    encoder = model if isinstance(model, Encoder) else model.encoder
    return list(encoder.blocks)


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself behind the wrappers training puts around it (DDP's .module, torch.compile's ._orig_mod)."""
    model = getattr(model, "module", model)          # DDP
    return getattr(model, "_orig_mod", model)        # torch.compile


# -----------------------------------------------------------------------------------------------------
# Hugging Face BERT layout: config.json + model.safetensors (or pytorch_model.bin) + vocab.txt

# ours -> theirs, with {i} the layer index. "bert." may prefix theirs (BertForMaskedLM, ...) or not (BertModel).
HF_BERT_NAMES = {
    "encoder.embed.tok.weight": "embeddings.word_embeddings.weight",
    "encoder.embed.pos.weight": "embeddings.position_embeddings.weight",
    "encoder.embed.seg.weight": "embeddings.token_type_embeddings.weight",
    "encoder.embed.norm.weight": "embeddings.LayerNorm.weight",
    "encoder.embed.norm.bias": "embeddings.LayerNorm.bias",
    # qkv is split into three HF tensors; see QKV below
    "encoder.blocks.{i}.attn.proj.weight": "encoder.layer.{i}.attention.output.dense.weight",
    "encoder.blocks.{i}.attn.proj.bias": "encoder.layer.{i}.attention.output.dense.bias",
    "encoder.blocks.{i}.attn_norm.weight": "encoder.layer.{i}.attention.output.LayerNorm.weight",
    "encoder.blocks.{i}.attn_norm.bias": "encoder.layer.{i}.attention.output.LayerNorm.bias",
    "encoder.blocks.{i}.ffn.fc1.weight": "encoder.layer.{i}.intermediate.dense.weight",
    "encoder.blocks.{i}.ffn.fc1.bias": "encoder.layer.{i}.intermediate.dense.bias",
    "encoder.blocks.{i}.ffn.fc2.weight": "encoder.layer.{i}.output.dense.weight",
    "encoder.blocks.{i}.ffn.fc2.bias": "encoder.layer.{i}.output.dense.bias",
    "encoder.blocks.{i}.ffn_norm.weight": "encoder.layer.{i}.output.LayerNorm.weight",
    "encoder.blocks.{i}.ffn_norm.bias": "encoder.layer.{i}.output.LayerNorm.bias",
    "lm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "lm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "lm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "lm_head.bias": "cls.predictions.bias",
    "pooler.weight": "pooler.dense.weight",
    "pooler.bias": "pooler.dense.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
    "qa_outputs.weight": "qa_outputs.weight",
    "qa_outputs.bias": "qa_outputs.bias",
    # plainbert extension for pre-LN stacks (Hugging Face BERT has no final norm)
    "encoder.final_norm.weight": "plainbert.final_norm.weight",
    "encoder.final_norm.bias": "plainbert.final_norm.bias",
}
QKV = ("encoder.blocks.{i}.attn.qkv.{p}", "encoder.layer.{i}.attention.self.{part}.{p}")
# keys a BERT checkpoint may hold that we knowingly do not use
HF_IGNORED = re.compile(r"(embeddings\.position_ids|cls\.predictions\.decoder\.weight|cls\.seq_relationship\..*)$")
HF_HEADS = ("cls.predictions", "pooler.dense", "classifier", "qa_outputs")  # task heads a checkpoint may carry


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the file and the offending keys."""


def _hf_name(ours: str) -> str:
    m = re.match(r"encoder\.blocks\.(\d+)\.(.*)", ours)
    if m:
        return HF_BERT_NAMES["encoder.blocks.{i}." + m.group(2)].replace("{i}", m.group(1))
    return HF_BERT_NAMES[ours]


def to_hf_state_dict(model: nn.Module) -> dict:
    out = {}
    prefix = "encoder." if isinstance(model, Encoder) else ""
    for name, t in model.state_dict().items():
        if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Identity):
            continue
        name = prefix + name
        m = re.match(r"encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", name)
        if m:
            for part, chunk in zip(("query", "key", "value"), t.chunk(3, dim=0)):
                out[QKV[1].format(i=m.group(1), part=part, p=m.group(2))] = chunk.contiguous()
        else:
            out[_hf_name(name)] = t.contiguous()
    if "cls.predictions.bias" in out:   # tied decoder, written out so that any BERT reader finds it
        out["cls.predictions.decoder.weight"] = out["embeddings.word_embeddings.weight"]
    return out


def hf_config(cfg: EncoderConfig) -> dict:
    return {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": cfg.max_position, "type_vocab_size": cfg.type_vocab_size,
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attention_dropout,
            "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": "gelu", "position_embedding_type": "absolute",
            "pad_token_id": cfg.pad_id, "is_decoder": cfg.causal, "plainbert_norm": cfg.norm,
            "plainbert_embedding_norm": cfg.embedding_norm, "plainbert_layer_heads": cfg.layer_heads}


def config_from_hf(d: dict, path: str = "config.json", **overrides) -> EncoderConfig:
    if d.get("model_type", "bert") not in ("bert",):
        raise CheckpointError(f"{path}: model_type {d['model_type']!r} is not a BERT checkpoint")
    if d.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{path}: hidden_act {d['hidden_act']!r} is not supported (expected 'gelu')")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{path}: position_embedding_type {d['position_embedding_type']!r} is not supported")
    try:
        kw = dict(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                  num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
                  max_position=d["max_position_embeddings"], type_vocab_size=d.get("type_vocab_size", 2),
                  dropout=d.get("hidden_dropout_prob", 0.1),
                  attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
                  layer_norm_eps=d.get("layer_norm_eps", 1e-12), pad_id=d.get("pad_token_id") or 0,
                  causal=bool(d.get("is_decoder", False)), norm=d.get("plainbert_norm", "post"),
                  embedding_norm=d.get("plainbert_embedding_norm"), layer_heads=d.get("plainbert_layer_heads"))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e.args[0]!r}") from None
    kw.update(overrides)
    return EncoderConfig(**kw)


def read_hf_weights(path: str) -> dict:
    """Tensors from model.safetensors, else model.sparse.safetensors (pruned weights stored sparsely by
    export.py, made dense again by sparse.load_sparse), else pytorch_model.bin read with weights_only=True."""
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    sparse = os.path.join(path, "model.sparse.safetensors")
    try:
        if not os.path.exists(st) and os.path.exists(sparse):
            from sparse import load_sparse
            st = sparse
            return load_sparse(sparse)
        if os.path.exists(st):
            from safetensors.torch import load_file
            return load_file(st)
        if os.path.exists(pt):
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated file, bad header, pickled objects, ...
        raise CheckpointError(f"{st if os.path.exists(st) else pt}: cannot read weights ({e})") from None
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin found")


def from_hf_bert(path: str, head: str | None = "mlm", num_labels: int = 2, strict: bool = False,
                 **config_overrides) -> nn.Module:
    """Load a BERT-layout folder. head: "mlm"/"clm" -> LanguageModel, "classifier" -> SequenceClassifier,
    "token" -> TokenClassifier, "span" -> SpanExtractor, None -> bare Encoder. The encoder must be complete;
    an MLM head must be present for "mlm"; the pooler and classifier are taken when present (and shaped
    right), else freshly initialised: what --init of a pre-trained encoder wants. strict=True (a fine-tuned
    folder, whose head *is* the model): every tensor of the model present and shaped right, none left over.
    Always: each tensor a finite float tensor."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f"{path}: no config.json (expected a BERT-layout folder: config.json, "
                              "model.safetensors or pytorch_model.bin, vocab.txt)")
    with open(cfg_file) as f:
        try:
            cfg = config_from_hf(json.load(f), cfg_file, **config_overrides)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if head == "clm":
        cfg = replace(cfg, causal=True)
    model = {"mlm": LanguageModel, "clm": LanguageModel, None: Encoder}.get(head)
    heads = {"classifier": lambda: SequenceClassifier(cfg, num_labels), "token": lambda: TokenClassifier(cfg, num_labels),
             "span": lambda: SpanExtractor(cfg)}
    model = heads[head]() if head in heads else model(cfg) if model else None
    if model is None:
        raise ValueError(f"head must be 'mlm', 'clm', 'classifier', 'token', 'span' or None, got {head!r}")
    theirs = {re.sub(r"^bert\.", "", k): v for k, v in read_hf_weights(path).items()}
    prefix = "encoder." if head is None else ""
    ours = model.state_dict()
    wanted, source = {}, {}                  # our name -> tensor, and -> its name(s) in the checkpoint
    for name in ours:
        full = prefix + name
        m = re.match(r"encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", full)
        if m:
            parts = [QKV[1].format(i=m.group(1), part=p, p=m.group(2)) for p in ("query", "key", "value")]
            if any(p in theirs for p in parts):
                part_shape = (ours[name].shape[0] // 3, *ours[name].shape[1:])     # (C, C) or (C,)
                for p in parts:
                    if p not in theirs:
                        raise CheckpointError(f"{path}: the checkpoint lacks {p} (its query/key/value siblings are there)")
                    if tuple(theirs[p].shape) != part_shape:
                        raise CheckpointError(f"{path}: {p} has shape {tuple(theirs[p].shape)} in the checkpoint, "
                                              f"the config says {part_shape}")
                    _check_tensor(path, p, theirs[p])
                wanted[name], source[name] = torch.cat([theirs.pop(p) for p in parts], dim=0), parts[0]
            continue
        if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Identity):
            continue
        hf = _hf_name(full)
        if hf in theirs:
            wanted[name], source[name] = theirs.pop(hf), hf
    optional = () if strict else ("pooler.", "classifier.", "qa_outputs.")
    missing = [n for n in ours if n not in wanted and not n.startswith(optional)
               and not isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.Identity)]
    if missing:
        names = [_hf_name(prefix + n) if ".qkv." not in n else n for n in missing]
        hint = " (it has no MLM head: load it with head='classifier' or None)" if any(
            n.startswith("lm_head") for n in missing) else ""
        raise CheckpointError(f"{path}: the checkpoint lacks {', '.join(names[:8])}{hint}")
    # Heads this model does not have (a pooler when loading an LM, an MLM head when loading a classifier)
    # are dropped knowingly; anything else left over means the checkpoint is not what we think it is.
    # A fine-tuned folder (strict) holds exactly its model: any leftover is wrong.
    leftover = sorted(k for k in theirs if not HF_IGNORED.search(k) and (strict or not k.startswith(HF_HEADS)))
    if leftover:
        raise CheckpointError(f"{path}: unexpected keys in the checkpoint: {', '.join(leftover[:8])}"
                              + (" ..." if len(leftover) > 8 else ""))
    for name, t in list(wanted.items()):
        if t.shape != ours[name].shape:
            if name.startswith("classifier.") and not strict:   # a head for another label count: start it afresh
                del wanted[name]
                continue
            raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)} in the checkpoint ({source[name]}), "
                                  f"the model needs {tuple(ours[name].shape)}")
        _check_tensor(path, source[name], t)
    model.load_state_dict(wanted, strict=False)
    return model


def _check_tensor(path, name, t: torch.Tensor):
    """A weight must be a float tensor of finite numbers: an int tensor would be cast silently, a NaN
    would make every answer NaN while the model still loads."""
    if not t.is_floating_point():
        raise CheckpointError(f"{path}: {name} has dtype {str(t.dtype).removeprefix('torch.')}, expected a float tensor")
    if not torch.isfinite(t).all():
        raise CheckpointError(f"{path}: {name} holds non-finite values (NaN or inf)")


def save_hf_bert(model: nn.Module, path: str, tokenizer=None, extra_config: dict | None = None) -> None:
    """Write config.json + model.safetensors (+ the tokenizer) in the BERT layout, atomically per file.
    extra_config: fields added to config.json (a classifier's id2label, label2id, problem_type)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg = hf_config(model.config)
    for kind, arch in ((SequenceClassifier, "BertForSequenceClassification"), (TokenClassifier, "BertForTokenClassification"),
                       (SpanExtractor, "BertForQuestionAnswering")):
        if isinstance(model, kind):
            cfg["architectures"], cfg["num_labels"] = [arch], model.num_labels
    cfg.update(extra_config or {})
    tensors = {("bert." + k if not k.startswith(("cls.", "classifier.", "qa_outputs.")) else k): v.detach().cpu()
               for k, v in to_hf_state_dict(model).items()}
    if "cls.predictions.decoder.weight" in tensors:   # safetensors refuses shared memory: store a copy
        tensors["cls.predictions.decoder.weight"] = tensors["cls.predictions.decoder.weight"].clone()
    with atomic_write(os.path.join(path, "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_write(os.path.join(path, "config.json")) as tmp, open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(path)
