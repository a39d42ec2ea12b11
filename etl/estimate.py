"""`etl estimate` (and `etl submit --dry-run`): what sending the queue would cost, with nothing claimed or sent.

The queued rows are read in claim order (nothing locked), turned into requests exactly as the submitter
builds them (so rejects are counted, not priced), split into batches by the submitter's limits, and
priced per task and model by `etl.budget`: input tokens from the local estimate (4 characters a token),
output at `max_tokens` (an upper bound), the cached system prompt as one write per batch and reads for
the rest. Memory does not grow with the queue: rows are streamed and only per-task sums are kept.

With `count_tokens=True` a random sample of the requests (reservoir sampling, `submit.count_tokens_sample`)
is sent to the API's free `POST /v1/messages/count_tokens`; input tokens are then the local estimate
scaled by the sample's ratio, with a confidence interval, and the local estimate's error is printed and
remembered, so an offline estimate can say how far it was off last time.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog

from etl import budget, routing
from etl.api import Api
from etl.config import Config
from etl.costs import plain, usd, usd_text
from etl.errors import ProviderError
from etl.prompt import BODY_OVERHEAD, Rejection, Row, build_params, custom_id, request_size
from etl.store import queue as q
from etl.store import spend, state
from etl.store.databases import Databases
from etl.store.engine import reading

log = structlog.get_logger("etl.estimate")

CALIBRATION_KEY = budget.CALIBRATION_KEY

# A custom_id's size depends on its intent, unknown before the submit: sized with a 9-digit one.
SIZING_INSTALLATION, SIZING_INTENT = "0" * 12, 999_999_999


@dataclass(frozen=True)
class Selection:
    """Which queued documents to estimate (all of them by default)."""

    task: str | None = None
    min_priority: int | None = None
    older_than: timedelta | None = None


@dataclass
class TaskEstimate:
    task: str
    model: str
    documents: int = 0
    rejected: int = 0
    input_tokens: int = 0  # outside the cache
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    max_output_tokens: int = 0
    batches: int = 0
    cost_usd: str = "0"  # batch price
    standard_cost_usd: str = "0"
    upper_bound_usd: str = "0"  # what the cap reserves
    within_cap: int = 0  # documents tonight's caps let through
    message_tokens: int = field(default=0, repr=False)
    _last_batch: int = field(default=-1, repr=False)
    _upper_units: int = field(default=0, repr=False)


@dataclass
class Sampling:
    """count_tokens against the local estimate on a sample."""

    sampled: int
    of: int
    local_tokens: int
    api_tokens: int
    confidence: float
    ratio: float  # api / local
    margin_tokens: int  # +- on the total input tokens at `confidence`
    stopped: str | None = None

    @property
    def local_error(self) -> float:
        """(local - api) / api: how far the offline estimate is off."""
        return (self.local_tokens - self.api_tokens) / self.api_tokens if self.api_tokens else 0.0


@dataclass
class Estimate:
    generated_at: str
    selection: dict[str, Any]
    tasks: list[TaskEstimate]
    documents: int
    rejected: int
    batches: int
    cost_usd: str
    standard_cost_usd: str
    upper_bound_usd: str
    tokens_source: str
    night: str
    caps_usd: dict[str, str]
    reserved_tonight_usd: str
    within_cap: int
    sampling: Sampling | None = None
    last_calibration: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for t in out["tasks"]:
            for key in ("message_tokens", "_last_batch", "_upper_units"):
                t.pop(key, None)
        if self.sampling is not None:
            out["sampling"]["local_error"] = round(self.sampling.local_error, 4)
        return out


def run(
    cfg: Config,
    db: Databases,
    api: Api,
    now: datetime,
    selection: Selection,
    *,
    count_tokens: bool = False,
    seed: int = 0,
) -> Estimate:
    """Estimate the queued documents of `selection`. Reads only; count_tokens calls are free."""
    with reading(db.main) as conn:
        calibration = state.get_value(conn, CALIBRATION_KEY)
    costing = budget.Costing(cfg, budget.margin(calibration))  # the submitter's reservations, exactly
    caps = budget.caps(cfg)
    night = budget.night_of(now, cfg.schedule.zone)
    sample_size = cfg.submit.count_tokens_sample if count_tokens else 0
    with reading(db.main) as conn:
        reserved = spend.reserved(conn, night)
        tally = _Tally(cfg, costing, budget.Allowance(costing, caps, reserved), _Reservoir(sample_size, seed))
        rows = q.iter_queued(
            conn,
            task=selection.task,
            min_priority=selection.min_priority,
            enqueued_before=None if selection.older_than is None else now - selection.older_than,
            live_cutoff=routing.batch_cutoff(cfg, now),
        )
        for row in rows:
            tally.add(row)
    sample = tally.reservoir.items
    confidence = cfg.submit.count_tokens_confidence
    sampling = _count_sample(api, sample, tally.reservoir.seen, confidence) if sample else None
    total = _price(tally.per_task, costing, cfg, sampling.ratio if sampling is not None else 1.0)
    if sampling is not None:
        _remember(db, sampling, now)
    tasks = [tally.per_task[k] for k in sorted(tally.per_task)]
    return Estimate(
        generated_at=now.isoformat(),
        selection={
            "task": selection.task,
            "min_priority": selection.min_priority,
            "older_than_hours": None
            if selection.older_than is None
            else selection.older_than.total_seconds() / 3600,
        },
        tasks=tasks,
        documents=sum(t.documents for t in tasks),
        rejected=sum(t.rejected for t in tasks),
        batches=tally.batch_index + 1 if any(t.documents for t in tasks) else 0,
        cost_usd=usd_text(total["cost"]),
        standard_cost_usd=usd_text(total["standard"]),
        upper_bound_usd=usd_text(total["upper"]),
        tokens_source="count_tokens sample" if sampling is not None else "local (4 characters per token)",
        night=night,
        caps_usd={k: usd_text(v) for k, v in caps.items()},
        reserved_tonight_usd=usd_text(sum(reserved.values(), Decimal(0))),
        within_cap=sum(t.within_cap for t in tasks),
        sampling=sampling,
        last_calibration=json.loads(calibration) if calibration else None,
    )


@dataclass
class _Reservoir:
    """A uniform random sample of `size` of everything offered (reservoir sampling), in constant memory."""

    size: int
    seed: int
    items: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    seen: int = 0
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def offer(self, item: tuple[dict[str, Any], int]) -> None:
        if not self.size:
            return
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item


@dataclass
class _Tally:
    """The queue read once in claim order: each row built, packed into batches by the submitter's
    limits and priced as the submitter would, only per-task sums kept."""

    cfg: Config
    costing: budget.Costing
    allowance: budget.Allowance
    reservoir: _Reservoir
    per_task: dict[str, TaskEstimate] = field(default_factory=dict)
    batch_index: int = 0
    batch_count: int = 0
    batch_bytes: int = BODY_OVERHEAD

    def add(self, row: Row) -> None:
        limits = self.cfg.submit
        line = self.per_task.get(row.task)
        if line is None:
            task = self.cfg.tasks.get(row.task)
            line = self.per_task[row.task] = TaskEstimate(row.task, task.model if task else "(no such task)")
        try:
            params = build_params(row, self.cfg.tasks, limits.max_body_bytes)
        except Rejection:
            line.rejected += 1
            return
        size = request_size(custom_id(row.id, SIZING_INSTALLATION, SIZING_INTENT), params) + 1
        if size - 1 + BODY_OVERHEAD > limits.max_batch_bytes:
            line.rejected += 1
            return
        batch = self._place(size)
        if line._last_batch != batch:
            line._last_batch = batch
            line.batches += 1
        tokens = budget.tokens_of(budget.message_text(params))
        line.documents += 1
        line.message_tokens += tokens
        cost = self.costing.tasks[row.task]
        units = cost.upper_bound(tokens)
        line._upper_units += units
        if self.allowance.take(row.task, units):
            line.within_cap += 1
        self.reservoir.offer((params, tokens + cost.system_tokens))

    def _place(self, size: int) -> int:
        """The index of the batch a request of `size` bytes goes in (a full batch starts the next)."""
        limits = self.cfg.submit
        if (
            self.batch_count >= limits.max_requests_per_batch
            or self.batch_bytes + size > limits.max_batch_bytes
        ):
            self.batch_index += 1
            self.batch_count, self.batch_bytes = 0, BODY_OVERHEAD
        self.batch_count += 1
        self.batch_bytes += size
        return self.batch_index


def _price(
    per_task: dict[str, TaskEstimate], costing: budget.Costing, cfg: Config, ratio: float
) -> dict[str, Decimal]:
    """Fill each task's money columns; the totals at the batch price, the standard price and the upper
    bound the submitter would reserve."""
    total = {"cost": Decimal(0), "standard": Decimal(0), "upper": Decimal(0)}
    for name, line in per_task.items():
        priced = costing.tasks.get(name)
        if priced is None or not line.documents:
            continue
        units = measure(line, priced, ratio)
        price = costing.usd(units)
        standard = costing.standard(units, cfg.pricing.batch_discount)
        upper = costing.usd(line._upper_units)  # what the submitter would reserve for them
        line.cost_usd, line.standard_cost_usd, line.upper_bound_usd = (
            usd_text(price),
            usd_text(standard),
            usd_text(upper),
        )
        total["cost"] += price
        total["standard"] += standard
        total["upper"] += upper
    return total


def _remember(db: Databases, sampling: Sampling, now: datetime) -> None:
    """The sample's verdict on the local estimate, for the next estimate without count_tokens."""
    calibration = {
        "at": now.isoformat(),
        "sampled": sampling.sampled,
        "local_error": round(sampling.local_error, 4),
        "ratio": round(sampling.ratio, 6),
    }
    with db.main.begin() as conn:
        state.set_value(conn, CALIBRATION_KEY, json.dumps(calibration), now)


