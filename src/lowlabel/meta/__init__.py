"""Episodic meta-learning (issue 16): episodes, metric learners and optimisation-based meta-learners.

* :mod:`lowlabel.meta.episodes`: the episodic batch and the per-rank, per-step episode sampler.
* :mod:`lowlabel.meta.protonet` (Snell et al. 2017), :mod:`lowlabel.meta.matchingnet`
  (Vinyals et al. 2016) and :mod:`lowlabel.meta.relationnet` (Sung et al. 2018): losses as
  functions of (support features, support labels, query features) and an
  :class:`EpisodicLearner` each.
* :class:`MetaMethod`: what the ``meta@<method>`` loop trains, one class per method
  (:mod:`lowlabel.meta.registry`), with explicit gradient averaging over workers.
* :mod:`lowlabel.meta.maml` (Finn et al. 2017; FO-MAML; Meta-SGD's learnable inner rates) and
  :mod:`lowlabel.meta.reptile` (Nichol et al. 2018), functional over any ``nn.Module``.
"""

from lowlabel.meta.base import EpisodicLearner, MetaMethod, MetricMetaMethod, preserved_buffers
from lowlabel.meta.episodes import EpisodeSampler, EpisodicBatch, episode_seed, load_episode
from lowlabel.meta.maml import MAML, MAMLMethod, adapt, average_gradients, meta_batch_loss, meta_loss
from lowlabel.meta.matchingnet import (
    MatchingNet,
    MatchingNetLearner,
    matching_attention,
    matchingnet_log_probs,
    matchingnet_loss,
)
from lowlabel.meta.protonet import ProtoNet, ProtoNetLearner, class_prototypes, protonet_logits, protonet_loss
from lowlabel.meta.relationnet import (
    RelationMLP,
    RelationModule,
    RelationNet,
    RelationNetLearner,
    relation_loss,
    relation_scores,
)
from lowlabel.meta.reptile import ReptileMethod, reptile_adapt, reptile_delta, reptile_set_grads, reptile_step

__all__ = [
    "MAML",
    "EpisodeSampler",
    "EpisodicBatch",
    "EpisodicLearner",
    "MAMLMethod",
    "MatchingNet",
    "MatchingNetLearner",
    "MetaMethod",
    "MetricMetaMethod",
    "ProtoNet",
    "ProtoNetLearner",
    "RelationMLP",
    "RelationModule",
    "RelationNet",
    "RelationNetLearner",
    "ReptileMethod",
    "adapt",
    "average_gradients",
    "class_prototypes",
    "episode_seed",
    "load_episode",
    "matching_attention",
    "matchingnet_log_probs",
    "matchingnet_loss",
    "meta_batch_loss",
    "meta_loss",
    "preserved_buffers",
    "protonet_logits",
    "protonet_loss",
    "relation_loss",
    "relation_scores",
    "reptile_adapt",
    "reptile_delta",
    "reptile_set_grads",
    "reptile_step",
]
