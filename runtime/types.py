"""Frozen data that crosses module boundaries: requests, plans, energy reports, results.

Every energy figure is in joules (`*_j`), every power in watts (`*_w`) unless a name says
otherwise (`*_mw`), every duration in seconds (`*_s`). Conversions happen once, at the
hardware boundary (the meters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from PIL import Image

    from joulecap.kernels.randomized import SketchBasis

EnergySource = Literal["measured", "estimated", "replayed"]
StopReason = Literal["stop", "length", "energy_budget", "aborted"]
RequestStatus = Literal["ok", "aborted", "error", "refused", "estimate"]
"""How a request ended, as the ledger and `/metrics` record it: answered (`ok`), stopped by the
client or a timeout (`aborted`), failed in the engine (`error`), refused after energy was spent
(`refused`: 422, 429), or prepared for `/v1/energy/estimate` only (`estimate`)."""


@dataclass(frozen=True)
class TextPart:
    """A text segment of a chat message."""

    text: str


@dataclass(frozen=True)
class ImagePart:
    """A reference to `Request.images[index]` at this position of a chat message."""

    index: int


@dataclass(frozen=True)
class ChatMessage:
    """One chat message with its ordered content parts."""

    role: Literal["system", "user", "assistant"]
    parts: tuple[TextPart | ImagePart, ...]

    @property
    def text(self) -> str:
        """All text parts joined, images omitted."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. `temperature == 0` (the default) means greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax."""
        return self.temperature <= 0.0


@dataclass(frozen=True, eq=False)
class Request:
    """A validated chat request, independent of the transport (HTTP or in-process).

    Attributes:
        request_id: Unique id (`chatcmpl-...`), also the ledger key.
        messages: Normalised chat messages.
        images: Decoded RGB images referenced by `ImagePart.index`.
        max_tokens: The client's own output cap, if any.
        energy_budget_j: The joule budget for this request, if any.
        sampling: Decoding settings.
        policy: Policy name override (else the server's default policy).
        tau: E-AdaPrune spectral-energy fraction override (else the policy's default).
        stream: Whether the client wants server-sent events.
        created_s: Unix time the request was accepted.
        key_name: The NAME of the API key it came with (`--api-keys`), never the key.

    """

    request_id: str
    messages: tuple[ChatMessage, ...]
    images: tuple[Image.Image, ...] = ()
    max_tokens: int | None = None
    energy_budget_j: float | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    policy: str | None = None
    tau: float | None = None
    stream: bool = False
    created_s: float = 0.0
    key_name: str | None = None


@dataclass(frozen=True, eq=False)
class PreparedRequest:
    """What the engine knows about a request before running it (used for planning).

    Attributes:
        request: The request this was prepared from.
        text_tokens: Prompt tokens that are not visual tokens.
        visual_tokens: Visual tokens per image as they would enter the LM (all kept).
        features: Per image, the visual features `[N_i, D]` that enter the LM (after the
            projector), on the engine's device. Policies compute spectral budgets from them.
        context_length: The model's maximum sequence length.
        payload: Engine-private state (tokenised inputs, embeddings) reused by `Engine.run`.
        hint_tokens: The most prompt tokens a brevity hint adds to this request (the longest of
            its wordings); 0 when the engine does not add hints, so plans carry none.
        bases: Per image, the exact left singular basis of `features`
            (`joulecap.kernels.leverage_basis`, None for an image too large for it), when the
            engine computed it while preparing (so its cost is measured with the encode); empty
            otherwise. Policies read the spectral budget off it and engines the leverage scores.
        encode: Measured energy of `Engine.prepare` (image preprocessing and the vision
            encoder), set by the runtime before planning. It is already spent, so policies plan
            the rest of the budget around it; it is reported as the request's `encode_j`. None
            when it is not measured apart (under a batching engine, an encode that overlapped
            other requests' work: their measured windows contain it).
        bases_pending: The runtime asked `prepare` to leave out the decomposition that a pruning
            plan needs (`Policy.defers_bases`): a policy that can plan only a keep-all plan
            without it raises `BasesNeeded`, and the runtime adds it (`add_bases`, measured into
            `encode`) and plans again.

    """

    request: Request
    text_tokens: int
    visual_tokens: tuple[int, ...]
    features: tuple[torch.Tensor, ...]
    context_length: int
    payload: object = None
    hint_tokens: int = 0
    bases: tuple[SketchBasis | None, ...] = ()
    encode: EnergyReport | None = None
    bases_pending: bool = False

    @property
    def input_tokens(self) -> int:
        """All prompt tokens with every visual token kept."""
        return self.text_tokens + sum(self.visual_tokens)

    def basis(self, image: int) -> SketchBasis | None:
        """The exact basis of image `image`'s features, or None where `prepare` made none."""
        return self.bases[image] if image < len(self.bases) else None

    @property
    def encode_j(self) -> float:
        """Measured energy of the encode, already spent when the request is planned (else 0)."""
        return 0.0 if self.encode is None else self.encode.total_j


@dataclass(frozen=True)
class Prediction:
    """Predicted energy of one run of the language model (the encode is not part of it).

    Attributes:
        prefill_j: Fixed cost plus the prompt tokens (text + visual kept): the LM prefill.
        decode_j: The generated tokens.
        total_j: `prefill_j + decode_j`.

    """

    prefill_j: float
    decode_j: float
    total_j: float


