"""The brevity instruction: a system message asking for an answer of the planned size.

It lives in the runtime (not in `policies/`) because both sides need it: policies choose its text,
and engines count the prompt tokens it adds, which the plan must pay for.
"""

from __future__ import annotations

# Planned sizes that give each wording of the hint at its longest: "1 word", "3 words", "40 words"
# (the longest "briefly" form) and a 5-digit count (the 4096-token output limit needs at most 4
# digits). An engine's reserve is the most tokens any of them adds.
RESERVE_SIZES = (1, 4, 54, 13_334)


def brevity_hint(tokens: int) -> str:
    """A system instruction asking for an answer of about `tokens` tokens (~0.75 words each)."""
    words = max(1, int(tokens * 0.75))
    if words <= 3:
        return f"Answer in at most {words} word{'s' if words > 1 else ''}."
    if words <= 40:
        return f"Answer briefly, in at most {words} words."
    return f"Keep the answer under {words} words."
