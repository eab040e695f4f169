"""The one prompt template used by SFT, DPO, generation, evaluation and serving.

SPRec trains, runs DPO and infers on three different renderings (see docs/method.md#prompts-and-responses); here
every stage calls `render_prompt` (`render_candidate_prompt` in the candidate task), and the
response is always '"Title"' followed by EOS.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

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


def render_task_prompt(task: str, history_titles: Sequence[str], candidate_titles: Sequence[str],
                       item_noun: str = "books") -> str:
    """The prompt of `data.task`: "candidates" lists the candidates to choose from; "generate" names
    none (its candidates, if any, are only scored against the prompt, never shown in it)."""
    if task == "candidates":
        return render_candidate_prompt(history_titles, candidate_titles, item_noun)
    return render_prompt(history_titles, item_noun)


def render_response(title: str) -> str:
    """The completion for one item; the tokenizer's EOS is appended at tokenization time."""
    return f'"{title}"'


def parse_response(text: str, catalogue: Container[str] = frozenset()) -> str:
    """The answer's title, "" when unparsed. The whole answer (first line, outer quotes removed) when it
    is a catalogue title, since a few titles hold quotes; else the text inside the first pair of quotes,
    as SPRec reads it. Several quoted titles give the first; an opened quote never closed gives "" (a cut-off
    answer); an answer without quotes gives its first line."""
    line, whole = _answer(text)
    if whole and whole in catalogue:
        return whole
    start = line.find('"')
    if start < 0:  # no quote at all: the first line, as SPRec's evaluation reads it
        return line
    end = line.find('"', start + 1)
    return line[start + 1:end].strip() if end > 0 else ""


def names_several_titles(text: str, catalogue: Container[str] = frozenset()) -> bool:
    """An answer listing more than one quoted title (parse_response keeps the first): counted, as
    SPRec's parser silently does the same."""
    line, whole = _answer(text)
    return line.count('"') >= 4 and whole not in catalogue


def _answer(text: str) -> tuple[str, str]:
    """The answer's first line, and that line without one pair of enclosing quotes."""
    line = text.strip().split("\n")[0].strip()
    return line, line[1:-1] if len(line) >= 2 and line[0] == line[-1] == '"' else line
