"""``meta.methods`` name -> :class:`~lowlabel.meta.base.MetaMethod` class; built as
``cls(encoder, feature_dim, ways, **settings)`` with the method's section of ``meta``."""

from __future__ import annotations

from lowlabel.meta.base import MetaMethod
from lowlabel.meta.maml import MAMLMethod
from lowlabel.meta.matchingnet import MatchingNet
from lowlabel.meta.protonet import ProtoNet
from lowlabel.meta.relationnet import RelationNet
from lowlabel.meta.reptile import ReptileMethod

META_METHODS: dict[str, type[MetaMethod]] = {
    "protonet": ProtoNet,
    "matchingnet": MatchingNet,
    "relationnet": RelationNet,
    "maml": MAMLMethod,
    "reptile": ReptileMethod,
}
