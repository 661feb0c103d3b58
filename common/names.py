"""Every name list a user can pick from, declared once.

The config schema (``common/config.py``) builds its ``Literal`` types from these tuples; the
method registry, the loss functions, the objective and the aggregator table check themselves
against them (tests hold the registries equal to these lists). Importing this module costs
nothing (no torch).
"""

from __future__ import annotations

#: Trainable methods (``method.name``); ``common/methods`` registers one class per name.
METHODS = ("zeroshot", "lora", "adapter", "coop", "kgcoop", "maple", "layernorm", "bitfit", "linear", "full")
#: Methods whose class text features come from learned prompts (not from a template).
PROMPT_METHODS = ("coop", "kgcoop", "maple")
#: Methods trained on fixed (non-augmented) images, as FedCLIP does; their image embeddings cache.
NO_AUGMENT_METHODS = ("adapter", "linear", "zeroshot")

#: Base losses on class logits (``loss.name``).
CLASSIFICATION_LOSSES = ("ce", "focal", "flsd53")
#: Base losses on image-text pairs (FLYP's contrastive loss; CaRot adds its teacher and constraints).
CONTRASTIVE_LOSSES = ("flyp", "carot")
#: Every base loss (``loss.name``).
BASE_LOSSES = CLASSIFICATION_LOSSES + CONTRASTIVE_LOSSES

#: Text paired with each image by the contrastive losses (``loss.captions``).
CAPTIONS = ("class", "openai-imagenet")

#: Train-time calibration penalties added to the base loss (``loss.penalty``).
PENALTIES = ("none", "mbls", "dca", "mdca", "mmce")
#: MMCE forms (``loss.mmce_form``): the paper's sqrt(MMCE^2 + eps), or the reference code's MMCE^2.
MMCE_FORMS = ("paper", "reference")

#: Server aggregators (``fl.aggregator``); ``server/strategy.py`` maps each to a Flower strategy.
AGGREGATORS = (
    "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    "fedmedian", "fedtrimmedavg", "krum", "feddyn", "fednova",
)

#: Named terms of the local objective, in the order they are summed and reported
#: (``client/objective.py``); each is reported as the train metric ``train-<name>``.
OBJECTIVE_TERMS = ("base-loss", "penalty", "regularizer", "self-distillation", "orthogonality", "cross", "client-term")
