"""The sequential backbones: BERT4Rec, SASRec, GRU4Rec and NARM, as rating predictors.

Shared contract (the inner loop relies on every point):
- `forward(item_ids[B, L]) -> [B, L]`: a predicted normalised rating (stars / 5) for every position, in
  (0.1, 1.1) with the plain head, unbounded with the bias head. Windows are left-padded with item id 0;
  ratings are never an input.
- `item_embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)`. The inner loop replaces its weight
  (through `torch.func.functional_call`) by a small per-task table holding only the rows a task uses, with
  remapped ids, so `forward` never depends on the number of rows.
- The output layer is `head = nn.Linear(width, 1)`, giving the logits of every position: the bias head
  zeroes it at the start and `--inner_params=head` adapts only it (ANIL). `models.check_contract` refuses
  a backbone without either part when it is built.
- Padding never leaks: outputs at real positions do not depend on the padding row or on padded positions.
  An all-padding window gives finite outputs and gradients.
- Second-order gradients and `torch.func.vmap` work everywhere (see `layers.py` for why no fused layers).
"""
from dataclasses import dataclass

import torch
from torch import nn

from common.flag_types import depth, non_negative_float, width

from .heads import PlainHead
from .layers import GRU, Dropout, LayerNorm, Linear, TransformerBlock, attention_bias


@dataclass(frozen=True)
class Flag:
    """A flag a backbone declares: `--<name>`, its argparse type, default and help. `shape`: it shapes the
    checkpoint (a size: other values are refused on resume and test); else only training (dropout)."""
    name: str
    type: object
    default: object
    help: str
    shape: bool = True


class Backbone(nn.Module):
    """Base class: the registry name, the item count, `from_args` to build from parsed flags, its own flag
    checks, and the rating head (`rating_head`, a models.heads class: plain until `model_factory` attaches
    the one --rating_head names) that turns the network's head logits into a normalised rating."""

    name = None          # the registry name, --model=<name>
    display_name = None  # in tables and figures
    flags = ()           # its own flags (Flag), added to every script's parser

    def __init__(self, num_items):
        super().__init__()
        self.num_items = num_items
        self.rating_head = PlainHead()

    @classmethod
    def from_args(cls, args, num_items):
        raise NotImplementedError

    @classmethod
    def check_flags(cls, args):
        """A one-line message for a combination of its flags that cannot be built, or None (options.validate
        shows it as a flag error)."""
        return None

    def rating_output(self, logits, item_ids):
        """The normalised rating [B, L] at every position from the head's logits [B, L]."""
        return self.rating_head.output(self, logits, item_ids)


class _Transformer(Backbone):
    """Item + learned position embeddings, transformer blocks, a final LayerNorm and a linear head.

    Subclasses choose `causal`: bidirectional (BERT4Rec) or each position seeing only itself and the
    past (SASRec). Padding keys are always masked out of attention.
    """

    causal = False

    def __init__(self, num_items, max_len=30, hidden=32, num_blocks=2, num_heads=4, dropout=0.1):
        super().__init__(num_items)
        self.max_len = max_len
        self.item_embedding = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.position_embedding = nn.Parameter(torch.empty(max_len, hidden))
        self.embedding_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(hidden, num_heads, dropout) for _ in range(num_blocks))
        self.final_norm = LayerNorm(hidden)
        self.head = Linear(hidden, 1)
        self._init_weights()

    flags = (Flag("bert_num_blocks", depth, 2, "transformer blocks"),
             Flag("bert_num_heads", depth, 4, "attention heads"),
             Flag("bert_hidden_units", width, 32, "hidden size"),
             Flag("bert_dropout", non_negative_float, 0.1, "dropout", shape=False))

    @classmethod
    def from_args(cls, args, num_items):
        return cls(num_items, max_len=args.max_seq_len, hidden=args.bert_hidden_units,
                   num_blocks=args.bert_num_blocks, num_heads=args.bert_num_heads, dropout=args.bert_dropout)

    @classmethod
    def check_flags(cls, args):
        if not args.bert_dropout < 1.0:
            return f"--bert_dropout must be in [0, 1), got {args.bert_dropout}"
        if args.bert_hidden_units % args.bert_num_heads:
            return (f"--bert_hidden_units ({args.bert_hidden_units}) must be divisible by --bert_num_heads "
                    f"({args.bert_num_heads})")
        return None

    def _init_weights(self):
        # BERT's initialisation: small truncated normals, zero biases, identity LayerNorms.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.item_embedding.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.position_embedding, std=0.02, a=-0.04, b=0.04)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def forward(self, item_ids):
        length = item_ids.shape[-1]
        if length > self.max_len:
            raise ValueError(f"window length {length} exceeds the model's max_len {self.max_len}")
        real = item_ids > 0  # [B, L]
        # Positions count back from the right end: windows are left-padded, so the latest item always has
        # the same position embedding, whatever the window's length or amount of padding.
        x = self.item_embedding(item_ids) + self.position_embedding[self.max_len - length:]
        x = self.embedding_dropout(x)
        allowed = real.unsqueeze(-2).unsqueeze(-2)  # [B, 1 (heads), 1 (queries), L (keys)]
        if self.causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=item_ids.device).tril()
        # Every query may also see itself. For real queries that changes nothing (a real key, never later);
        # a padded query would otherwise have no key at all and average uniformly over every position,
        # later items included, which breaks causality at padded positions.
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=item_ids.device)
        bias = attention_bias(allowed, x.dtype)  # once for every block
        for block in self.blocks:
            x = block(x, bias)
        return self.rating_output(self.final_norm.project(x, self.head).squeeze(-1), item_ids)


