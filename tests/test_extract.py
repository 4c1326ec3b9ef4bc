"""reward.extract_choice on real-looking model outputs: the labelled corpus tests/answer_corpus.jsonl (accuracy, and
never wrong where lmms-eval 0.7.3's Video-MME scorer -- copied into bench/extract_vs_lmms.py -- is right), then one
targeted case list per answer style. Corpus items: {id, style, text, options (option texts), gold (letter, or
null when the output names no option)}."""
import os
import sys
from collections import Counter

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from extract_vs_lmms import compare, extract_mcq_answer, lmms_choice, load_corpus  # noqa: E402

from reward import LETTERS, extract_choice  # noqa: E402

CORPUS = load_corpus()
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_corpus_is_well_formed():
    assert len(CORPUS) >= 150
    assert len({it["id"] for it in CORPUS}) == len(CORPUS)
    for it in CORPUS:
        assert set(it) == {"id", "style", "text", "options", "gold"}, it["id"]
        assert isinstance(it["text"], str) and it["text"].strip(), it["id"]
        assert isinstance(it["options"], list) and 2 <= len(it["options"]) <= len(LETTERS), it["id"]
        assert it["gold"] is None or it["gold"] in LETTERS[:len(it["options"])], it["id"]
    styles = Counter(it["style"] for it in CORPUS)
    assert len(styles) >= 12 and min(styles.values()) >= 5, styles
    assert 0.1 < sum(it["gold"] is None for it in CORPUS) / len(CORPUS) < 0.3   # enough "no answer" items


def test_corpus_accuracy_and_never_worse_than_lmms_eval():
    rows, ours, theirs = compare(CORPUS)
    wrong = [(r["id"], r["gold"], r["ours"]) for r in rows if r["ours"] != r["gold"]]
    assert ours >= 0.98, wrong
    assert ours > theirs
    lost = [(r["id"], r["gold"], r["ours"]) for r in rows if r["theirs"] == r["gold"] != r["ours"]]
    assert not lost, lost


def test_lmms_copy_behaves_like_lmms_eval():
    """The copied scorer is the real one (spot checks of its documented quirks), so the comparison means something."""
    assert extract_mcq_answer("The correct answer is (B).") == "B"
    assert extract_mcq_answer("A person walks in. The answer: (B)", ["A", "B", "C", "D"]) == "A"   # a leading "A "
    assert extract_mcq_answer("Based on the video, the answer is C.", ["A", "B", "C", "D"]) == "C"
    assert extract_mcq_answer("I cannot tell", ["A", "B", "C", "D"]) == ""
    assert lmms_choice("<think>A, surely.</think>\n\nD") == "D"            # reasoning stripped first
    assert lmms_choice("<think>cut off at A") == "A"                       # an unclosed block is kept


