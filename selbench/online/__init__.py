"""Online data selection: at every training step, choose which examples of a larger
super-batch the learner trains on (issue 31; ``docs/online.md``).

The contract (:class:`OnlineStrategy`, :class:`SuperBatch`, :func:`validate_choice`) is in
:mod:`selbench.online.contract`, the contrastive losses and JEST's incremental
conditional gains in :mod:`selbench.online.losses`, and the built-in strategies
(``uniform``, ``hard-learner``, ``easy-reference``, ``learnability``, ``jest``) in
:mod:`selbench.online.builtins`. The package is pure: it scores and chooses, and the
harness trains, counts FLOPs and records. The conformance kit every online strategy is
tested with is :mod:`selbench.online.kit` (not imported here: it is for test suites).
"""

from selbench.online.builtins import (
    BUILTIN_ONLINE,
    EasyReference,
    HardLearner,
    Jest,
    Learnability,
    Uniform,
    jest_select,
    make_online,
)
from selbench.online.contract import (
    OnlineParams,
    OnlineStrategy,
    SuperBatch,
    choose_checked,
    parse_online_params,
    validate_choice,
)
from selbench.online.losses import (
    SigmoidGain,
    SoftmaxGain,
    conditional_gain,
    sigmoid_pair_losses,
    softmax_losses,
    subbatch_learnability,
    subset_loss,
)

__all__ = [
    "BUILTIN_ONLINE",
    "EasyReference",
    "HardLearner",
    "Jest",
    "Learnability",
    "OnlineParams",
    "OnlineStrategy",
    "SigmoidGain",
    "SoftmaxGain",
    "SuperBatch",
    "Uniform",
    "choose_checked",
    "conditional_gain",
    "jest_select",
    "make_online",
    "parse_online_params",
    "sigmoid_pair_losses",
    "softmax_losses",
    "subbatch_learnability",
    "subset_loss",
    "validate_choice",
]
