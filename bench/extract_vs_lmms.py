"""Answer extraction: reward.extract_choice against lmms-eval's Video-MME scorer on the labelled corpus
tests/answer_corpus.jsonl (hand-written model outputs; "gold" is the option letter the output names, or null when it
names none: refusals, truncation, ambiguity).

    python bench/extract_vs_lmms.py                 # accuracies, then every item where the two differ
    python bench/extract_vs_lmms.py --all_wrong     # also the items both get wrong

An item is right when the extracted letter equals gold; a null gold is right only when nothing is extracted (None
here, "" from lmms-eval). lmms-eval is run the way its evaluator runs it: strip_reasoning_tags with the CLI's
default tags, then the Video-MME task's extract_characters_regex. Both are copied below so this runs offline,
without lmms-eval installed.
"""
import json
import os
import sys
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CORPUS = os.path.join(ROOT, "tests", "answer_corpus.jsonl")

# =============================================================================
# BEGIN verbatim copy from lmms-eval 0.7.3 (PyPI wheel lmms_eval-0.7.3-py3-none-any.whl), MIT License,
# Copyright (c) 2025 LMMs-Lab. Three pieces, unchanged except where marked:
#   lmms_eval/api/reasoning.py                 strip_reasoning_tags   (the evaluator applies it before scoring)
#   lmms_eval/__main__.py                      the --reasoning_tags default (_DEFAULT_REASONING_TAGS below)
#   lmms_eval/tasks/_task_utils/mcq_extract.py _DEFAULT_CHOICES, _ANSWER_PHRASES, _FORMAT_PRIORITY,
#                                              extract_mcq_answer
#   lmms_eval/tasks/videomme/utils.py          extract_characters_regex (its function-level import of
#                                              extract_mcq_answer dropped: the function is defined here)


def strip_reasoning_tags(text: str, tag_pairs: List[List[str]]) -> str:
    """Remove reasoning tag blocks from model output.

    Args:
        text: Raw model output string
        tag_pairs: List of [start_tag, end_tag] pairs,
                   e.g. [["<think>", "</think>"], ["<reasoning>", "</reasoning>"]]

    Returns:
        Cleaned text with reasoning blocks removed.

    Note:
        Tag matching is case-sensitive (``<THINK>`` is not treated as ``<think>``),
        and an unclosed opening tag with no matching closing tag is left untouched
        and passes through unstripped.
    """
    result = text
    for start_tag, end_tag in tag_pairs:
        while start_tag in result and end_tag in result:
            start = result.find(start_tag)
            end = result.find(end_tag, start)
            if start != -1 and end != -1:
                result = result[:start] + result[end + len(end_tag) :]
            else:
                break
        # Some chat templates prefill the opening reasoning tag in the prompt,
        # so the model completion may contain only the closing tag plus the
        # final answer. In that case, keep the suffix after the final closing
        # tag so downstream scorers see the answer instead of the reasoning.
        if end_tag in result and start_tag not in result:
            result = result.rsplit(end_tag, 1)[-1]
    return result.strip()


_DEFAULT_REASONING_TAGS = [["<think>", "</think>"], ["<analysis>", "</analysis>"]]   # __main__.py, parsed

_DEFAULT_CHOICES = ["A", "B", "C", "D", "E", "F", "G", "H"]

_ANSWER_PHRASES = [
    "the answer is",
    "answer is",
    "the correct answer is",
    "correct answer is",
    "the best answer is",
    "best answer is",
    "the correct option is",
    "correct option is",
    "the best option is",
    "best option is",
    "the choice is",
    "choice is",
    "the correct choice is",
    "correct choice is",
    "i choose",
    "i select",
    "i pick",
    "my answer is",
    "my choice is",
    # Korean
    "옵션",
    "정답은",
    "답은",
    "답:",
    # Chinese
    "答案是",
    "答案为",
    "选",
    # Japanese
    "答えは",
]

# Higher = more confident that this is the intended answer.
_FORMAT_PRIORITY = {
    "start": 10,
    "end": 9,
    "phrase": 7,
    "parentheses": 6,
    "period": 5,
    "colon": 4,
    "right_paren": 3,
    "space": 2,
    "fallback": 0,
}


