"""Memory policies: which frames the bank keeps (bank policies) and which memory frames a pass
attends to (activation policies). The paper's NAM and SMA are the reference implementations; the
others stand beside them so that memories can be compared on one model (docs/policies.md)."""

from .base import (
    ACTIVATION_POLICIES,
    BANK_POLICIES,
    ActivationPolicy,
    BankCandidates,
    BankPolicy,
    activation_policy_named,
    bank_policy_named,
    register_activation_policy,
    register_bank_policy,
    registered_policy,
    top_k_in_time_order,
)
from .nam import NarrativeAdaptiveMemory, NarrativeAdaptiveMemoryWithoutSink, nam_scores
from .recency import Recency
from .sma import SparseMemoryActivation
from .uniform import UniformKeyframes
from .visual import VisualRelevance

__all__ = [
    "ACTIVATION_POLICIES",
    "BANK_POLICIES",
    "ActivationPolicy",
    "BankCandidates",
    "BankPolicy",
    "NarrativeAdaptiveMemory",
    "NarrativeAdaptiveMemoryWithoutSink",
    "Recency",
    "SparseMemoryActivation",
    "UniformKeyframes",
    "VisualRelevance",
    "activation_policy_named",
    "bank_policy_named",
    "nam_scores",
    "register_activation_policy",
    "register_bank_policy",
    "registered_policy",
    "top_k_in_time_order",
]
