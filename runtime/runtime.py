"""`Runtime`: the in-process API. Plans, runs, measures, records and learns from each request.

A robot stack embeds it directly (`rt.chat(...)` / `await rt.achat(...)`); the HTTP server is a
thin layer over the same object. Requests run on a worker pool sized by the engine's
concurrency (1 for the embedded transformers engine: requests queue in arrival order), with a
bounded queue in front (503 past `queue_limit`).

One request: `build_request` (validate) -> `plan` (encode, measured; the scheduler's plan) ->
`run_planned` (run under the governor; report; record in the ledger and metrics; learn).
Every joule spent is recorded, whatever the outcome: answered, refused after the encode (422,
429), aborted or failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from joulecap.policies import available_policies
from joulecap.runtime.config import JoulecapConfig
from joulecap.runtime.encoding import EncodeStage
from joulecap.runtime.energy.accounting import RunMeter, make_accounting
from joulecap.runtime.energy.base import Meter
from joulecap.runtime.energy.factory import create_meter
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.energy.power_state import profile_key_suffix
from joulecap.runtime.engines.base import Engine, RunHooks
from joulecap.runtime.engines.factory import create_engine
from joulecap.runtime.envelope import PowerEnvelope, Reservation
from joulecap.runtime.errors import (
    BasesNeeded,
    BudgetTooSmall,
    EngineError,
    InvalidRequest,
    JoulecapError,
)
from joulecap.runtime.governor import Governor
from joulecap.runtime.images import ImagePolicy
from joulecap.runtime.learning import Learner, Outcome
from joulecap.runtime.ledger import Ledger
from joulecap.runtime.metrics import Metrics
from joulecap.runtime.operations import RuntimeOperations
from joulecap.runtime.paths import Paths
from joulecap.runtime.profile_setup import setup_profile
from joulecap.runtime.profiles import profile_path
from joulecap.runtime.requests import (
    ImageLike,
    RequestLimits,
    RequestOptions,
    build_request,
    convert_messages,
    prompt_messages,
)
from joulecap.runtime.scheduler import Scheduler
from joulecap.runtime.types import (
    ChatResult,
    EnergyReport,
    GenerationResult,
    Plan,
    PreparedRequest,
    Request,
    RequestStatus,
)
from joulecap.runtime.warmup import warmup_request
from joulecap.runtime.work_queue import WorkQueue

log = logging.getLogger(__name__)

TokenCallback = Callable[[int, str], None]
"""`on_token(token_id, text_delta)`, called on the engine thread for every generated token."""


class Runtime:
    """Energy-aware VLM runtime: plan under a joule budget, run, measure, record, learn.

    Args:
        config: All component configs; defaults serve the demo model with auto-detected meters.
        engine: An already constructed engine (else built from `config.engine`).
        meter: An already constructed meter (else chosen from `config.energy`).

    """

    def __init__(
        self,
        config: JoulecapConfig | None = None,
        *,
        engine: Engine | None = None,
        meter: Meter | None = None,
    ) -> None:
        self.config = cfg = config or JoulecapConfig()
        self.paths = Paths.resolve(cfg.paths)
        # Without leverage selection the basis would only spare the E-AdaPrune budget's cheaper
        # Gram solve: not worth computing.
        leverage = cfg.engine.leverage_basis and cfg.scheduler.selection == "leverage"
        self.engine = engine or create_engine(
            dataclasses.replace(cfg.engine, leverage_basis=leverage), self.paths.cache_dir
        )
        self.info = self.engine.info
        if self.info.random_weights:
            log.warning("Model %s has RANDOM weights (demo): answers are noise.", self.info.model)
        self.meter = meter or create_meter(cfg.energy)
        self.monitor = EnergyMonitor(self.meter, cfg.energy)
        self.monitor.start()
        self.ledger = Ledger(self.paths.ledger_path)
        self.metrics = Metrics()
        # Retention, the power-state reader, per-key quotas and measurement quality per row.
        self.operations = RuntimeOperations(cfg.energy, cfg.ledger, self.ledger, self.monitor, self.metrics)
        self.power_mode = profile_key_suffix(self.operations.power_state())
        self._power_mode_changes = self.operations.power.mode_changes
        self.profile = setup_profile(
            self.engine, self.monitor, self.paths, cfg.learning, cfg.calibration, self.power_mode
        )
        self.predictor = self.profile.predictor
        self.learner = Learner(self.predictor, cfg.learning)
        self.scheduler = Scheduler(cfg.scheduler, self.predictor, self.learner)
        self.accounting = make_accounting(
            self.monitor, getattr(self.engine, "work_log", None), self.predictor.token_costs
        )
        env = cfg.envelope
        self.envelope: PowerEnvelope | None = None
        if env.power_envelope_w is not None and env.power_envelope_j is not None:
            self.envelope = PowerEnvelope(env.power_envelope_w, env.power_envelope_j)
        self.metrics.set_learning(self.info.model, self.predictor, self.learner)
        server = cfg.server
        self.images_policy = ImagePolicy(
            max_pixels=server.max_image_pixels,
            allow_local_dir=server.allow_local_files,
            allow_remote=server.allow_remote_images,
        )
        self.limits = RequestLimits(
            images=self.images_policy,
            max_images=server.max_images,
            max_tokens_limit=server.max_tokens_limit,
            budget_min_j=cfg.scheduler.budget_min_j,
            budget_max_j=cfg.scheduler.budget_max_j,
            policies=frozenset(available_policies()),
        )
        self.max_concurrency = max(1, int(getattr(self.engine, "max_concurrency", 1)))
        self._queue = WorkQueue(
            self.max_concurrency,
            server.queue_limit,
            lambda running, waiting: self.metrics.set_queue_state(self.info.model, running, waiting),
        )
        self.encoding = EncodeStage(
            self.engine,
            self.scheduler,
            self.accounting,
            lambda request, spent, exc, record: self._record_spent(request, None, spent, exc, record=record),
        )
        self._closed = False
        if cfg.engine.warmup:
            self._warmup()

    def _warmup(self) -> None:
        # The path a real first request takes (image decode, processor, vision tower, decomposition,
        # planning, prefill, decode under the governor's meter reads), twice: the first pays for
        # lazy initialisation, the second for what the first left cold. Not recorded.
        started_s = time.monotonic()
        for policy in dict.fromkeys((self.config.scheduler.policy, "joint")):
            request = warmup_request(self.limits, policy)
            for _ in range(2):
                prepared, plan = self.plan(request, record=False)
                self.run_planned(prepared, plan, record=False)
        self.learner.mark_active()
        log.info("engine warm-up took %.3f s", time.monotonic() - started_s)

    # ------------------------------------------------------------------ building requests
    def build_request(
        self,
        messages_or_prompt: str | Sequence[dict[str, Any]],
        images: Sequence[ImageLike] = (),
        *,
        energy_budget_j: float | None = None,
        max_tokens: int | None = None,
        policy: str | None = None,
        tau: float | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Request:
        """Make a validated `Request` from a prompt (images before the text) or OpenAI-style messages."""
        if isinstance(messages_or_prompt, str):
            messages, pil = prompt_messages(messages_or_prompt, images, self.limits)
        else:
            if images:
                raise InvalidRequest("Pass images inside messages (image_url parts) when giving messages.")
            messages, pil = convert_messages(messages_or_prompt, self.limits)
        options = RequestOptions(
            max_tokens=max_tokens,
            energy_budget_j=energy_budget_j,
            policy=policy,
            tau=tau,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        return build_request(messages, pil, options, self.limits)

    # ------------------------------------------------------------------ the run path
    def plan(self, request: Request, *, record: bool = True) -> tuple[PreparedRequest, Plan]:
        """Encode (measured) and plan a request without running it (on the calling thread).

        Raises:
            BudgetTooSmall: The budget is below the feasibility rule's minimum (recorded as refused).
            InvalidRequest: The engine cannot take the request (recorded with its encode energy).

        """
        prepared = self.encoding.prepare(request, record, defer_bases=self.encoding.defers_bases(request))
        try:
            return prepared, self._plan(prepared, record)
        except BasesNeeded:
            prepared = self.encoding.add_bases(prepared, record)  # records its own failure
            return prepared, self._plan(prepared, record)

    def _plan(self, prepared: PreparedRequest, record: bool) -> Plan:
        """The scheduler's plan; a refusal or invalid request is recorded with the encode spent."""
        try:
            return self.scheduler.plan(prepared)
        except JoulecapError as exc:
            self._record_spent(prepared.request, None, prepared.encode, exc, record=record)
            raise

    def estimate(self, request: Request) -> tuple[PreparedRequest, Plan | None, BudgetTooSmall | None]:
        """Encode and plan without running: the plan, or the refusal with its stated minimum.

        The encode's energy is recorded (status `estimate`): it was spent.
        """
        prepared = self.encoding.prepare(request, True)
        plan, refusal = None, None
        try:
            plan = self.scheduler.plan(prepared)
            if plan.min_j is not None:  # stated to the client: a request at it is accepted
                self.scheduler.promises.hold(request, plan.min_j)
        except BudgetTooSmall as exc:
            refusal = exc
        finally:
            self.abandon(prepared, plan, "estimate", "/v1/energy/estimate: planned, not run")
        return prepared, plan, refusal

    def run_planned(
        self,
        prepared: PreparedRequest,
        plan: Plan,
        *,
        on_token: TokenCallback | None = None,
        cancelled: threading.Event | None = None,
        record: bool = True,
    ) -> ChatResult:
        """Run a planned request under its governor; report, record and learn (on the calling thread).

        Raises:
            EnvelopeExhausted: The shared power envelope cannot cover the plan (recorded as refused).
            EngineError: The engine failed; the energy spent is still in the ledger.

        """
        reservation = self._reserve(prepared, plan, record)  # plan -> run -> report -> record -> learn
        meter = self.accounting.start(prepared.request.request_id, prepared.encode)
        governor = Governor(
            plan, self.predictor.decode_j_per_token(), meter.energy_so_far_j,
            self.learner.first_step.value(), meter.measurement_is_current,
        )  # fmt: skip
        # A governor without a budget never stops a run and keeps no state: no per-token call.
        should_stop = None if governor.budget_j is None else governor.should_stop
        hooks = RunHooks(on_token=on_token, should_stop=should_stop, cancelled=cancelled or threading.Event())
        try:
            generation = self.engine.run(prepared, plan, hooks)
        except Exception as exc:
            energy = meter.failure_report()
            self._settle(reservation, energy)
            raise self._failed(prepared.request, plan, energy, exc, record) from exc
        result = self._result(prepared, plan, generation, meter)
        if record:
            status: RequestStatus = "aborted" if generation.stop_reason == "aborted" else "ok"
            self._record(result, status, prepared.request.key_name)
            first_step = governor.first_step_observation(result.completion_tokens, result.energy.decode_j)
            self.learner.observe(Outcome.of(result, first_step, meter.start_s))
            self.metrics.set_learning(self.info.model, self.predictor, self.learner)
        self._settle(reservation, result.energy)
        return result

    def _result(
        self, prepared: PreparedRequest, plan: Plan, generation: GenerationResult, meter: RunMeter
    ) -> ChatResult:
        """The finished request with its energy report (split by the prediction where a window is short)."""
        text_tokens = generation.prefill_tokens - generation.visual_tokens_kept
        predicted = self.predictor.predict(
            text_tokens, generation.visual_tokens_kept, len(generation.token_ids)
        )
        request = prepared.request
        return ChatResult(
            request.request_id, self.info.model, generation.text, generation, plan,
            meter.report(generation.times, predicted), request.created_s or time.time(), self._profile_note(),
        )  # fmt: skip

    def execute(
        self,
        request: Request,
        *,
        on_token: TokenCallback | None = None,
        cancelled: threading.Event | None = None,
    ) -> ChatResult:
        """Plan and run a request on the calling thread (no queue)."""
        prepared, plan = self.plan(request)
        return self.run_planned(prepared, plan, on_token=on_token, cancelled=cancelled)

    def abandon(
        self, prepared: PreparedRequest, plan: Plan | None, status: RequestStatus, reason: str
    ) -> None:
        """Record a planned request that will never run (client gone, timeout, estimate only)."""
        self._record_spent(prepared.request, plan, prepared.encode, None, status=status, reason=reason)

    # ------------------------------------------------------------------ recording
    def _reserve(self, prepared: PreparedRequest, plan: Plan, record: bool) -> Reservation | None:
        if self.envelope is None or not record:
            return None
        # What the plan will cost, with the margin its prediction may be off by; a held budget caps it.
        amount_j = plan.predicted_j * (1.0 + max(plan.margin, plan.plan_margin))
        if plan.holds_budget and plan.budget_j is not None:
            amount_j = min(amount_j, plan.budget_j)
        try:
            reservation = self.envelope.reserve(amount_j)
        except JoulecapError as exc:
            self._record_spent(prepared.request, plan, prepared.encode, exc)
            raise
        self.metrics.set_envelope_level_j(self.envelope.level_j())
        return reservation

    def _settle(self, reservation: Reservation | None, energy: EnergyReport) -> None:
        if reservation is not None and self.envelope is not None:
            self.envelope.settle(reservation, energy.total_j)
            self.metrics.set_envelope_level_j(self.envelope.level_j())

    def profile_keys(self) -> tuple[str, list[str]]:
        """The mode-less profile key of this model and the keys of the profiles calibrated for it."""
        base = profile_path(self.paths.profile_dir, self.info.model, self.info.device, self.info.dtype).stem
        return base, sorted(p.stem for p in self.paths.profile_dir.glob(base + "*.json"))

    def _profile_note(self) -> str:
        """The profile's note, and a flag when the power mode changed since the profile was chosen."""
        changes = self.operations.power.mode_changes
        if changes == self._power_mode_changes:
            return self.profile.note
        now = profile_key_suffix(self.operations.power_state()) or "unknown"
        flag = (
            f"power mode changed since start-up ({self.power_mode or 'unknown'} -> {now}); predictions "
            "use the start-up profile until the server restarts in this mode"
        )
        return "; ".join(n for n in (self.profile.note, flag) if n)

    def _record(self, result: ChatResult, status: RequestStatus, key_name: str | None) -> None:
        ops = self.operations.account(result.energy, key_name)
        self.ledger.record_result(result, status=status, **ops)
        self.metrics.observe_result(result, status)
        # Arrival on the monotonic clock of the engine's marks, from the request's Unix arrival.
        arrival_s = time.monotonic() - max(0.0, time.time() - result.created_s)
        self.metrics.observe_latency(result, arrival_s)

    def _failed(
        self, request: Request, plan: Plan, energy: EnergyReport, exc: Exception, record: bool
    ) -> JoulecapError:
        if record:
            self._record_spent(request, plan, None, exc, status="error", energy=energy)
        if isinstance(exc, JoulecapError):
            return exc
        log.exception("engine failed on %s", request.request_id, exc_info=exc)
        return EngineError(f"The engine failed on this request: {type(exc).__name__}")

    def _record_spent(
        self,
        request: Request,
        plan: Plan | None,
        encode: EnergyReport | None,
        exc: BaseException | None,
        *,
        record: bool = True,
        status: RequestStatus | None = None,
        reason: str = "",
        energy: EnergyReport | None = None,
    ) -> None:
        """Ledger row and metrics for a request that spent energy but has no result."""
        if not record:
            return
        if status is None:
            status = "refused" if isinstance(exc, JoulecapError) else "error"
        energy = energy or encode
        error = reason or ("" if exc is None else f"{type(exc).__name__}: {exc}"[:500])
        self.ledger.record_failure(
            request.request_id, self.info.model, plan, energy, status=status, error=error,
            created_s=request.created_s or None, policy=request.policy or self.config.scheduler.policy,
            budget_j=request.energy_budget_j, **self.operations.account(energy, request.key_name),
        )  # fmt: skip
        policy = plan.policy if plan is not None else (request.policy or self.config.scheduler.policy)
        self.metrics.observe_spent(self.info.model, policy, energy, status)

    # ------------------------------------------------------------------ queued execution
    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run `fn(*args, **kwargs)` on the engine pool, refusing with 503 when the queue is full."""
        return self._queue.submit(fn, *args, **kwargs)

    @property
    def inflight(self) -> int:
        """Requests queued or running."""
        return self._queue.inflight

    # ------------------------------------------------------------------ convenience API
    def chat(
        self,
        messages_or_prompt: str | Sequence[dict[str, Any]],
        images: Sequence[ImageLike] = (),
        *,
        energy_budget_j: float | None = None,
        on_token: TokenCallback | None = None,
        **options: Any,
    ) -> ChatResult:
        """Ask the model, synchronously. Returns text, tokens, plan and energy report.

        Args:
            messages_or_prompt: A prompt string, or OpenAI-style message dicts.
            images: Images for a prompt string (PIL, HxWx3 uint8 arrays, bytes or paths).
            energy_budget_j: Joule budget for this request.
            on_token: `on_token(token_id: int, text_delta: str)`, called on the engine thread
                with each generated token.
            **options: `max_tokens`, `policy`, `tau`, `temperature`, `top_p`, `seed`.

        """
        request = self.build_request(messages_or_prompt, images, energy_budget_j=energy_budget_j, **options)
        result: ChatResult = self.submit(self.execute, request, on_token=on_token).result()
        return result

    async def achat(
        self,
        messages_or_prompt: str | Sequence[dict[str, Any]],
        images: Sequence[ImageLike] = (),
        *,
        energy_budget_j: float | None = None,
        **options: Any,
    ) -> ChatResult:
        """`chat` for asyncio code: waits without blocking the event loop."""
        request = self.build_request(messages_or_prompt, images, energy_budget_j=energy_budget_j, **options)
        result: ChatResult = await asyncio.wrap_future(self.submit(self.execute, request))
        return result

    def close(self) -> None:
        """Finish queued work, stop sampling, close the ledger and the engine."""
        if self._closed:
            return
        self._closed = True
        self._queue.close()
        self.monitor.stop()
        self.meter.close()
        self.operations.close()
        self.ledger.close()
        self.engine.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
