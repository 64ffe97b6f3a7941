"""Batched weighted round-robin decode: dispatch of prefilled requests and per-instance round plans.

Each round, batch i (one model) gets a turn of q_i seconds of decode steps. With d_i the predicted
step time, n_i = TBT_i / d_i, c the round's switch overhead and S = Σ 1/n_i:

    α   = max(c / (min_i n_i · QMAX) + S, min(alpha_floor, S / (1 − max_switch_share)))
    q_i = c / (n_i · (α − S))

so every batch emits q_i / d_i = c / (TBT_i · (α − S)) tokens per round (the same number when the
TBTs agree) and the mean token gap, round length / tokens = (c + Σ q_i) / (q_i / d_i), is α · TBT_i.

The round lasts c + Σ q_i = c · α / (α − S), so switches take (α − S) / α of it. The paper's floor
(α ≥ 0.5) shortens turns when switching is cheap; with a resident model's few-ms switch it would
shrink them to one or two steps, each paying a KV swap in and out, and spend half the round on
switching. So the floor gives way where it would push that share above `max_switch_share`: α is
then at most S / (1 − max_switch_share), a minimum quota that keeps swaps a small part of each turn.

QMAX per round (`qmax_max_s` set): when switches are slow, QMAX turns may leave α > 1 (the round
misses the TBT SLO); the round then takes the smallest QMAX in [qmax_s, qmax_max_s] that brings α
to 1, c · max_i(1/n_i) / (1 − S), so longer turns amortise the switches.

Edge cases (c = 0: nothing to amortise, the formula is 0/0 or gives zero quotas):
- one batch, c = 0: it runs alone with quota QMAX (α = S = d / TBT, its plain step ratio) and the plan
  is `open_ended`: the turn also ends as soon as the instance's batches change, so a newcomer never
  waits a whole QMAX for its first turn.
- several batches, c = 0 (one model split by KV, or only resident models): the limit of the formula
  as c -> 0 without the floor, q_i = QMAX · (min_j n_j) / n_i (the slowest batch gets QMAX, tokens
  per round still equal where TBTs agree); long turns amortise the KV swaps. The mean gap is then
  S · TBT_i, so the plan reports α = S (the floor does not apply: shorter turns would buy nothing
  but more swaps).
- c > 0 always gives α > S (the first term is positive), so α − S never vanishes.

Priorities: with models of unequal priority w_i, batch i is planned as if its TBT SLO were
TBT_i · max_j w_j / w_i, so the highest-priority batches keep their plan and the others get
proportionally shorter turns (a smaller share of the round; the round, shorter, comes round to the
high-priority batches sooner). The starvation bound: each batch waits c + Σ_{j≠i} q_j between its
turns; if the weighted plan keeps a batch waiting longer than its TTFT SLO, and longer than the
unweighted plan would, the round is planned unweighted. Equal priorities plan exactly as above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aegaeon.config import SchedulerConfig
from aegaeon.scheduler.models import ModelSpec, blocks_for_tokens
from aegaeon.scheduler.predictor import Predictor
from aegaeon.scheduler.request import SchedRequest

# A predictor may say a step is free (its fit clamped at 0); n_i = TBT / d_i would then be infinite.
# A microsecond is far below any real decode step, so flooring d_i there changes no real plan.
MIN_STEP_S = 1e-6


def kv_tokens_needed(request: SchedRequest, lookahead: int, max_model_len: int) -> int:
    """Tokens of KV to reserve: context plus lookahead, never past the request's or model's last token."""
    return min(request.context_len + lookahead, request.final_len, max_model_len)


def kv_bytes_needed(spec: ModelSpec, requests: Sequence[SchedRequest], lookahead: int) -> int:
    """Bytes of KV the requests of one batch need, each rounded up to whole blocks."""
    blocks = sum(blocks_for_tokens(kv_tokens_needed(r, lookahead, spec.max_model_len)) for r in requests)
    return blocks * spec.kv_block_bytes


@dataclass(eq=False)
class DecodeBatch:
    """Requests of one model decoded together."""

    model: str
    requests: list[SchedRequest] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass(frozen=True)
class RoundPlan:
    """One round of an instance: batches in order, each with its turn's quota, and the numbers behind it."""

    batches: tuple[DecodeBatch, ...]
    quotas_s: tuple[float, ...]
    step_s: tuple[float, ...]  # d_i: predicted seconds of one decode step of batch i
    n: tuple[float, ...]  # n_i = TBT_i / d_i: steps batch i can afford per TBT (as planned: weighted)
    tbt_s: tuple[float, ...]  # each batch's TBT SLO
    # Batch i needs a model switch before its turn (its model differs from the previous batch's,
    # cyclically: batch 0 follows the last batch of the previous round).
    switch_before: tuple[bool, ...]
    tokens_per_round: tuple[float, ...]  # q_i / d_i: tokens each batch emits in a round (formula)
    # α · TBT_i (TBT_i as planned: weighted): expected mean gap between batch i's tokens
    token_gap_s: tuple[float, ...]
    alpha: float
    c: float
    s: float
    # Swap each batch's KV out at the end of its turn: only when the round has more than one batch.
    swap_out: bool
    # One batch and nothing to amortise: its turn also ends when the instance's batches change.
    open_ended: bool

    def __len__(self) -> int:
        return len(self.batches)

    @classmethod
    def empty(cls) -> RoundPlan:
        return cls((), (), (), (), (), (), (), (), 0.0, 0.0, 0.0, False, False)