def measure(line: TaskEstimate, cost: budget.TaskCost, ratio: float) -> int:
    """Fill a task's token columns and return its estimate in units. count_tokens' `ratio` (1 without
    it) scales every input token it measured: the messages and the system prompt alike (the sample
    compared both with the local estimate)."""
    tokens = round(line.message_tokens * ratio)
    system = round(cost.system_tokens * ratio)
    line.input_tokens = cost.input_tokens(line.documents, tokens, system)
    if cost.cached:
        writes = min(line.batches, line.documents)
        line.cache_write_tokens = writes * system
        line.cache_read_tokens = (line.documents - writes) * system
    line.max_output_tokens = line.documents * cost.task.max_tokens
    return cost.estimate(line.documents, tokens, line.batches, system)


def _count_sample(
    api: Api, sample: list[tuple[dict[str, Any], int]], population: int, confidence: float
) -> Sampling:
    """count_tokens for each sampled request; a ratio estimate of the total with its margin.

    The API's count limits its rate: a 429 ends the sampling early with what was counted so far.
    """
    pairs: list[tuple[int, int]] = []
    stopped = None
    for params, local in sample:
        try:
            pairs.append((local, api.provider.count_tokens(params)))
        except ProviderError as exc:
            if exc.kind in ("rate_limited", "transient") and pairs:
                stopped = str(exc)
                break
            raise
    n = len(pairs)
    local_sum = sum(p[0] for p in pairs)
    api_sum = sum(p[1] for p in pairs)
    ratio = api_sum / local_sum if local_sum else 1.0
    margin = 0
    if 1 < n < population:
        residual = statistics.variance([api - ratio * loc for loc, api in pairs])
        z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
        margin = math.ceil(z * population * math.sqrt((1 - n / population) * residual / n))
    log.info("count_tokens_sampled", sampled=n, of=population, ratio=round(ratio, 4), stopped=stopped)
    return Sampling(n, population, local_sum, api_sum, confidence, ratio, margin, stopped)


