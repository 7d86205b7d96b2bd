"""What an animation does at each frame: keyframe schedules of its transform and its prompts.

A schedule is a number (the same every frame) or keyframes ``"0:1.0, 30:1.05, 60:1.0"``: values
at those frames, linearly interpolated between them, held before the first and after the last
(the syntax of the VQGAN+CLIP animation notebooks). Prompts change as a story, ``"a^b^c"``, each
part getting an equal share of the frames in order, or at exact frames given as ``"FRAME:TEXT"``.
Plain Python, no torch: the command line checks all of this before any model loads.

Example:
    >>> value_at(parse_schedule("0:1.0, 10:2.0"), 5)
    1.5
    >>> prompts_by_frame("a red circle^a blue square", [], 4)
    ['a red circle', 'a red circle', 'a blue square', 'a blue square']
"""

from __future__ import annotations

__all__ = ["check_animation", "parse_prompt_at", "parse_schedule", "prompts_by_frame", "schedule_values", "value_at"]


def parse_schedule(spec: str | float | int, name: str = "schedule") -> list[tuple[int, float]]:
    """Keyframes ``[(frame, value), ...]`` in frame order from a number or ``"F:V, F:V"``.

    Raises:
        ValueError: naming ``name``, for text that does not parse, a negative frame, or frames
            out of order or repeated.
    """
    text = str(spec).strip()
    if ":" not in text:
        return [(0, _number(text, name, text))]
    keyframes = []
    for part in text.split(","):
        frame, colon, value = part.partition(":")
        if not colon or not frame.strip().isdigit():
            raise ValueError(f"{name} {text!r}: {part.strip()!r} is not FRAME:VALUE with FRAME a "
                             "whole number >= 0")
        keyframes.append((int(frame), _number(value.strip(), name, text)))
    frames = [f for f, _ in keyframes]
    if frames != sorted(set(frames)):
        raise ValueError(f"{name} {text!r}: keyframes must be in increasing frame order")
    return keyframes


def value_at(keyframes: list[tuple[int, float]], frame: int) -> float:
    """The schedule's value at ``frame``: interpolated between keyframes, held outside them."""
    if frame <= keyframes[0][0]:
        return keyframes[0][1]
    for (f0, v0), (f1, v1) in zip(keyframes, keyframes[1:]):
        if frame <= f1:
            return v0 + (v1 - v0) * (frame - f0) / (f1 - f0)
    return keyframes[-1][1]


def schedule_values(spec: str | float | int, frames: int, name: str = "schedule") -> list[float]:
    """The schedule's value at each of ``frames`` frames."""
    keyframes = parse_schedule(spec, name)
    return [value_at(keyframes, f) for f in range(frames)]


def parse_prompt_at(spec: str) -> tuple[int, str]:
    """``"FRAME:TEXT"`` -> ``(FRAME, TEXT)``; TEXT keeps the full prompt syntax."""
    frame, colon, text = spec.partition(":")
    if not colon or not frame.strip().isdigit():
        raise ValueError(f"prompt_at {spec!r} must be FRAME:TEXT with FRAME a whole number >= 0")
    if not text.strip():
        raise ValueError(f"prompt_at {spec!r}: the prompt is empty")
    return int(frame), text.strip()


def prompts_by_frame(prompt: str, prompt_at: list[str], frames: int) -> list[str]:
    """Each frame's text prompt.

    Without ``prompt_at``, a ``^`` in ``prompt`` makes a story: part i of n runs from frame
    ``i * frames // n`` (equal shares; the later parts get the frames left over). With ``prompt_at``, ``prompt`` runs until the first switch and
    each ``"FRAME:TEXT"`` from its frame on.

    Raises:
        ValueError: an empty story part, more parts than frames, a switch at or beyond
            ``frames``, two switches at one frame, or both a story and switches.
    """
    parts = prompt.split("^")
    if prompt_at and len(parts) > 1:
        raise ValueError("give a story (parts joined by ^) or prompt_at switches, not both")
    if any(not p.strip() for p in parts) and len(parts) > 1:
        raise ValueError(f"story {prompt!r} has an empty part")
    if len(parts) > frames:
        raise ValueError(f"story {prompt!r} has {len(parts)} parts but there are only {frames} frames")
    switches = {0: parts[0].strip()} if prompt_at else {
        i * frames // len(parts): p.strip() for i, p in enumerate(parts)}
    seen = set()
    for spec in prompt_at:
        frame, text = parse_prompt_at(spec)
        if frame >= frames:
            raise ValueError(f"prompt_at {spec!r}: frame {frame} is beyond the last frame "
                             f"({frames - 1})")
        if frame in seen:
            raise ValueError(f"prompt_at: two prompts at frame {frame}")
        seen.add(frame)
        switches[frame] = text
    out, current = [], switches[0]
    for f in range(frames):
        current = switches.get(f, current)
        out.append(current)
    return out


def _number(text: str, name: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {spec!r}: {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} {spec!r}: {text!r} is not a finite number")
    return value


def check_animation(a) -> None:
    """Raise ValueError naming the first ``animation.*`` setting (section ``a``) out of range."""
    from .config import BORDERS

    if a.frames < 1:
        raise ValueError(f"frames must be >= 1, got {a.frames}")
    if a.steps_per_frame < 0 or (a.first_steps is not None and a.first_steps < 0):
        raise ValueError("steps_per_frame and first_steps must be >= 0")
    for name in ("zoom", "angle", "translate_x", "translate_y"):
        values = schedule_values(a[name], a.frames, name)
        if name == "zoom" and min(values) <= 0:
            raise ValueError(f"zoom {a.zoom!r} must stay > 0 (1 is no zoom)")
    if a.border not in BORDERS:
        raise ValueError(f"unknown border {a.border!r}; available: {', '.join(BORDERS)}")
    if not 1 <= a.fps <= 120:
        raise ValueError(f"fps must be in 1..120, got {a.fps}")
