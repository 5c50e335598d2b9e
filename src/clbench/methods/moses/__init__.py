"""MoSEs: Mixtures of SubExperts (Kang, 2025, "Mixtures of SubExperts for Large Language Continual Learning",
arXiv 2511.06237). No public code exists; this is our reading (docs/methods/moses.md says which parts are ours).

Read in this order; imports go one way (layer ← routing ← method):

- ``config.py``  the knobs (``MoSEsConfig``)
- ``layer.py``   ``MoSELinear``: pool of sub-experts, per-task mask / router / scores, the sparse per-input choice
- ``routing.py`` one routed model call: query at the key layer, nearest key, task prompt, decision returned
- ``method.py``  ``MoSEs``: task life cycle, pull constraint, generation, parameter bookkeeping
- ``report.py``  run-folder artifacts (expert usage map, parameter growth)
"""

from clbench.registry import register_method

from .config import MoSEsConfig
from .layer import LayerRoute, MoSELinear
from .method import MoSEs
from .routing import Routed

register_method("moses")(MoSEs)

__all__ = ["LayerRoute", "MoSELinear", "MoSEs", "MoSEsConfig", "Routed"]