class BERT4Rec(_Transformer):
    """BERT4Rec: bidirectional transformer, every position sees the whole (real part of the) window."""

    name, display_name = "bert4rec", "BERT4Rec"
    causal = False


class SASRec(_Transformer):
    """SASRec: the same blocks with causal attention, so a position never sees a later item."""

    name, display_name = "sasrec", "SASRec"
    causal = True


class GRU4Rec(Backbone):
    """GRU4Rec: item embedding, a stacked GRU, a linear head on the state at every position."""

    name, display_name = "gru4rec", "GRU4Rec"
    flags = (Flag("gru4rec_embedding_dim", width, 32, "item embedding size"),
             Flag("gru4rec_hidden_size", width, 32, "GRU hidden size"),
             Flag("gru4rec_n_layers", depth, 2, "GRU layers"))

    def __init__(self, num_items, embedding_dim=32, hidden_size=32, num_layers=2):
        super().__init__(num_items)
        # nn.Embedding's N(0, 1) initialisation: the GRU has no LayerNorm, so its inputs need unit scale.
        self.item_embedding = nn.Embedding(num_items + 1, embedding_dim, padding_idx=0)
        self.gru = GRU(embedding_dim, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, 1)

    @classmethod
    def from_args(cls, args, num_items):
        return cls(num_items, embedding_dim=args.gru4rec_embedding_dim, hidden_size=args.gru4rec_hidden_size,
                   num_layers=args.gru4rec_n_layers)

    def forward(self, item_ids):
        states = self.gru(self.item_embedding(item_ids), item_ids > 0)
        return self.rating_output(self.head(states).squeeze(-1), item_ids)


class NARM(Backbone):
    """NARM: a GRU encoder with NARM's attention, evaluated causally at every position t.

    Global encoding c_g = h_t; local encoding c_l = Σ_{j ≤ t, j real} α_tj h_j with
    α_tj = vᵀ σ(A1 h_t + A2 h_j) (unnormalised, as in NARM); the head reads [c_g; c_l].
    """

    name, display_name = "narm", "NARM"
    flags = (Flag("narm_embedding_dim", width, 32, "item embedding size"),
             Flag("narm_hidden_size", width, 32, "GRU hidden size"),
             Flag("narm_n_layers", depth, 1, "GRU layers"))

    def __init__(self, num_items, embedding_dim=32, hidden_size=32, num_layers=1):
        super().__init__(num_items)
        self.item_embedding = nn.Embedding(num_items + 1, embedding_dim, padding_idx=0)
        self.gru = GRU(embedding_dim, hidden_size, num_layers)
        self.attention_query = nn.Linear(hidden_size, hidden_size, bias=False)  # A1
        self.attention_key = nn.Linear(hidden_size, hidden_size, bias=False)  # A2
        self.attention_score = nn.Linear(hidden_size, 1, bias=False)  # v
        self.head = nn.Linear(2 * hidden_size, 1)

    @classmethod
    def from_args(cls, args, num_items):
        return cls(num_items, embedding_dim=args.narm_embedding_dim, hidden_size=args.narm_hidden_size,
                   num_layers=args.narm_n_layers)

    def forward(self, item_ids):
        real = item_ids > 0
        states = self.gru(self.item_embedding(item_ids), real)  # [B, L, H]
        length = item_ids.shape[-1]
        # α_tj only for the causal pairs j ≤ t: the [pairs, H] sigmoid is NARM's costliest step, and the
        # pairs j > t (about half of L × L) would be masked anyway.
        rows, cols = torch.tril_indices(length, length, device=item_ids.device)  # pairs (t, j), j ≤ t
        # A1 h_t + A2 h_j for every pair as one matmul with a constant 0/1 matrix (exact: a row picks one
        # query and one key). An index gather's backward is an accumulating index_put_, serial on the CPU:
        # NARM's meta-training iteration took 1.7x as long with it.
        eye = torch.eye(length, dtype=states.dtype, device=states.device)
        select = torch.cat([eye[rows], eye[cols]], dim=-1)  # [pairs, 2L]
        pre = torch.matmul(select, torch.cat([self.attention_query(states), self.attention_key(states)], dim=-2))
        pair_alpha = self.attention_score(torch.sigmoid(pre)).squeeze(-1)  # [B, pairs]
        pair_alpha = torch.where(real[..., cols], pair_alpha, 0.0)  # padded h_j never contributes
        # Scatter into a [B, L, L] matrix, zero above the diagonal, so one matmul gives c_l for every t.
        # (zeros_like keeps the vmap batch dim; pair_alpha's dtype, which autocast may have lowered)
        alpha = torch.zeros_like(states[..., 0], dtype=pair_alpha.dtype).repeat_interleave(length, dim=-1)
        alpha = alpha.index_add(-1, rows * length + cols, pair_alpha).unflatten(-1, (length, length))
        local = torch.matmul(alpha, states)  # [B, L, H]
        return self.rating_output(self.head(torch.cat([states, local], dim=-1)).squeeze(-1), item_ids)