# ----------------------------------------------------------------------------- one case list per style
BALL = ["A. a blue cube", "B. a green cone", "C. the red ball", "D. a yellow cylinder"]
TOOLS = ["A. A hammer", "B. A screwdriver", "C. A wrench", "D. A saw"]
STYLE_CASES = {
    "markdown": [("**B**", "B"), ("*C*", "C"), ("__A__", "A"), ("The answer is **C**.", "C"),
                 ("**Answer:** D", "D"), ("### Final Answer\n\n**(D) a yellow cylinder**", "D"),
                 ("Answer: `B`", "B"), ("The correct choice is _B_.", "B")],
    "latex": [("\\boxed{B}", "B"), ("The final answer is $\\boxed{C}$.", "C"), ("$\\boxed{\\text{B}}$", "B"),
              ("$$\\boxed{\\textbf{A}}$$", "A"), ("We rule out A and B. Hence \\(\\boxed{C}\\)", "C"),
              ("\\boxed{D. a yellow cylinder}", "D"), ("\\boxed{E}", None)],
    "first_person": [("I choose B", "B"), ("I think it's B", "B"), ("I'd go with (C)", "C"),
                     ("I'll pick D because it is yellow.", "D"), ("I would say A, since it is blue.", "A"),
                     ("I'm going to go with D.", "D"), ("My pick: B", "B"), ("I think it is A man", None)],
    "contraction": [("It's C.", "C"), ("That's D.", "D"), ("The answer's A.", "A"), ("it'd be c", "C"),
                    ("It's gotta be B.", "B"), ("It's a dog.", None)],
    "multilingual": [("答案是B", "B"), ("答案：C", "C"), ("选B", "B"), ("选项A和B都不对，答案是Ｃ。", "C"),
                     ("答案为（D）", "D"), ("正确选项是B", "B"), ("La respuesta es C", "C"),
                     ("La respuesta correcta es la B.", "B"), ("Die Antwort ist B", "B"), ("La réponse est D", "D"),
                     ("A resposta correta é a D.", "D"), ("答えはBです。", "B"), ("정답은 B입니다.", "B"),
                     ("Ответ: B", "B"), ("抱歉，我无法观看视频。", None)],
    "negation": [("not A, but C", "C"), ("It isn't B; the answer is D", "D"), ("The answer is not A. It's C.", "C"),
                 ("Definitely not D - I'd say B.", "B"), ("No, not D. A.", "A"), ("The answer is not C.", None),
                 ("Not B.", None), ("C, not B.", "C")],
    "settle": [("A seems plausible, but B is correct", "B"), ("At first I thought C, but the answer is A.", "A"),
               ("Option A is tempting; however, the final answer is D", "D"),
               ("Between B and C, C is more likely.", "C"),
               ("Options A, B and D can be ruled out, leaving C.", "C"), ("Hmm, A or B... Going with B.", "B"),
               ("The answer is B. But wait, could it be A? No. B.", "B")],
    "option_text": [("The answer is the red ball.", "C"), ("a green cone", "B"), ("A wrench.", "C", TOOLS),
                    ("It is hard to decide between the red ball and the green cone.", None)],
    "letter_form": [("Option B", "B"), ("(B)", "B"), ("B)", "B"), ("B.", "B"), ("[B]", "B"), ("b", "B"),
                    ("C - the red ball", "C"), ("B\n\nExplanation: it is green.", "B"), ("Ans: C", "C"),
                    ("(C) is the correct one.", "C"), ("E", None)],
    "think": [("<think>Option A is wrong, B too.</think>\n\nThe answer is C.", "C"),
              ("<think>The answer should be A... no, D.</think>\n\nI'll go with D.", "D"),
              ("reasoning after an opening tag the chat template wrote</think>\n\nC. the red ball", "C"),
              ("<think>So far it looks like B, but let me check the end where", None),   # cut off mid-reasoning
              ("<think>It is C.</think><answer>B</answer>", "B"),
              ("<think>It is the red ball.</think><answer></answer>", None),          # an empty answer is none
              ("<think>x</think><answer>**B**</answer>", "B"), ("<think>x</think><answer>B, D</answer>", None)],
    "no_answer": [("I cannot determine the answer from the video.", None),
                  ("None of the options are correct.", None),
                  ("As an AI, I can't watch videos.", None), ("A person walks in.", None),
                  ("It's either B or C.", None),
                  ("The answer is B and D.", None), ("答案是B或C", None), ("B, D", None), ("The answer is", None),
                  ("I'm torn between A and D.", None),
                  ("A. a blue cube\nB. a green cone\nC. the red ball\nD. a yellow cylinder", None)],
}
CASES = [pytest.param(c[0], c[1], c[2] if len(c) > 2 else BALL, id=f"{style}-{i}")
         for style, cases in STYLE_CASES.items() for i, c in enumerate(cases)]


@pytest.mark.parametrize("text,want,options", CASES)
def test_style(text, want, options):
    assert extract_choice(text, len(options), options) == want


def test_option_count_and_bad_input():
    five = BALL + ["E. a black sphere"]
    assert extract_choice("The answer is E.", 5, five) == "E" and extract_choice("The answer is E.", 4, BALL) is None
    assert extract_choice("a black sphere", 5, five) == "E"
    assert extract_choice(None) is None and extract_choice("") is None and extract_choice("   ") is None


def test_reward_py_runs_copied_alone(tmp_path):
    """reward.py says "copy it into another project alone": in a folder with nothing else of ours it imports and
    scores the three answer types."""
    import shutil
    import subprocess
    import sys
    shutil.copy(os.path.join(ROOT, "reward.py"), tmp_path)
    code = ("from reward import score_answer as s\n"
            "o = ['A. red', 'B. green']\n"
            "print(s('<think>x</think><answer>B</answer>', dict(answer_type='choice', answer='B', options=o))['correct'],"
            " s('<think>x</think><answer>Red!</answer>', dict(answer_type='open', answer='red'))['correct'],"
            " s('so 1/2', dict(answer_type='math', answer='0.5'))['correct'])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]
