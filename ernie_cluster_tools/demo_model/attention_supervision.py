"""An auxiliary training loss that teaches two attention heads to copy: a previous-token head
and an induction head.

Copying a held-out city into a tool call needs an induction circuit: one head writes each
token's predecessor into its position, a later head attends from the current token to the
place after its earlier occurrence and copies what is there. A small model finds that
circuit only after far more tokens than a CPU trains in half an hour (the plateau is long),
so training also supervises the attention of two heads: layer `previous_layer` head 0 toward
the previous position, layer `induction_layer` head 0, on target tokens, toward the
positions that continue an earlier occurrence of the current token with the token that comes
next. Both patterns are read from the batch's token ids. Only training uses this; the model
and its inference are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ernie_cluster_tools.demo_model.dataset import IGNORE_INDEX


class AttentionSupervision:
    """Hooks that capture the attention inputs of two layers; loss() after each forward."""

    def __init__(
        self, model: torch.nn.Module, previous_layer: int = 0, induction_layer: int | None = None
    ):
        if induction_layer is None:
            induction_layer = len(model.model.layers) - 1
        if not 0 <= previous_layer < induction_layer < len(model.model.layers):
            raise ValueError(
                f"need 0 <= previous_layer ({previous_layer}) < induction_layer "
                f"({induction_layer}) < {len(model.model.layers)} layers"
            )
        self._inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._attention = {}
        self._hooks = []
        for index in (previous_layer, induction_layer):
            attention = model.model.layers[index].self_attn
            self._attention[index] = attention
            self._hooks.append(
                attention.register_forward_hook(self._capture(index), with_kwargs=True)
            )
        self.previous_layer = previous_layer
        self.induction_layer = induction_layer
        self._final_norm = model.model.norm
        self._embeddings = model.model.embed_tokens.weight  # tied with the output head

    def _capture(self, index: int):
        def hook(module, args, kwargs, output) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._inputs[index] = (hidden, kwargs["position_embeddings"])

        return hook

    def loss(
        self, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean of the two heads' cross-entropies against their target positions."""
        lengths = mask.sum(-1)  # [B]
        num_positions = input_ids.shape[1]
        positions = torch.arange(num_positions)
        # previous-token head: every query after the first attends to the position before it
        previous = positions[:, None] - 1 == positions[None, :]  # [T, T]
        previous = previous.unsqueeze(0) & (positions < lengths[:, None]).unsqueeze(-1)  # [B,T,T]
        loss_previous = self._head_loss(self.previous_layer, previous, mask)
        targets = induction_targets(input_ids, labels)
        loss_induction = self._head_loss(self.induction_layer, targets, mask)
        loss_copy = self._copy_loss(input_ids, targets, mask)
        return (loss_previous + loss_induction + loss_copy) / 3

    def _head_loss(self, index: int, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """-log of the attention mass head 0 of layer `index` puts on `targets` [B, Tq, Tk],
        averaged over the queries that have a target."""
        log_probs = head_log_probs(self._attention[index], *self._inputs[index], mask)
        has_target = targets.any(-1)  # [B, T]
        if not has_target.any():
            return log_probs.sum() * 0.0
        # NOTE: only rows with a target: a row of -inf alone would give NaN gradients.
        rows = log_probs[has_target].masked_fill(~targets[has_target], float("-inf"))  # [N, T]
        return -torch.logsumexp(rows, -1).mean()

    def _copy_loss(
        self, input_ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy of the next token from the induction head's output alone, read out
        through the final norm and the tied embeddings: the head must copy what it reads."""
        attention = self._attention[self.induction_layer]
        hidden, position_embeddings = self._inputs[self.induction_layer]
        has_target = targets.any(-1)  # [B, T]
        if not has_target.any():
            return hidden.sum() * 0.0
        head_dim = attention.head_dim
        probs = head_log_probs(attention, hidden, position_embeddings, mask).exp()  # [B, T, T]
        values = F.linear(hidden, attention.v_proj.weight[:head_dim])  # [B, T, D]
        out = F.linear(probs @ values, attention.o_proj.weight[:, :head_dim])  # [B, T, H]
        out = self._final_norm(out[has_target])  # [N, H]
        logits = F.linear(out, self._embeddings)  # [N, V]
        next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)[has_target]  # [N]
        return F.cross_entropy(logits.float(), next_ids)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._inputs.clear()


def induction_targets(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: query q (a position whose next token is a training target) -> key j < q
    with input_ids[j - 1] == input_ids[q] and input_ids[j] == input_ids[q + 1]: the place
    where copying what followed an earlier occurrence gives the right next token."""
    ids = input_ids
    num_positions = ids.shape[1]
    next_ids = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)  # [B, T] token after each query
    prev_ids = torch.cat([ids[:, :1], ids[:, :-1]], dim=1)  # [B, T] token before each key
    same_trigger = ids[:, :, None] == prev_ids[:, None, :]  # [B, Tq, Tk]
    same_next = next_ids[:, :, None] == ids[:, None, :]  # [B, Tq, Tk]
    positions = torch.arange(num_positions)
    earlier = (positions[None, :] <= positions[:, None]) & (positions[None, :] >= 1)  # [Tq, Tk]
    is_target = torch.cat(
        [labels[:, 1:] != IGNORE_INDEX, torch.zeros_like(labels[:, :1], dtype=torch.bool)], dim=1
    )  # [B, T] query q predicts a target token
    return same_trigger & same_next & earlier.unsqueeze(0) & is_target.unsqueeze(-1)


def head_log_probs(
    attention: torch.nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
) -> torch.Tensor:
    """Causal attention log-probabilities [B, T, T] of head 0 of a transformers Ernie4_5_Moe
    attention module, recomputed from its input."""
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import apply_rotary_pos_emb

    head_dim = attention.head_dim
    q = F.linear(hidden, attention.q_proj.weight[:head_dim])  # [B, T, D]
    k = F.linear(hidden, attention.k_proj.weight[:head_dim])  # [B, T, D]
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q.unsqueeze(1), k.unsqueeze(1), cos, sin)  # [B, 1, T, D]
    scores = (q @ k.transpose(-1, -2)).squeeze(1) * attention.scaling  # [B, T, T]
    num_positions = scores.shape[-1]
    causal = torch.ones(num_positions, num_positions, dtype=torch.bool).tril()
    allowed = causal.unsqueeze(0) & mask.bool().unsqueeze(1)  # [B, T, T]
    return torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
