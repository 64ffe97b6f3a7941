"""Token-level scheduling as pure logic: no torch, no clocks, no threads, no I/O in the decisions.

Time is always passed in (`now`, seconds) and decisions come back as plain dataclasses, so the live
instance loops and the discrete-event simulator drive the very same classes. See docs/scheduling.md.
"""

from aegaeon.scheduler.decode import (
    DecodeBatch,
    DecodeDispatcher,
    DecodeInstance,
    DecodePlacement,
    DecodeTurn,
    RoundPlan,
    plan_quotas,
)
from aegaeon.scheduler.models import BLOCK_SIZE, ModelSpec, blocks_for_tokens
from aegaeon.scheduler.predictor import Predictor, Profile, ProfileStore, fit_decode, fit_prefill, fit_profile
from aegaeon.scheduler.prefill import (
    PrefillDispatcher,
    PrefillGroup,
    PrefillPlacement,
    PrefillQueue,
    PrefillTask,
)
from aegaeon.scheduler.request import SchedRequest
from aegaeon.scheduler.slo import RequestScore, SLOReport, request_score, slo_report, slo_report_by_model
from aegaeon.scheduler.timeline import EventKind, Timeline, TimelineEvent
from aegaeon.scheduler.turn_loop import TurnLoop

__all__ = [
    "BLOCK_SIZE",
    "DecodeBatch",
    "DecodeDispatcher",
    "DecodeInstance",
    "DecodePlacement",
    "DecodeTurn",
    "EventKind",
    "ModelSpec",
    "PrefillDispatcher",
    "PrefillGroup",
    "PrefillPlacement",
    "PrefillQueue",
    "PrefillTask",
    "Predictor",
    "Profile",
    "ProfileStore",
    "RequestScore",
    "RoundPlan",
    "SLOReport",
    "SchedRequest",
    "Timeline",
    "TimelineEvent",
    "TurnLoop",
    "blocks_for_tokens",
    "fit_decode",
    "fit_prefill",
    "fit_profile",
    "plan_quotas",
    "request_score",
    "slo_report",
    "slo_report_by_model",
]
