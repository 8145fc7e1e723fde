"""Classification prompt templates: ``{text}`` and ``{labels}`` placeholders, nothing else.

Templates come from callers, so they are never handed to ``str.format``: a format spec such as
``{labels:>10000000}`` would make the worker build a 10 MB string (and ``>1000000000`` exhaust its
memory) before any length check. A template is parsed once into literal text and placeholder
names; format specs, conversions, attribute access and other names are refused with a message, and
the rendered length is known (and bounded) before anything is built.
"""

from __future__ import annotations

from string import Formatter

FIELDS = frozenset({"text", "labels"})
MAX_TEMPLATE_CHARS = 4_000
MAX_RENDERED_CHARS = 200_000  # far above any context window's worth of characters


class TemplateError(ValueError):
    """The template is not one the fleet renders; the message says what to change."""


class RenderedTooLong(TemplateError):
    """The template is fine, but with this text the prompt would be longer than allowed."""


def parse(template: str) -> list[tuple[str, str | None]]:
    """``[(literal, field or None), ...]``; raises TemplateError naming the problem."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"is {len(template)} characters; at most {MAX_TEMPLATE_CHARS}")
    pieces: list[tuple[str, str | None]] = []
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as exc:
        raise TemplateError(f"is not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    for literal, field, spec, conversion in parsed:
        if field is None:
            pieces.append((literal, None))
            continue
        if field not in FIELDS:
            raise TemplateError(f"uses {{{field}}}; only {{text}} and {{labels}} are placeholders")
        if spec or conversion:
            raise TemplateError(f"formats {{{field}}} with {'!' + conversion if conversion else ':' + spec!r}; "
                                "format specs and conversions are not allowed")
        pieces.append((literal, field))
    if not any(field == "text" for _, field in pieces):
        raise TemplateError("must contain {text}")
    return pieces


def check(template: str) -> str:
    parse(template)
    return template


def render(template: str, text: str, labels: str, max_chars: int = MAX_RENDERED_CHARS) -> str:
    """The prompt, or TemplateError when it would exceed ``max_chars`` (checked before building it)."""
    pieces = parse(template)
    values = {"text": text, "labels": labels}
    size = sum(len(literal) + (len(values[field]) if field else 0) for literal, field in pieces)
    if size > max_chars:
        raise RenderedTooLong(f"renders to {size} characters with this text; at most {max_chars}")
    return "".join(literal + (values[field] if field else "") for literal, field in pieces)
