"""The text side of a model input: system prompt, query and where a text safety prompt goes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Placement = Literal["prefix", "suffix", "sandwich"]


@dataclass(frozen=True)
class Conversation:
    """One user turn about one image.

    ``safety_placement`` follows the baselines' recipes:

    - ``prefix``: prompt, ``prefix_separator``, query (the DAVSP safety prefix; the reference
      joins them with nothing between, its prefix ending in ": "),
    - ``suffix``: query, newline, prompt (UniGuard's text guardrail),
    - ``sandwich``: query + prompt + query (AdaShield-S/-A), concatenated with no separator as
      AdaShield's code does (``qs = query + defense_query + query``).

    The prefix separator is the renderer's choice (an adapter attribute): the LLaVA and Qwen2-VL
    adapters use the reference's ``""``; the embedded model, which has no reference, keeps ``"\n"``.
    """

    query: str
    system_prompt: str | None = None
    safety_prompt: str | None = None
    safety_placement: Placement = "prefix"
    has_image: bool = True

    def __post_init__(self) -> None:
        if self.safety_placement not in ("prefix", "suffix", "sandwich"):
            raise ValueError(f"unknown safety_placement {self.safety_placement!r}")

    def user_text(self, prefix_separator: str = "\n") -> str:
        """The user message text with the safety prompt placed (image marker not included)."""
        query, prompt = self.query, self.safety_prompt
        if not prompt:
            return query
        if self.safety_placement == "prefix":
            return f"{prompt}{prefix_separator}{query}"
        if self.safety_placement == "suffix":
            return f"{query}\n{prompt}"
        return f"{query}{prompt}{query}"

    def messages(
        self, prefix_separator: str = "\n", default_system_prompt: str | None = None
    ) -> list[dict]:
        """Hugging Face chat messages (content parts), as ``apply_chat_template`` expects.

        ``default_system_prompt`` is used when the conversation sets none (a model's default).
        """
        messages: list[dict] = []
        system = self.system_prompt if self.system_prompt is not None else default_system_prompt
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        content: list[dict] = [{"type": "image"}] if self.has_image else []
        content.append({"type": "text", "text": self.user_text(prefix_separator)})
        messages.append({"role": "user", "content": content})
        return messages
