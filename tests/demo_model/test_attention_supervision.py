"""The copy-head supervision: which positions count as induction targets, and that the loss
trains head 0 of two layers toward the previous-token and induction patterns."""

from __future__ import annotations

import torch

from ernie_cluster_tools.demo_model.architecture import demo_config
from ernie_cluster_tools.demo_model.attention_supervision import (
    AttentionSupervision,
    head_log_probs,
    induction_targets,
)
from ernie_cluster_tools.demo_model.dataset import IGNORE_INDEX
from ernie_cluster_tools.demo_model.trainer import init_model

NARROW = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "head_dim": 8}


def test_induction_targets_point_after_the_earlier_occurrence():
    ids = torch.tensor([[5, 7, 9, 4, 5, 7, 9, 0]])
    labels = torch.tensor([[IGNORE_INDEX] * 5 + [7, 9, IGNORE_INDEX]])
    targets = induction_targets(ids, labels)  # [1, 8, 8]
    found = {(q, k) for q, k in targets[0].nonzero().tolist()}
    # query 4 (token 5) predicts 7, found after the 5 at position 0; query 5 (7) predicts 9
    assert found == {(4, 1), (5, 2)}


def test_supervision_loss_falls_and_teaches_a_previous_token_head():
    torch.manual_seed(0)
    model = init_model(demo_config(64, NARROW), seed=0)
    supervision = AttentionSupervision(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 64, (4, 24))
    ids[:, 12:] = ids[:, :12]  # the second half repeats the first
    labels = ids.clone()
    labels[:, :12] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    losses = []
    for _ in range(60):
        model(input_ids=ids, attention_mask=mask)
        loss = supervision.loss(ids, labels, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    model(input_ids=ids, attention_mask=mask)
    attention = model.model.layers[0].self_attn
    hidden, position_embeddings = supervision._inputs[0]
    probs = head_log_probs(attention, hidden, position_embeddings, mask).exp()[0]  # [T, T]
    rows = torch.arange(1, 24)
    assert probs[rows, rows - 1].mean() > 0.8
    supervision.close()