def round_qmax(c: float, s: float, max_inv_n: float, config: SchedulerConfig) -> float:
    """QMAX of one round: `qmax_s`, or with `qmax_max_s` the smallest value up to it that keeps α ≤ 1."""
    if config.qmax_max_s is None or c * max_inv_n / config.qmax_s + s <= 1.0:
        return config.qmax_s
    if s >= 1.0:
        return config.qmax_max_s  # the steps alone miss the TBT: amortise the switches all it can
    return min(c * max_inv_n / (1.0 - s), config.qmax_max_s)


def plan_quotas(
    step_s: Sequence[float], tbt_s: Sequence[float], c: float, config: SchedulerConfig
) -> tuple[list[float], float, float, list[float]]:
    """The formula alone: (quotas q_i, alpha, S, n_i) for batches with step times d_i and TBTs."""
    if len(step_s) != len(tbt_s):
        raise ValueError("step_s and tbt_s differ in length")
    if not step_s:
        return [], 0.0, 0.0, []
    if c < 0:
        raise ValueError(f"switch overhead c must be >= 0, got {c}")
    d = [max(x, MIN_STEP_S) for x in step_s]
    inv_n = [di / t for di, t in zip(d, tbt_s, strict=True)]  # 1 / n_i, finite
    n = [1.0 / x for x in inv_n]
    s = sum(inv_n)
    max_inv_n = max(inv_n)  # 1 / min_i n_i: the slowest batch
    qmax = round_qmax(c, s, max_inv_n, config)
    excess = c * max_inv_n / qmax  # α − S before the floor
    alpha = excess + s
    # The floor, lowered where it would spend more than max_switch_share of the round switching.
    floor = min(config.alpha_floor, s / (1.0 - config.max_switch_share))
    if c > 0 and alpha < floor:
        alpha, excess = floor, floor - s
        return [c * x / excess for x in inv_n], alpha, s, n
    # Floor not binding: q_i = c / (n_i · c / (min n · QMAX)) = QMAX · (min n) / n_i. c cancels, so
    # this form keeps full precision for a tiny c and is also the c = 0 rule (module docstring).
    return [qmax * x / max_inv_n for x in inv_n], alpha, s, n