def extract_mcq_answer(response: str, choices: Optional[List[str]] = None) -> str:
    """Extract a multiple-choice answer letter from model output.

    Searches for choice letters in various common formats and returns the
    best candidate using a priority ranking.  When multiple candidates
    match, prefers the **last** occurrence in the **highest-priority**
    format — this naturally handles reasoning-style outputs where the
    model discusses options before giving its final answer.

    Args:
        response: Model output (should already have ``<think>`` tags
            stripped by the postprocessing pipeline).
        choices: Valid choice letters.  Defaults to ``["A".."H"]``.

    Returns:
        Uppercase choice letter, or ``""`` if none found.
    """
    if not response or not response.strip():
        return ""

    all_choices = choices or _DEFAULT_CHOICES

    text = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(char)
    # Pad with spaces for boundary matching.
    text = " " + text + " "

    candidates: list = []  # (letter, position, format_name)

    # --- (A) ---
    for ch in all_choices:
        if f"({ch})" in text:
            candidates.append((ch, text.rfind(f"({ch})"), "parentheses"))

    # --- A. ---
    for ch in all_choices:
        if f"{ch}." in text:
            candidates.append((ch, text.rfind(f"{ch}."), "period"))

    # --- A: ---
    for ch in all_choices:
        if f"{ch}:" in text:
            candidates.append((ch, text.rfind(f"{ch}:"), "colon"))

    # --- A) ---
    for ch in all_choices:
        if f"{ch})" in text:
            candidates.append((ch, text.rfind(f"{ch})"), "right_paren"))

    # --- A followed by space ---
    for ch in all_choices:
        if f"{ch} " in text:
            candidates.append((ch, text.rfind(f"{ch} "), "space"))

    # --- Common answer phrases ("the answer is A", etc.) ---
    text_lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        idx = text_lower.find(phrase)
        if idx != -1:
            after = idx + len(phrase)
            for ch in all_choices:
                ch_pos = text.find(ch, after)
                if ch_pos != -1:
                    candidates.append((ch, ch_pos, "phrase"))

    # --- Starts with standalone choice letter (not part of a word) ---
    stripped = text.strip()
    for ch in all_choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((ch, 0, "start"))

    # --- Ends with standalone choice letter ---
    for ch in all_choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((ch, len(text) - 1, "end"))

    # --- Fallback: any occurrence (lowest priority) ---
    if not candidates:
        for ch in all_choices:
            if ch in text:
                candidates.append((ch, text.rfind(ch), "fallback"))

    if not candidates:
        return ""

    # Sort by (priority DESC, position DESC) — highest-priority format
    # wins; within the same format, later position (closer to end) wins.
    candidates.sort(
        key=lambda x: (_FORMAT_PRIORITY.get(x[2], 0), x[1]),
        reverse=True,
    )
    return candidates[0][0]


def extract_characters_regex(s):
    return extract_mcq_answer(s, choices=["A", "B", "C", "D"])

# END verbatim copy from lmms-eval 0.7.3
# =============================================================================


def lmms_choice(text, num_options=4):
    """lmms-eval's Video-MME answer for one raw output, as its evaluator computes it; None for "" (no answer).
    Video-MME has 4 options and its scorer knows only A-D; for other counts the shared extract_mcq_answer is given
    the item's own letters, as lmms-eval's other MCQ tasks do."""
    t = strip_reasoning_tags(text, _DEFAULT_REASONING_TAGS)
    got = (extract_characters_regex(t) if num_options == 4 else
           extract_mcq_answer(t, choices=list("ABCDEFGHIJ"[:num_options])))
    return got or None


def load_corpus(path=CORPUS):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def labelled_options(item):
    """The item's option texts as the pipeline hands them to extract_choice (data._norm_options: "A. text")."""
    return [f"{'ABCDEFGHIJ'[i]}. {o}" for i, o in enumerate(item["options"])]


def ours(item):
    from reward import extract_choice
    return extract_choice(item["text"], len(item["options"]), labelled_options(item))


def theirs(item):
    return lmms_choice(item["text"], len(item["options"]))


def compare(items):
    """-> (rows, our accuracy, their accuracy); a row per item: id, style, text, gold, ours, theirs."""
    rows = [dict(id=it["id"], style=it["style"], text=it["text"], gold=it["gold"], ours=ours(it), theirs=theirs(it))
            for it in items]
    n = len(rows)
    return rows, sum(r["ours"] == r["gold"] for r in rows) / n, sum(r["theirs"] == r["gold"] for r in rows) / n


def _snippet(text, width=70):
    t = " ".join(text.split())
    return t if len(t) <= width else t[:width // 2 - 2] + " .. " + t[-(width // 2 - 2):]


def main(argv):
    items = load_corpus()
    rows, acc_ours, acc_theirs = compare(items)
    n = len(rows)
    print(f"corpus: {os.path.relpath(CORPUS, ROOT)}, {n} items, {sum(r['gold'] is None for r in rows)} with no answer")
    print(f"ours (reward.extract_choice):               {acc_ours:.1%}  ({round(acc_ours * n)}/{n})")
    print(f"lmms-eval 0.7.3 (Video-MME, think stripped): {acc_theirs:.1%}  ({round(acc_theirs * n)}/{n})")
    diff = [r for r in rows if r["ours"] != r["theirs"]]
    show = lambda v: "-" if v is None else v  # noqa: E731
    for title, sel in (("ours right, lmms-eval wrong", [r for r in diff if r["ours"] == r["gold"]]),
                       ("lmms-eval right, ours wrong", [r for r in diff if r["theirs"] == r["gold"]]),
                       ("both wrong, differently", [r for r in diff if r["gold"] not in (r["ours"], r["theirs"])])):
        print(f"\n{title}: {len(sel)}")
        if sel:
            print(f"  {'id':<20} {'gold':>4} {'ours':>4} {'lmms':>4}  text")
        for r in sel:
            print(f"  {r['id']:<20} {show(r['gold']):>4} {show(r['ours']):>4} {show(r['theirs']):>4}  "
                  f"{_snippet(r['text'])!r}")
    if "--all_wrong" in argv:
        same = [r for r in rows if r["ours"] == r["theirs"] != r["gold"]]
        print(f"\nboth wrong, the same way: {len(same)}")
        for r in same:
            print(f"  {r['id']:<20} {show(r['gold']):>4} {show(r['ours']):>4}  {_snippet(r['text'])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