def render(est: Estimate) -> str:
    """The table printed on a terminal."""
    lines = [
        f"Estimate {est.generated_at}: {est.documents:,} queued document(s) in {est.batches} batch(es)"
        + (f"; {est.rejected:,} would be rejected" if est.rejected else ""),
        f"input tokens: {est.tokens_source}; output tokens: the upper bound (max_tokens)",
        "",
        f"{'task':<14}{'model':<22}{'docs':>9}{'input':>12}{'cache w':>10}{'cache r':>12}{'max out':>12}"
        f"{'batches':>8}{'batch $':>12}{'standard $':>12}",
    ]
    lines.append("-" * len(lines[-1]))
    for t in est.tasks:
        lines.append(
            f"{t.task:<14}{t.model:<22}{t.documents:>9,}{t.input_tokens:>12,}{t.cache_write_tokens:>10,}"
            f"{t.cache_read_tokens:>12,}{t.max_output_tokens:>12,}{t.batches:>8}{usd(t.cost_usd):>12}"
            f"{usd(t.standard_cost_usd):>12}"
        )
    if not est.tasks:
        lines.append("(nothing queued)")
    lines += [
        "",
        f"total: ${usd(est.cost_usd)} at the batch price (${usd(est.standard_cost_usd)} at standard prices); "
        f"upper bound with every cache write ${usd(est.upper_bound_usd)}",
    ]
    if est.caps_usd:
        caps = ", ".join(
            f"${plain(v)}" + ("" if k == budget.ALL else f" for {k}") for k, v in est.caps_usd.items()
        )
        lines.append(
            f"nightly cap {caps} (night of {est.night}): ${usd(est.reserved_tonight_usd)} reserved tonight; "
            f"{est.within_cap:,} of {est.documents:,} document(s) fit under it"
        )
    s = est.sampling
    if s is not None:
        lines.append(
            f"count_tokens: {s.sampled} of {s.of:,} requests counted; input tokens +-{s.margin_tokens:,} at "
            f"{s.confidence:.0%} confidence; the local estimate is off by {s.local_error:+.1%}"
            + (f" (sampling stopped early: {s.stopped})" if s.stopped else "")
        )
    elif est.last_calibration:
        c = est.last_calibration
        lines.append(
            f"the local estimate was off by {c['local_error']:+.1%} against count_tokens "
            f"({c['sampled']} requests, {c['at']}); run with --count-tokens to measure again"
        )
    else:
        lines.append("the local estimate's error is not measured yet: run with --count-tokens")
    lines.append("nothing was claimed or sent")
    return "\n".join(lines)
