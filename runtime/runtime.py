"""`Runtime`: the in-process API. Plans, runs, measures and records each request.

A robot stack embeds it directly (`rt.chat(...)` / `await rt.achat(...)`); the HTTP server is a
thin layer over the same object. Requests run on a worker pool sized by the engine's
concurrency (1 for the embedded transformers engine: requests queue in arrival order), with a
bounded queue in front (503 past `queue_limit`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from joulecap.runtime.api.schema import ChatCompletionRequest, parse_budget, to_request
from joulecap.runtime.config import JoulecapConfig
from joulecap.runtime.energy.base import Meter
from joulecap.runtime.energy.factory import create_meter
from joulecap.runtime.energy.monitor import EnergyMonitor
from joulecap.runtime.engines.base import Engine, RunHooks
from joulecap.runtime.engines.factory import create_engine, resolve_cache_dir
from joulecap.runtime.engines.worklog import WorkLog, batched_report, token_costs
from joulecap.runtime.envelope import PowerEnvelope
from joulecap.runtime.errors import EngineError, InvalidRequest, JoulecapError, Overloaded, PayloadTooLarge
from joulecap.runtime.governor import Governor
from joulecap.runtime.images import ImagePolicy, decode_image_bytes
from joulecap.runtime.ledger import Ledger
from joulecap.runtime.metrics import Metrics
from joulecap.runtime.profiles import load_profile
from joulecap.runtime.scheduler import Scheduler
from joulecap.runtime.types import (
    ChatMessage,
    ChatResult,
    EnergyReport,
    ImagePart,
    PhaseTimes,
    Plan,
    PreparedRequest,
    Request,
    SamplingParams,
    TextPart,
)

log = logging.getLogger(__name__)

ImageLike = Image.Image | np.ndarray | bytes | str | Path
"""What `Runtime.chat` accepts as an image: PIL, an HxWx3 uint8 array (camera frame), encoded
bytes, or a path to a file."""

TokenCallback = Callable[[int, str], None]


def _to_pil(image: ImageLike, policy: ImagePolicy) -> Image.Image:
    # In-process callers are trusted with their own files, but the pixel limit still applies.
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidRequest("Array images must be HxWx3 uint8 (RGB).", param="images")
        pil = Image.fromarray(image, "RGB")
    else:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        return decode_image_bytes(data, policy, "images")
    if pil.width * pil.height > policy.max_pixels:
        raise PayloadTooLarge(f"Image is over the pixel limit {policy.max_pixels}.", param="images")
    return pil


class Runtime:
    """Energy-aware VLM runtime: plan under a joule budget, run, measure, record.

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
        # Without leverage selection the basis would only spare the E-AdaPrune budget's cheaper
        # Gram solve (0.7 vs 1.8 ms for 144 x 160 on one core): not worth computing.
        leverage = cfg.engine.leverage_basis and cfg.scheduler.selection == "leverage"
        self.engine = engine or create_engine(dataclasses.replace(cfg.engine, leverage_basis=leverage))
        self.info = self.engine.info
        if self.info.random_weights:
            log.warning(
                "Model %s has RANDOM weights (demo): answers are gibberish; energy mechanics are real.",
                self.info.model,
            )
        cache_dir = resolve_cache_dir(cfg.engine)
        self.meter = meter or create_meter(cfg.energy)
        self.monitor = EnergyMonitor(self.meter, cfg.energy)
        self.monitor.start()
        profile_dir = Path(cfg.scheduler.profile_dir or cache_dir / "profiles")
        self.predictor = load_profile(
            profile_dir, self.info.model, self.info.device, self.info.dtype, self.info.params_b
        )
        self.scheduler = Scheduler(cfg.scheduler, self.predictor)
        env_w, env_j = cfg.scheduler.power_envelope_w, cfg.scheduler.power_envelope_j
        self.envelope: PowerEnvelope | None = None
        if env_w is not None or env_j is not None:
            if env_w is None or env_j is None:
                raise ValueError("--power-envelope-w and --power-envelope-j must be set together.")
            self.envelope = PowerEnvelope(env_w, env_j)
        ledger_path = cfg.ledger.ledger_path or str(cache_dir / "ledger.sqlite3")
        if ledger_path != ":memory:":
            Path(ledger_path).parent.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(ledger_path)
        self.metrics = Metrics()
        self.images_policy = ImagePolicy(
            max_pixels=cfg.server.max_image_pixels,
            allow_local_dir=cfg.server.allow_local_files,
            allow_remote=cfg.server.allow_remote_images,
        )
        self.max_concurrency = max(1, int(getattr(self.engine, "max_concurrency", 1)))
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_concurrency, thread_name_prefix="joulecap-engine"
        )
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._prepare_lock = threading.Lock()
        self._closed = False
        if cfg.engine.warmup:
            self._warmup()

    def _warmup(self) -> None:
        # One short generation with an image: the first request pays for lazy initialisation
        # (allocator, kernels, caches). Not recorded in the ledger and not learned from.
        frame = Image.new("RGB", (64, 64), (127, 127, 127))
        # Built directly: the warm-up frame must not depend on the server's image limits.
        request = Request(
            request_id="warmup",
            messages=(ChatMessage("user", (ImagePart(0), TextPart("warm-up"))),),
            images=(frame,),
            max_tokens=2,
        )
        prepared = self.engine.prepare(request)  # with bases: their first decomposition warms up too
        plan = Plan(
            visual_keep=prepared.visual_tokens,
            max_new_tokens=2,
            predicted_j=0.0,
            policy="warmup",
            reason="start-up warm-up, not recorded",
        )
        started_s = time.monotonic()
        self.engine.run(prepared, plan, RunHooks())
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
        """Make a `Request` from a prompt (images placed before the text) or OpenAI-style messages."""
        budget = None if energy_budget_j is None else parse_budget(energy_budget_j, param="energy_budget_j")
        if isinstance(messages_or_prompt, str):
            pil = tuple(_to_pil(img, self.images_policy) for img in images)
            if len(pil) > self.config.server.max_images:
                raise InvalidRequest(f"At most {self.config.server.max_images} images per request.")
            parts: list[TextPart | ImagePart] = [ImagePart(i) for i in range(len(pil))]
            parts.append(TextPart(messages_or_prompt))
            return Request(
                request_id=f"chatcmpl-{uuid.uuid4().hex}",
                messages=(ChatMessage("user", tuple(parts)),),
                images=pil,
                max_tokens=max_tokens,
                energy_budget_j=budget,
                sampling=SamplingParams(temperature=temperature, top_p=top_p, seed=seed),
                policy=policy,
                tau=tau,
                created_s=time.time(),
            )
        if images:
            raise InvalidRequest("Pass images inside messages (image_url parts) when giving messages.")
        body = ChatCompletionRequest.model_validate(
            {
                "messages": list(messages_or_prompt),
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
                "policy": policy,
                "tau": tau,
                "energy_budget_j": budget,
            }
        )
        return to_request(
            body,
            header_budget=None,
            images_policy=self.images_policy,
            max_images=self.config.server.max_images,
            max_tokens_limit=self.config.server.max_tokens_limit,
        )

    # ------------------------------------------------------------------ synchronous core
    def plan(self, request: Request) -> tuple[PreparedRequest, Plan]:
        """Prepare and plan a request without running it (runs on the calling thread)."""
        # Image preprocessing and the vision encoder run here. Their energy is measured, not
        # predicted: it is spent before planning, so the plan budgets only what is left (fresh
        # reads make the window's edges exact on fast meters).
        # Under a batching engine, an encode that overlapped other requests' work lies in their
        # measured windows (split by token work); only one done while the engine was idle is
        # charged here, so nothing is counted twice and a lone request's encode is not lost.
        # Prepares are serialised (engines encode one at a time anyway), so that two measured
        # encode windows never overlap and count the same joules twice.
        work_log: WorkLog | None = getattr(self.engine, "work_log", None)
        # Images are decomposed only for a policy that may prune them (an unknown policy fails
        # here, before the encode is spent).
        bases = self.scheduler.prunes_visual(request)
        with self._prepare_lock:
            t0_s = time.monotonic()
            prepared, encode = self.monitor.measure(lambda: self.engine.prepare(request, bases=bases))
            if work_log is None or work_log.idle_throughout(t0_s):
                prepared = dataclasses.replace(prepared, prepare_energy=encode)
        return prepared, self.scheduler.plan(prepared)

    @staticmethod
    def _with_encode(energy: EnergyReport, encode: EnergyReport | None) -> EnergyReport:
        """`energy` with the encode window added to its prefill (and total, idle, duration)."""
        if encode is None:
            return energy
        return dataclasses.replace(
            energy,
            total_j=energy.total_j + encode.total_j,
            prefill_j=energy.prefill_j + encode.total_j,
            idle_j=energy.idle_j + encode.idle_j,
            duration_s=energy.duration_s + encode.duration_s,
            samples=energy.samples + encode.samples,
            interpolated=energy.interpolated or encode.interpolated,
            note="; ".join(n for n in (energy.note, encode.note) if n),
        )

    def run_planned(
        self,
        prepared: PreparedRequest,
        plan: Plan,
        *,
        on_token: TokenCallback | None = None,
        cancelled: threading.Event | None = None,
    ) -> ChatResult:
        """Run a planned request, measure it, record it (runs on the calling thread).

        Raises:
            EnvelopeExhausted: The shared power envelope cannot cover the plan.
            EngineError: The engine failed; the energy spent is still in the ledger.

        """
        request = prepared.request
        reservation = None
        if self.envelope is not None:
            reservation = self.envelope.reserve(plan.budget_j or plan.predicted_j)
            self.metrics.set_envelope_level_j(self.envelope.level_j())
        self.monitor.fresh_sample()  # an exact counter value at the window's start
        start_s = time.monotonic()
        # Batching engines (vLLM) log token work: energy is then split among concurrent requests.
        work_log: WorkLog | None = getattr(self.engine, "work_log", None)
        prefill_cost, decode_cost = token_costs(self.predictor) if work_log is not None else (1.0, 1.0)

        encode = prepared.prepare_energy
        encode_j = prepared.spent_j

        def energy_so_far_j() -> float:
            used_j = self.monitor.live_energy_j(start_s)
            if work_log is None:
                return encode_j + used_j
            return encode_j + used_j * work_log.live_fraction(
                request.request_id, prefill_cost=prefill_cost, decode_cost=decode_cost
            )

        governor = Governor(
            plan,
            self.predictor,
            energy_so_far_j,
            spent_j=encode_j,
            first_step_premium=self.scheduler.first_step.value(),
            measurement_is_current=work_log is None and self.monitor.reads_fresh,
        )
        hooks = RunHooks(
            on_token=on_token,
            should_stop=governor.should_stop,
            cancelled=cancelled or threading.Event(),
        )
        try:
            generation = self.engine.run(prepared, plan, hooks)
        except Exception as exc:
            end_s = time.monotonic()
            energy = self._with_encode(
                self.monitor.report(
                    PhaseTimes(start_s, end_s, end_s), predicted_prefill_j=0.0, predicted_decode_j=0.0
                ),
                encode,
            )
            self.ledger.record_failure(
                request.request_id,
                self.info.model,
                plan,
                energy,
                status="error",
                error=repr(exc)[:500],
                created_s=request.created_s or None,
            )
            # Error responses are counted by the layer that answers (the HTTP app), once.
            if reservation is not None and self.envelope is not None:
                self.envelope.settle(reservation, energy.total_j)
            if isinstance(exc, JoulecapError):
                raise
            log.exception("engine failed on %s", request.request_id)
            raise EngineError(f"The engine failed on this request: {type(exc).__name__}") from exc
        # The engine may add text (a brevity hint) after prepare(): count what really went in.
        text_tokens = generation.prefill_tokens - generation.visual_tokens_kept
        prediction = self.predictor.predict(
            text_tokens, generation.visual_tokens_kept, len(generation.token_ids)
        )
        if work_log is not None:
            energy = batched_report(
                self.monitor,
                work_log,
                request.request_id,
                generation.times,
                prefill_cost=prefill_cost,
                decode_cost=decode_cost,
                predicted_prefill_j=prediction.prefill_j,
                predicted_decode_j=prediction.decode_j,
            )
        else:
            energy = self.monitor.report(
                generation.times,
                predicted_prefill_j=prediction.prefill_j,
                predicted_decode_j=prediction.decode_j,
            )
        if energy.source != "replayed" and not energy.interpolated and generation.token_ids:
            # How far the unstoppable part (prefill to the first token) exceeded its prediction:
            # the scheduler's feasibility margin follows it.
            first = self.predictor.predict(text_tokens, generation.visual_tokens_kept, 1).total_j
            self.scheduler.margin.observe(first, energy.prefill_j)
            step = governor.first_step_observation(len(generation.token_ids), energy.decode_j)
            if step is not None:  # the governor's premium on the first decode step follows it
                self.scheduler.first_step.observe(*step)
        energy = self._with_encode(energy, encode)
        result = ChatResult(
            request_id=request.request_id,
            model=self.info.model,
            text=generation.text,
            generation=generation,
            plan=plan,
            energy=energy,
            created_s=request.created_s or time.time(),
        )
        status = "aborted" if generation.stop_reason == "aborted" else "ok"
        self.ledger.record_result(result, status=status)
        self.metrics.observe_result(result)
        self._learn(prepared, result, energy)
        if reservation is not None and self.envelope is not None:
            self.envelope.settle(reservation, energy.total_j)
            self.metrics.set_envelope_level_j(self.envelope.level_j())
        return result

    def _learn(self, prepared: PreparedRequest, result: ChatResult, energy: EnergyReport) -> None:
        # Replayed traces describe another device; learning from them would corrupt this profile.
        if energy.source == "replayed" or energy.interpolated:
            return
        # The predictor models the run (LM prefill and decode); the encode is measured, not predicted.
        self.predictor.update(
            result.generation.prefill_tokens - result.generation.visual_tokens_kept,
            result.generation.visual_tokens_kept,
            result.completion_tokens,
            max(0.0, energy.total_j - prepared.spent_j),
        )
        mape = self.predictor.stats().get("mape")
        if mape is not None:
            self.metrics.set_predictor_mape(self.info.model, float(mape))
        self.metrics.set_predictor_speed_factor(self.info.model, self.predictor.speed_factor)

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

    # ------------------------------------------------------------------ queued execution
    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run `fn(*args, **kwargs)` on the engine pool, refusing with 503 when the queue is full."""
        if self._closed:
            raise Overloaded("The runtime is shutting down.")
        with self._inflight_lock:
            if self._inflight >= self.max_concurrency + self.config.server.queue_limit:
                raise Overloaded(
                    f"{self._inflight} requests in flight; the queue limit is "
                    f"{self.config.server.queue_limit} (server option --queue-limit).",
                    retry_after_s=1.0,
                )
            self._inflight += 1
        try:
            future = self._pool.submit(fn, *args, **kwargs)
        except RuntimeError as exc:
            with self._inflight_lock:
                self._inflight -= 1
            raise Overloaded("The runtime is shutting down.") from exc
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: concurrent.futures.Future[Any]) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    @property
    def inflight(self) -> int:
        """Requests queued or running."""
        return self._inflight

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
            on_token: Called from the engine thread with each token id and text delta.
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
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.monitor.stop()
        self.meter.close()
        self.ledger.close()
        self.engine.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
