"""The one prompt template used by SFT, DPO, generation, evaluation and serving.

SPRec trains, runs DPO and infers on three different renderings (see seeds-spec §2.1); here
every stage calls `render_prompt` (`render_candidate_prompt` in the candidate task), and the
response is always '"Title"' followed by EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

HEADER_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
HEADER_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def instruction_text(item_noun: str) -> str:
    return f"Given a list of {item_noun} the user recently enjoyed, recommend one new item from the {item_noun} catalogue that the user may like."


def render_prompt(history_titles: Sequence[str], item_noun: str = "books") -> str:
    """Alpaca-style prompt ending in '### Response:\\n'. An empty history gives the no-input
    form, which is exactly CFT's counterfactual prompt (history removed, nothing else changed)."""
    instruction = instruction_text(item_noun)
    if not history_titles:
        return f"{HEADER_NO_INPUT}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    listed = ", ".join(f'"{t}"' for t in history_titles)
    user_input = f"The user has enjoyed the following {item_noun} before: {listed}"
    return f"{HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{user_input}\n\n### Response:\n"


def render_candidate_prompt(history_titles: Sequence[str], candidate_titles: Sequence[str],
                            item_noun: str = "books") -> str:
    """The candidate task's prompt (S-DPO / LLaRA style) in the same Alpaca frame and with the same
    '"Title"' answer. The candidates come last, so left truncation in training cuts the header, not
    them; an empty history gives CFT's counterfactual (history removed, candidates kept)."""
    instruction = (f"Given a list of {item_noun} the user recently enjoyed, choose the one item from the "
                   f"{len(candidate_titles)} candidate {item_noun} that the user will enjoy next. Answer with its title.")
    listed = ", ".join(f'"{t}"' for t in candidate_titles)
    user_input = f"Candidates: {listed}"
    if history_titles:
        history = ", ".join(f'"{t}"' for t in history_titles)
        user_input = f"The user has enjoyed the following {item_noun} before: {history}\n{user_input}"
    return f"{HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{user_input}\n\n### Response:\n"


def render_response(title: str) -> str:
    """The completion for one item; the tokenizer's EOS is appended at tokenization time."""
    return f'"{title}"'


def parse_response(text: str) -> str:
    """The title inside the first pair of quotes (or up to the end / first newline if unclosed)."""
    text = text.strip()
    if text.startswith('"'):
        body = text[1:]
        end = body.rfind('"') if body.count('"') > 1 and body.endswith('"') else body.find('"')
        return (body[:end] if end >= 0 else body.split("\n")[0]).strip()
    return text.split("\n")[0].strip()