class DecodeInstance:
    """One decode-capable instance: its batches, KV capacity, and the plan of each round."""

    def __init__(
        self,
        name: str,
        kv_capacity_bytes: int,
        specs: Mapping[str, ModelSpec],
        predictor: Predictor,
        config: SchedulerConfig,
        max_batch_size: int | None = None,
    ) -> None:
        if kv_capacity_bytes < 1:
            raise ValueError(f"kv_capacity_bytes must be >= 1, got {kv_capacity_bytes}")
        self.name = name
        self.kv_capacity_bytes = kv_capacity_bytes
        self.specs = dict(specs)
        self.predictor = predictor
        self.config = config
        # The engine's max_num_seqs, if it caps a batch.
        self.max_batch_size = max_batch_size
        self.batches: list[DecodeBatch] = []
        # The batches changed since the last plan (a request joined, a batch started or emptied).
        self.changed = False

    def __len__(self) -> int:
        """Requests held."""
        return sum(len(b) for b in self.batches)

    def requests(self) -> list[SchedRequest]:
        return [r for b in self.batches for r in b.requests]

    def fits(self, model: str, requests: Sequence[SchedRequest]) -> bool:
        """Whether one batch of these requests fits: KV with the lookahead, and the batch-size cap."""
        if self.max_batch_size is not None and len(requests) > self.max_batch_size:
            return False
        needed = kv_bytes_needed(self.specs[model], requests, self.config.kv_lookahead_tokens)
        return needed <= self.kv_capacity_bytes

    def can_join(self, batch: DecodeBatch, request: SchedRequest) -> bool:
        return batch.model == request.model and self.fits(batch.model, [*batch.requests, request])

    def join(self, batch: DecodeBatch, request: SchedRequest) -> None:
        batch.requests.append(request)
        self.changed = True

    def new_batch(self, request: SchedRequest) -> DecodeBatch:
        batch = DecodeBatch(request.model, [request])
        self.batches.append(batch)
        self.changed = True
        return batch

    def remove(self, request: SchedRequest) -> bool:
        """Drop a request (finished, failed or moved); True if it was here."""
        for batch in self.batches:
            if request in batch.requests:
                batch.requests.remove(request)
                if not batch.requests:
                    self.batches.remove(batch)
                self.changed = True
                return True
        return False

    def drop_done(self) -> list[SchedRequest]:
        """Remove every finished or failed request and return them."""
        done = [r for r in self.requests() if r.done]
        for request in done:
            self.remove(request)
        return done

    def repack(self) -> list[DecodeBatch]:
        """Re-pack all requests FCFS into per-model batches that fit, models ordered by their oldest request.

        Adjacent batches of one model then share one switch. A request that does not fit even alone
        (its context grew) still gets a batch of its own: it cannot be dropped here.
        """
        # Stable sort: equal arrivals keep their current order, so the packing is deterministic.
        ordered = sorted(self.requests(), key=lambda r: r.arrival_s)
        by_model: dict[str, list[DecodeBatch]] = {}  # insertion order = order of each model's oldest
        for request in ordered:
            batches = by_model.setdefault(request.model, [])
            if batches and self.fits(request.model, [*batches[-1].requests, request]):
                batches[-1].requests.append(request)
            else:
                batches.append(DecodeBatch(request.model, [request]))
        self.batches = [b for batches in by_model.values() for b in batches]
        return self.batches

    def weighted_tbt(self, batches: Sequence[DecodeBatch], tbt: list[float]) -> list[float]:
        """The TBT each batch is planned with: its SLO's, loosened by max priority / its priority."""
        weights = [self.config.priority(b.model) for b in batches]
        top = max(weights)
        # The top-priority batches keep their TBT exactly (equal priorities plan as without them).
        return [t if w == top else t * (top / w) for t, w in zip(tbt, weights, strict=True)]

    def starves(
        self, batches: Sequence[DecodeBatch], quotas: Sequence[float], unweighted: Sequence[float], c: float
    ) -> bool:
        """Whether the weighted quotas keep some batch waiting for its turn past its TTFT SLO, and
        longer than the unweighted ones would."""
        weighted_round, unweighted_round = c + sum(quotas), c + sum(unweighted)
        for batch, quota, plain in zip(batches, quotas, unweighted, strict=True):
            wait = weighted_round - quota
            if wait > self.config.slo(batch.model).ttft_s and wait > unweighted_round - plain:
                return True
        return False

    def plan_round(self, overhead_s: float = 0.0, switch_s: Mapping[str, float] | None = None) -> RoundPlan:
        """Drop finished requests, re-pack, and plan the round's turns.

        `overhead_s`: other non-decode seconds in each round (a colocated instance's prefill groups,
        their switches included); it adds to c. `switch_s`: per-model switch seconds overriding the
        predictor's (e.g. 0 for a model that stays resident on the device).
        """
        self.drop_done()
        batches = self.repack()
        self.changed = False
        if not batches:
            return RoundPlan.empty()
        models = list(dict.fromkeys(b.model for b in batches))
        multi_model = len(models) > 1

        def switch_cost(model: str) -> float:
            if switch_s is not None and model in switch_s:
                return switch_s[model]
            return self.predictor.switch_s(model)

        # One model: it stays loaded, no switch. Several: each model is switched in once per round.
        c = overhead_s + (sum(switch_cost(m) for m in models) if multi_model else 0.0)
        step = [
            max(self.predictor.decode_s(b.model, [r.context_len for r in b.requests]), MIN_STEP_S)
            for b in batches
        ]
        tbt = [self.config.slo(b.model).tbt_s for b in batches]
        planned_tbt = self.weighted_tbt(batches, tbt)
        quotas, alpha, s, n = plan_quotas(step, planned_tbt, c, self.config)
        if planned_tbt != tbt:
            unweighted = plan_quotas(step, tbt, c, self.config)
            if self.starves(batches, quotas, unweighted[0], c):
                (quotas, alpha, s, n), planned_tbt = unweighted, tbt
        switch_before = tuple(multi_model and b.model != batches[i - 1].model for i, b in enumerate(batches))
        return RoundPlan(
            batches=tuple(batches),
            quotas_s=tuple(quotas),
            step_s=tuple(step),
            n=tuple(n),
            tbt_s=tuple(tbt),
            switch_before=switch_before,
            tokens_per_round=tuple(q / d for q, d in zip(quotas, step, strict=True)),
            token_gap_s=tuple(alpha * t for t in planned_tbt),
            alpha=alpha,
            c=c,
            s=s,
            swap_out=len(batches) > 1,
            open_ended=len(batches) == 1 and c == 0,
        )


