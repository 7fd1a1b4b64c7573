"""Training methods, in two families that never import each other (an import-linter contract):

- ``lowlabel.methods.ssl``: self-supervised pretraining (``SSLMethod`` subclasses), registry
  ``PRETRAIN_METHODS``;
- ``lowlabel.methods.semisup``: semi-supervised training (``SemisupMethod``: a step function and
  its running statistics), registry ``SEMISUP_REGISTRY``.

Each family keeps its own pure losses. This ``__init__`` runs whenever any method module is
imported, so it imports nothing: the pretrain stage then never loads semi-supervised code, and
DVC does not re-run pretraining when only that code changes (tests/test_dvc_deps.py).
"""
