"""Where answers are built: every :class:`Prediction` the router returns, and the
:class:`PredictionUnavailable` it raises when neither side could answer, come from here.

Built with :func:`router.prediction.build` (no re-validation: every value was computed by the
router itself), so the confident hot path stays a few microseconds; every field is given, which
keeps ``build`` on its fast path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from router.effects import CloudReply, LocalResult, RouteRequest
from router.errors import CircuitOpen, PredictionUnavailable, PrivacyViolation
from router.health import EndpointState
from router.policy import Mode
from router.prediction import CloudFailure, EdgeOpinion, Prediction, Reason, Timings, build, build_from
from router.rules import RouteContext, Verdict, after_cloud_failure


def assemble(
    req: RouteRequest,
    local: LocalResult,
    cls: Sequence[int],
    conf: Sequence[float],
    rows: Sequence[list],
    contexts: Sequence[RouteContext],
    verdicts: Sequence[Verdict],
    escalate: Sequence[int],
    reply: Optional[CloudReply],
    answering: Optional[EndpointState],
    attempts: int,
    cloud_error: Optional[BaseException],
    cloud_s: float,
    total_s: float,
) -> list[Prediction]:
    """One prediction per image, in order; raises :class:`PredictionUnavailable` (with the
    other images' answers in ``.partial``) when some image has no answer. ``rows``: the edge's
    probabilities per image as Python lists (the flow converted the batch once)."""
    n = len(verdicts)
    timings = build_from(Timings, {"edge_ms": local.edge_s * 1000.0, "cloud_ms": cloud_s * 1000.0,
                                   "total_ms": total_s * 1000.0})
    if not escalate:
        return _local_answers(req, local, cls, conf, rows, verdicts, timings, cloud_error)
    predictions: list[Prediction] = []
    failed: list[int] = []
    cloud_row = {i: j for j, i in enumerate(escalate)}
    # Why the escalation failed, on every answer that fell back because of it.
    failure = CloudFailure.from_error(cloud_error) if reply is None and cloud_error is not None else None
    for i, verdict in enumerate(verdicts):
        escalated_and_failed = verdict.side == "cloud" and reply is None
        if escalated_and_failed:
            verdict = after_cloud_failure(contexts[i])
        if verdict.side == "none":
            failed.append(i)
            continue
        rid = req.request_id if n == 1 else f"{req.request_id}-{i}"
        if verdict.side == "cloud":
            edge = None
            if local.probs is not None:
                edge = build(EdgeOpinion, label=req.labels[cls[i]], class_index=cls[i], confidence=conf[i],
                             model_version=req.edge_version)
            predictions.append(cloud_answer(req, reply.probs[cloud_row[i]], verdict, reply.model_version, timings,
                                            attempts, rid, answering.endpoint.label, edge))
        else:
            predictions.append(edge_answer(req, cls[i], conf[i], rows[i], verdict, timings,
                                           attempts if i in cloud_row else 0, rid,
                                           failure if escalated_and_failed else None))
    if failed:
        raise unavailable(req, verdicts[failed[0]], local.edge_error, cloud_error, failed, n, predictions)
    return predictions


def _local_answers(req: RouteRequest, local: LocalResult, cls, conf, rows, verdicts, timings: Timings,
                   cloud_error) -> list[Prediction]:
    """:func:`assemble` when no image escalated (a confident, private or local batch): the edge's
    answers, each one dict of values (no per-image call layers or keyword packing)."""
    labels, version, arm, rid = req.labels, req.edge_version, req.arm, req.request_id
    if len(verdicts) == 1 and verdicts[0].side != "none":  # one answered image (the confident hot path): no loop
        verdict, k = verdicts[0], cls[0]
        return [build_from(Prediction, {
            "label": labels[k], "class_index": k, "confidence": conf[0], "probabilities": rows[0], "source": "edge",
            "reason": verdict.reason, "fallback": verdict.fallback, "model_version": version, "timings": timings,
            "attempts": 0, "request_id": rid, "endpoint": None, "edge": None, "cloud_failure": None, "arm": arm,
        })]
    predictions: list[Prediction] = []
    failed: list[int] = []
    one = len(verdicts) == 1
    for i, verdict in enumerate(verdicts):
        if verdict.side == "none":
            failed.append(i)
            continue
        k = cls[i]
        # A dict literal in the schema's field order (see build_from: no keyword packing per image).
        predictions.append(build_from(Prediction, {
            "label": labels[k], "class_index": k, "confidence": conf[i], "probabilities": rows[i], "source": "edge",
            "reason": verdict.reason, "fallback": verdict.fallback, "model_version": version, "timings": timings,
            "attempts": 0, "request_id": rid if one else f"{rid}-{i}", "endpoint": None, "edge": None,
            "cloud_failure": None, "arm": arm,
        }))
    if failed:
        raise unavailable(req, verdicts[failed[0]], local.edge_error, cloud_error, failed, len(verdicts), predictions)
    return predictions


def provisional(req: RouteRequest, local: LocalResult, cls: Sequence[int], conf: Sequence[float],
                rows: Sequence[list], verdicts: Sequence[Verdict], escalate: Sequence[int],
                total_s: float) -> list[Prediction]:
    """A progressive call's first answers: the edge's, before the escalation starts (the rows
    that escalate say ``provisional``; the others already have their final answer)."""
    n = len(verdicts)
    timings = build(Timings, edge_ms=local.edge_s * 1000.0, cloud_ms=0.0, total_ms=total_s * 1000.0)
    refining = set(escalate)
    # A copy of each row: the final answer of the same image may take the list as it is.
    return [edge_answer(req, cls[i], conf[i], rows[i][:], _PROVISIONAL if i in refining else v, timings, 0,
                        req.request_id if n == 1 else f"{req.request_id}-{i}")
            for i, v in enumerate(verdicts)]


_PROVISIONAL = Verdict("edge", Reason.PROVISIONAL)


def refined(first: Prediction, answer: Prediction) -> Prediction:
    """A progressive call's final answer, from the flow's answer for the same image: the cloud's,
    or the first answer standing -- ``refinement_late`` when no answer came in time (the
    escalation timed out), ``refinement_failed`` otherwise, with the failure either way."""
    if answer.source == "cloud":
        return answer
    failure = answer.cloud_failure
    late = failure is not None and failure.category == "timeout"
    return standing(first, Reason.REFINEMENT_LATE if late else Reason.REFINEMENT_FAILED, failure,
                    timings=answer.timings, attempts=answer.attempts)


def standing(first: Prediction, reason: Reason, failure: Optional[CloudFailure], *, timings: Optional[Timings] = None,
             attempts: int = 0, total_s: float = 0.0) -> Prediction:
    """The first answer of a progressive call as its final one. ``fallback`` unless the caller
    cancelled (then nothing failed: the caller stopped waiting). Without ``timings``: the
    first answer's edge time, ``total_s`` in all, the rest counted as cloud time."""
    if timings is None:
        edge_ms, total_ms = first.timings.edge_ms, total_s * 1000.0
        timings = build(Timings, edge_ms=edge_ms, cloud_ms=max(0.0, total_ms - first.timings.total_ms),
                        total_ms=total_ms)
    return build(Prediction, **{**first.__dict__, "reason": reason, "fallback": reason is not Reason.REFINEMENT_CANCELLED,
                                "timings": timings, "attempts": attempts, "cloud_failure": failure})


def edge_answer(req: RouteRequest, k: int, confidence: float, probs: np.ndarray | list, verdict: Verdict,
                timings: Timings, attempts: int, rid: str, cloud_failure: Optional[CloudFailure] = None) -> Prediction:
    """``probs``: one image's probabilities, a list (taken as it is) or an array."""
    return build(
        Prediction, label=req.labels[k], class_index=k, confidence=confidence,
        probabilities=probs if type(probs) is list else probs.tolist(),
        source="edge", reason=verdict.reason, fallback=verdict.fallback, model_version=req.edge_version,
        timings=timings, attempts=attempts, request_id=rid, endpoint=None, edge=None, cloud_failure=cloud_failure,
        arm=req.arm,
    )


def cloud_answer(req: RouteRequest, p: np.ndarray, verdict: Verdict, model_version: str, timings: Timings,
                 attempts: int, rid: str, endpoint: str, edge: Optional[EdgeOpinion]) -> Prediction:
    k = int(p.argmax())
    return build(
        Prediction, label=req.labels[k] if k < len(req.labels) else str(k), class_index=k, confidence=float(p[k]),
        probabilities=p.tolist(), source="cloud", reason=verdict.reason, fallback=verdict.fallback,
        model_version=model_version, timings=timings, attempts=attempts, request_id=rid, endpoint=endpoint, edge=edge,
        cloud_failure=None, arm=req.arm,
    )


def unavailable(req: RouteRequest, verdict: Verdict, edge_error, cloud_error, failed, n, partial) -> Exception:
    where = f"{len(failed)} of {n} images" if n > 1 else "the image"
    if verdict.reason is Reason.PRIVACY and req.mode is Mode.CLOUD_ONLY:
        return PrivacyViolation("cloud_only mode cannot answer under privacy: nothing may leave the device")
    if verdict.reason is Reason.PRIVACY:
        msg = f"the edge model failed on {where} and privacy forbids the cloud: {edge_error}"
    elif req.mode is Mode.EDGE_ONLY:
        msg = f"the edge model failed on {where} in edge_only mode: {edge_error}"
    elif verdict.reason is Reason.ESCALATION_BUDGET:
        msg = (f"no answer for {where}: the escalation budget (cloud.budget) is spent"
               + (f"; edge failed: {edge_error}" if edge_error else "; cloud_only mode has no local answer"))
    elif verdict.reason in (Reason.BREAKER_OPEN, Reason.OFFLINE) and cloud_error is None:
        cloud_error = CircuitOpen(f"no cloud endpoint is usable ({verdict.reason.value})")
        msg = f"no answer for {where}: cloud {verdict.reason.value}" + (f"; edge failed: {edge_error}" if edge_error else "")
    else:
        msg = f"no answer for {where}: cloud failed ({cloud_error})" + (f"; edge failed: {edge_error}" if edge_error else "")
    exc = PredictionUnavailable(msg, edge_error=edge_error, cloud_error=cloud_error)
    exc.partial = partial  # answers for the other images of a batch are not lost
    return exc
