"""The keep-all estimate a policy is asked with before the encode (`runtime/image_costs.py`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from _factories import prepared
from PIL import Image

from joulecap.runtime.image_costs import SAFETY, TEMPLATE_TOKENS, ImageCosts
from joulecap.runtime.predictor import Predictor
from joulecap.runtime.types import EnergyReport

PRED = Predictor(1.0, 0.01, 0.1)


def _encoded(visual: tuple[int, ...], encode_j: float) -> object:
    report = EnergyReport(
        total_j=encode_j, prefill_j=0.0, decode_j=0.0, encode_j=encode_j, source="measured",
        meter="test", duration_s=0.01, idle_j=0.0,
    )  # fmt: skip
    return replace(prepared(visual=visual), encode=report)


def test_no_history_no_estimate_and_no_images_no_visual_cost() -> None:
    costs = ImageCosts()
    two_images = replace(prepared().request, images=(Image.new("RGB", (8, 8)),) * 2)
    assert costs.keep_all_bound_j(two_images, PRED, 1, 0.2) is None
    text_only = prepared().request
    text = TEMPLATE_TOKENS + len(text_only.messages[0].text.encode())
    assert costs.keep_all_bound_j(text_only, PRED, 1, 0.2) == pytest.approx(
        SAFETY * PRED.predict(text, 0, 1).total_j * 1.2
    )


def test_the_dearest_recent_image_sets_the_bound_per_image() -> None:
    costs = ImageCosts()
    costs.observe(_encoded((64,), 0.3))  # type: ignore[arg-type]
    costs.observe(_encoded((144, 32), 0.5))  # type: ignore[arg-type]  # 0.25 J an image
    request = replace(prepared().request, images=(Image.new("RGB", (8, 8)),) * 2)
    text = TEMPLATE_TOKENS + len(request.messages[0].text.encode())
    want = SAFETY * (2 * 0.3 + PRED.predict(text, 2 * 144, 3).total_j * 1.5)
    assert costs.keep_all_bound_j(request, PRED, 3, 0.5) == pytest.approx(want)
    # An encode that was not measured apart teaches nothing.
    costs.observe(prepared(visual=(999,)))
    assert costs.keep_all_bound_j(request, PRED, 3, 0.5) == pytest.approx(want)