class CostModel(Protocol):
    """The energy model policies plan with (`joulecap.runtime.predictor.Predictor` implements it)."""

    def predict(self, text_tokens: int, visual_tokens: int, output_tokens: int) -> Prediction:
        """Predicted joules of a run that keeps `visual_tokens` and generates `output_tokens`."""
        ...

    def decode_j_per_token(self) -> float:
        """Predicted joules of one generated token (> 0)."""
        ...

    def max_output_tokens(self, budget_j: float, text_tokens: int, visual_tokens: int) -> int:
        """Largest output length whose predicted run fits `budget_j` (0 when none does)."""
        ...

    def max_visual_tokens(self, budget_j: float, text_tokens: int, output_tokens: int) -> int:
        """Largest total of kept visual tokens whose predicted run fits `budget_j` (-1 when none)."""
        ...


@dataclass(frozen=True)
class Plan:
    """How a request will run, decided by a policy before any token is generated.

    Attributes:
        visual_keep: Visual tokens to keep, per image (counts; `<=` the image's tokens).
        max_new_tokens: Hard cap on generated tokens.
        predicted_j: Predicted energy of the whole request under this plan.
        policy: Name of the policy that made the plan.
        reason: Human-readable explanation of the decision.
        selection: Token selection method used to pick which visual tokens stay.
        brevity_hint: Optional system instruction asking for an answer of the planned size.
        budget_j: The budget the plan was made for, if any.
        holds_budget: Whether the governor stops decoding at `budget_j` (False for policies that
            ignore budgets: the budget is still recorded, and `budget_exceeded` reported).
        encode_j: Measured energy of the encode (image preprocessing, vision tower), already spent
            and included in `predicted_j`.
        predicted_prefill_j: Predicted LM prefill of the run (prompt tokens as planned).
        min_j: The smallest budget this policy accepts for this request (the feasibility rule,
            `joulecap.policies.base.stated_min_j`); None for policies that never refuse.
        margin: The feasibility margin the plan was admitted with (relative, 0.2 = 20%).
        plan_margin: The planning margin the plan was sized with (at least `margin`); the
            envelope reserves the prediction with it.

    """

    visual_keep: tuple[int, ...]
    max_new_tokens: int
    predicted_j: float
    policy: str
    reason: str
    selection: str = "leverage"
    brevity_hint: str | None = None
    budget_j: float | None = None
    holds_budget: bool = True
    encode_j: float = 0.0
    predicted_prefill_j: float = 0.0
    min_j: float | None = None
    margin: float = 0.0
    plan_margin: float = 0.0


@dataclass(frozen=True)
class EnergyReport:
    """Energy of one request, with where the number came from.

    Three parts, named the same everywhere (types, responses, ledger): `encode_j` (image
    preprocessing and vision tower, measured before planning), `prefill_j` (the LM prefill up to
    the first generated token) and `decode_j`; `run_j` is the LM run (`prefill_j + decode_j`) and
    `total_j` all three.

    Attributes:
        total_j: Energy attributed to the request (encode + prefill + decode), idle share included.
        prefill_j: Energy of the LM prefill, from the start of the run to the first token.
        decode_j: Energy of the decode phase.
        idle_j: The idle-baseline share contained in `total_j` (baseline power x duration).
        duration_s: Wall time of the encode and the run.
        source: `measured`, `estimated` or `replayed`.
        meter: The meter that produced it, e.g. `nvml:0`, `jetson:VDD_IN`, `estimate:cpu`.
        samples: Number of meter samples inside the window.
        interpolated: True when the window was shorter than the meter's update period and
            part of the figure comes from power readings or the predictor.
        note: Free-form detail (fallbacks, interpolation), empty when nothing to say.

    """

    total_j: float
    prefill_j: float
    decode_j: float
    idle_j: float
    duration_s: float
    source: EnergySource
    meter: str
    samples: int = 0
    interpolated: bool = False
    note: str = ""
    encode_j: float = 0.0

    @property
    def run_j(self) -> float:
        """Energy of the LM run: prefill + decode."""
        return self.prefill_j + self.decode_j

    @property
    def dynamic_j(self) -> float:
        """Energy above the idle baseline."""
        return max(0.0, self.total_j - self.idle_j)


@dataclass(frozen=True)
class PhaseTimes:
    """Wall-clock marks (time.monotonic seconds) of one run, set by the engine."""

    start_s: float
    first_token_s: float
    end_s: float


@dataclass(frozen=True)
class GenerationResult:
    """What an engine produced for one request.

    Attributes:
        text: Decoded output text.
        token_ids: Generated token ids.
        stop_reason: Why decoding ended.
        prefill_tokens: Tokens actually fed to the LM (after pruning).
        visual_tokens_in: Visual tokens before pruning (all images).
        visual_tokens_kept: Visual tokens that entered the LM.
        times: Phase boundaries for energy attribution.

    """

    text: str
    token_ids: tuple[int, ...]
    stop_reason: StopReason
    prefill_tokens: int
    visual_tokens_in: int
    visual_tokens_kept: int
    times: PhaseTimes


@dataclass(frozen=True)
class ChatResult:
    """A finished request as the runtime returns it in-process and records it in the ledger.

    Attributes:
        profile_note: Set when the energy profile behind the plan is the uncalibrated default (the
            response's `note` says so).

    """

    request_id: str
    model: str
    text: str
    generation: GenerationResult
    plan: Plan
    energy: EnergyReport
    created_s: float
    profile_note: str = ""

    @property
    def completion_tokens(self) -> int:
        """Generated tokens."""
        return len(self.generation.token_ids)

    @property
    def budget_exceeded(self) -> bool:
        """Whether the measured energy went over the request's budget (False without one)."""
        return self.plan.budget_j is not None and self.energy.total_j > self.plan.budget_j