@dataclass
class DecodeTurn:
    """The quota clock of one batch's turn. It starts after the turn's first step, so the switch,
    the swap-in and that first step (which may wait for KV to land) are not charged."""

    quota_s: float
    open_ended: bool = False
    steps: int = 0
    clock_start_s: float | None = None

    @classmethod
    def of(cls, plan: RoundPlan, index: int) -> DecodeTurn:
        return cls(plan.quotas_s[index], plan.open_ended)

    def step_done(self, now: float) -> None:
        """A decode step of this batch ended at `now`."""
        self.steps += 1
        if self.clock_start_s is None:
            self.clock_start_s = now

    def should_continue(self, now: float, batches_changed: bool = False) -> bool:
        """Run another step? Always the first; then while the quota lasts. An open-ended turn (a lone
        batch) also ends when the instance's batches changed, so the round is planned again."""
        if self.clock_start_s is None:
            return True
        if self.open_ended and batches_changed:
            return False
        return now - self.clock_start_s < self.quota_s


@dataclass(frozen=True)
class DecodePlacement:
    request: SchedRequest
    instance: int  # index into the dispatcher's instances
    batch: DecodeBatch
    new_batch: bool


class DecodeDispatcher:
    """Places prefilled requests: into a same-model batch that still fits, else a new batch on the
    instance with the fewest batches."""

    def __init__(self, instances: Sequence[DecodeInstance]) -> None:
        if not instances:
            raise ValueError("a decode dispatcher needs at least one instance")
        self.instances = list(instances)

    def dispatch(self, request: SchedRequest) -> DecodePlacement | None:
        """Place `request`; None when no instance could hold it even alone (the caller fails it)."""
        # First fit, instances and batches in order: deterministic, and it fills batches before
        # opening new ones (every extra batch costs a turn in its instance's round).
        for index, instance in enumerate(self.instances):
            for batch in instance.batches:
                if instance.can_join(batch, request):
                    instance.join(batch, request)
                    return DecodePlacement(request, index, batch, new_batch=False)
        candidates = [i for i, inst in enumerate(self.instances) if inst.fits(request.model, [request])]
        if not candidates:
            return None
        index = min(candidates, key=lambda i: (len(self.instances[i].batches), len(self.instances[i]), i))
        batch = self.instances[index].new_batch(request)
        return DecodePlacement(request, index, batch, new_batch=True)
