"""The decoder-only transformer shared by Llama, Mistral, Qwen2 and Qwen3, as plain functions.

No `nn.Module`: the model is an `Architecture` plus a `ModelWeights` view, so switching models is
pointing at other tensors. The forward runs on a packed batch (`[tokens, hidden]`): a prefill
packs several prompts back to back, a decode step holds one token per sequence.

Under tensor parallelism (`group` given, see engine/parallel/shards.py) the architecture is one
rank's share and the weights its shard: the embedding and the outputs of the row-parallel o and
down products are summed over the ranks, and the logits of each rank's vocabulary rows gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aegaeon.engine import cpu_kernels
from aegaeon.engine.architecture import Architecture
from aegaeon.engine.attention import AttentionBatch, attention
from aegaeon.engine.parallel.group import RankGroup
from aegaeon.engine.parallel.shards import vocab_range
from aegaeon.engine.weights import LayerWeights, ModelWeights


class Transformer:
    """Runs forward passes of one architecture over whatever weights and KV cache it is handed."""

    def __init__(
        self, arch: Architecture, device: torch.device, dtype: torch.dtype, group: RankGroup | None = None
    ):
        self.arch = arch
        # Only a group of several ranks communicates; a group of one is the plain model.
        self.group = group if group is not None and group.size > 1 else None
        self._vocab = vocab_range(arch.vocab_size, group.shard) if self.group is not None else None
        self._norm_shape = (arch.hidden_size,)
        self._head_norm_shape = (arch.head_dim,)
        # On the CPU, where the C kernels build, the residual add + norm and SiLU * up run as one
        # pass each instead of several small torch ops (the runner takes decode attention from them too).
        self.cpu_kernels = (
            cpu_kernels.LayerKernels(dtype)
            if device.type == "cpu" and cpu_kernels.cpu_kernels_available()
            else None
        )

    def forward(
        self,
        weights: ModelWeights,
        kv_cache: torch.Tensor,
        token_ids: torch.Tensor,
        batch: AttentionBatch,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states, normed, of the tokens `rows` (None: all), in that order.

        Every layer writes the K/V of every token; past the last attention only `rows` are computed
        (in a prefill, the last token of each prompt: the rest feed no logit).
        """
        residual = self._embed(weights, token_ids)  # a fresh tensor: the adds below work in place
        hidden = self._add_rms_norm(residual, None, weights.layers[0].input_norm)
        last = len(weights.layers) - 1
        for i, layer in enumerate(weights.layers):
            if i < last or rows is None:
                hidden = self._attention(layer, hidden, kv_cache, i, batch)
            else:
                hidden = self._attention(layer, hidden, kv_cache, i, batch, rows)
                residual = residual.index_select(0, rows)  # a fresh tensor again
            hidden = self._add_rms_norm(residual, hidden, layer.post_norm)
            hidden = self._mlp(layer, hidden)
            next_norm = weights.layers[i + 1].input_norm if i < last else weights.norm
            hidden = self._add_rms_norm(residual, hidden, next_norm)
        return hidden

    def logits(
        self, weights: ModelWeights, hidden: torch.Tensor, dtype: torch.dtype | None = torch.float32
    ) -> torch.Tensor:
        """Logits `[rows, vocab]` for already-normed hidden states, in `dtype` (None: the weights')."""
        logits = F.linear(hidden, weights.lm_head)
        if self.group is not None:
            # Gathered in float32 (what every backend reduces); values that came from the weights'
            # dtype go back to it exactly.
            logits = self.group.gather_vocab(logits.float(), self.arch.vocab_size)
            if dtype is None:
                dtype = weights.lm_head.dtype
        return logits if dtype is None else logits.to(dtype)

    def _embed(self, weights: ModelWeights, token_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' embeddings; under TP each rank looks up its vocabulary rows, zeros elsewhere."""
        if self.group is None:
            return F.embedding(token_ids, weights.embed)
        start, end = self._vocab
        outside = (token_ids < start) | (token_ids >= end)
        local = (token_ids - start).masked_fill_(outside, 0)
        embedded = F.embedding(local, weights.embed).masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.group.all_reduce(embedded)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel product's output: the ranks' partial sums added up (TP), else as it is."""
        return partial if self.group is None else self.group.all_reduce(partial)

    def _add_rms_norm(
        self, residual: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor
    ) -> torch.Tensor:
        """`residual += x` in place (x None: nothing to add), and the normed residual."""
        if self.cpu_kernels is not None:
            return self.cpu_kernels.add_rms_norm(residual, x, weight, self.arch.rms_norm_eps)
        if x is not None:
            residual.add_(x)
        return F.rms_norm(residual, self._norm_shape, weight, self.arch.rms_norm_eps)

    def _attention(
        self,
        layer: LayerWeights,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        index: int,
        batch: AttentionBatch,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention block's output (after the o projection) for the tokens `rows` (None: all)."""
        arch = self.arch
        tokens = hidden.shape[0]
        qkv = F.linear(hidden, layer.qkv, layer.qkv_bias)
        if layer.q_norm is None:
            # Views of qkv: k and v are adjacent, so they reach the KV cache as one [tokens, 2, ...] view.
            q = qkv[:, : arch.q_size].view(tokens, arch.num_heads, arch.head_dim)
            kv = qkv[:, arch.q_size :].view(tokens, 2, arch.num_kv_heads, arch.head_dim)
        else:
            q, k, v = qkv.split((arch.q_size, arch.kv_size, arch.kv_size), dim=-1)
            q = F.rms_norm(
                q.view(tokens, arch.num_heads, arch.head_dim),
                self._head_norm_shape,
                layer.q_norm,
                arch.rms_norm_eps,
            )
            k = F.rms_norm(
                k.view(tokens, arch.num_kv_heads, arch.head_dim),
                self._head_norm_shape,
                layer.k_norm,
                arch.rms_norm_eps,
            )
            kv = torch.stack((k, v.view(tokens, arch.num_kv_heads, arch.head_dim)), dim=1)
        out = attention(q, kv, kv_cache, index, batch)
        if rows is not None:
            out = out.index_select(0, rows)
        return self._reduce(F.linear(out, layer.o, layer.o_bias))

    def _mlp(self, layer: LayerWeights, hidden: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(hidden, layer.gate_up, layer.gate_up_bias)
        if self.cpu_kernels is not None:
            return self._reduce(F.linear(self.cpu_kernels.silu_mul(gate_up), layer.down, layer.down_bias))
        gate, up = gate_up.chunk(2, dim=-1)
        # In place on the gate_up product, which nothing else holds; mm reads the strided result as is.
        return self._reduce(F.linear(F.silu(gate, inplace=True).mul_(up), layer.down, layer.down_bias))
