"""The sans-I/O decision core, re-exported from where each part lives:

* :mod:`router.rules` -- the rule table (:func:`decide` over a :class:`RouteContext`);
* :mod:`router.effects` -- the effect types and the request/outcome records;
* :mod:`router.flow` -- :func:`route`, one request as a generator of effects;
* :mod:`router.answers` -- where predictions (and ``PredictionUnavailable``) are built.

Kept so ``from router.decision import ...`` goes on working.
"""

from router.answers import assemble, cloud_answer, edge_answer, unavailable
from router.effects import (
    CloudCall,
    CloudReply,
    Effect,
    LocalResult,
    LocalWork,
    RouteOutcome,
    RouteRequest,
    Sleep,
)
from router.flow import route
from router.rules import (
    EDGE_CONFIDENT,
    EDGE_PRIVACY,
    RULES,
    BatchContexts,
    EndpointView,
    RouteContext,
    Verdict,
    after_cloud_failure,
    budget_rule,
    confident_rule,
    connectivity_rule,
    decide,
    decide_each,
    edge_only_rule,
    escalate_rule,
    order_endpoints,
    privacy_rule,
)

__all__ = [
    "EDGE_CONFIDENT", "EDGE_PRIVACY", "RULES", "BatchContexts", "CloudCall", "CloudReply", "Effect", "EndpointView", "LocalResult",
    "LocalWork", "RouteContext", "RouteOutcome", "RouteRequest", "Sleep", "Verdict", "after_cloud_failure",
    "assemble", "budget_rule", "cloud_answer", "confident_rule", "connectivity_rule", "decide", "decide_each", "edge_answer",
    "edge_only_rule", "escalate_rule", "order_endpoints", "privacy_rule", "route", "unavailable",
]
