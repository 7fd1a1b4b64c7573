"""Matching Networks (Vinyals et al. 2016, "Matching Networks for One Shot Learning").

A query ``x`` attends over the support set with ``a(x, x_i) = softmax_i(cos(f(x), g(x_i)))``
and its class distribution is the attention-weighted sum of the support labels' one-hots,
``P(y|x, S) = sum_i a(x, x_i) y_i``; training maximises ``log P(y|x, S)`` on the queries.

Full-context embeddings (the paper's bidirectional LSTM ``g`` over the support set and the
attention LSTM ``f``) are **not** implemented: ``f = g = encoder`` (the paper's and most
re-implementations' "no FCE" variant). ``temperature`` (1.0 in the paper) divides the
cosine similarities before the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowlabel.meta.base import EpisodicLearner, MetricMetaMethod

__all__ = ["MatchingNetLearner", "matching_attention", "matchingnet_log_probs", "matchingnet_loss"]


def _cosine(query: torch.Tensor, support: torch.Tensor, temperature: float) -> torch.Tensor:
    q = F.normalize(query.reshape(query.shape[0], -1), dim=1)
    s = F.normalize(support.reshape(support.shape[0], -1), dim=1)
    return (q @ s.T) / temperature  # (Q, S)


def matching_attention(query: torch.Tensor, support: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Attention (Q, S) of every query over the support set: softmax over cosine similarities."""
    return torch.softmax(_cosine(query, support, temperature), dim=1)


def matchingnet_log_probs(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int, temperature: float = 1.0
) -> torch.Tensor:
    """``log P(y=k|x, S) = log sum_{i: y_i = k} a(x, x_i)`` for every query and way: (Q, n_way).

    Computed as ``logsumexp`` of the class's similarities minus that of all similarities,
    which equals the log of the attention-weighted one-hot without forming ``log(0)``-prone
    probabilities. Every way needs a support sample (else its log-probability is -inf).
    """
    sims = _cosine(query, support, temperature)  # (Q, S)
    member = F.one_hot(support_labels.long(), n_way).T.bool()  # (N, S)
    per_class = sims[:, None, :].masked_fill(~member[None], float("-inf"))  # (Q, N, S)
    return torch.logsumexp(per_class, dim=2) - torch.logsumexp(sims, dim=1, keepdim=True)


def matchingnet_loss(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    n_way: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Negative log-likelihood of the query labels under :func:`matchingnet_log_probs`."""
    return F.nll_loss(matchingnet_log_probs(support, support_labels, query, n_way, temperature), query_labels)


class MatchingNetLearner(EpisodicLearner):
    """Encoder + matching head (no full-context embeddings); scores are log-probabilities, so
    the cross-entropy of the base class is exactly the paper's NLL."""

    def __init__(self, encoder: torch.nn.Module | None = None, temperature: float = 1.0) -> None:
        super().__init__(encoder)
        self.temperature = temperature

    def episode_logits(
        self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, n_way: int
    ) -> torch.Tensor:
        return matchingnet_log_probs(support, support_labels, query, n_way, self.temperature)


class MatchingNet(MetricMetaMethod):
    """``meta@matchingnet``: episodic training under the matching head (no full-context embeddings)."""

    def __init__(self, encoder: torch.nn.Module, feature_dim: int, ways: int, temperature: float = 1.0) -> None:
        super().__init__(MatchingNetLearner(encoder, temperature), ways)
