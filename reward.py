"""
reward.py -- what a response answered and whether it is right: the rule-based reward of rl.py and the metric of eval.py,
all of it in this file. Three answer types: "choice" (extract_choice: which option letter a free-form answer names,
as an answer writes it, checked on tests/answer_corpus.jsonl), "open" (extract_open + open_equal: normalised exact
match of a short text) and "math" (extract_math + math_equal: our rules, then `math-verify` when installed). The
format RL rewards is <think>...</think><answer>...</answer> (follows_format). Only `re` and `unicodedata`; sympy and
math-verify are imported when a math answer needs them. Copy it into another project alone.

    from reward import score_answer
    score_answer("<think>...</think><answer>B</answer>", dict(answer_type="choice", answer="B", options=opts))
    # -> dict(extracted="B", correct=True, format=True)
"""
import re
import unicodedata

LETTERS = "ABCDEFGHIJ"                      # option letters, in order
ANSWER_TYPES = ("choice", "open", "math")   # lettered options | short free text | a number or expression
ANSWER_TAG_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)   # what an answer tag holds

# -----------------------------------------------------------------------------
# the answer format
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>(?P<answer>.*?)</answer>", re.S)   # that format


def follows_format(text, num_options=4, options=None, answer_type="choice"):
    """The format RL rewards (and eval reports): <think>...</think><answer>...</answer>, and the answer tag holds an
    answer of the record's type: exactly one option as extract_choice reads it (an empty tag, "B or C" or a refusal
    in the tag is not the format); for "math" an answer extract_math reads; for "open" any non-empty text."""
    m = FORMAT_RE.fullmatch(text.strip())
    if m is None:
        return False
    if answer_type == "math":
        return extract_math(m["answer"]) is not None
    if answer_type == "open":
        return bool(m["answer"].strip())
    return extract_choice(m["answer"], num_options, options) is not None


# ---- answer extraction: which option a free-form answer names (tests/test_extract.py, its corpus and the lmms-eval
# comparison: bench/extract_vs_lmms.py). A letter "as an answer writes it": "(C)", "[C]", an upper-case C anywhere
# but inside a word, a lower-case c only before punctuation or the end ("the answer is a dog" names no option) --
# and never the first of a list ("B or C", "A, B and D" decide nothing).
_LIST = r"(?!\s*(?:,|/|、|\bor\b|\band\b|或|和)\s*\(?[A-J]\b)"
_LETTER = rf"(?P<x>\(\s*[A-Ja-j]\s*\)|\[\s*[A-Ja-j]\s*\]|[A-J](?![A-Za-z])|[a-j](?=\s*[.,;:!?)]|\s*$)){_LIST}"
# after a weaker cue an upper-case letter must also end its clause: "it's A man" and "so A person" are no answers
_SOFT_LETTER = (r"(?P<x>\(\s*[A-Ja-j]\s*\)|[A-J](?=\s*(?:[^\w\s]|$)|\s+(?:because|since|as|given)\b)"
                rf"|[a-j](?=\s*[.,;:!?)]|\s*$)){_LIST}")
_BEFORE_LETTER = r"\s*[:=\-–—]?\s*(?i:(?:(?:la|el|a|die|der|le|the)\s+)?(?:option|opci[oó]n|opção|choice|letter)?\s*)"
_ANSWER_PHRASES = "|".join([     # say "this is my answer", in the languages models answer in
    r"\b(?:final|correct|right|best|my)?\s*answer(?:'s|\s+(?:is|would\s+be|should\s+be|must\s+be|will\s+be))?",
    r"\b(?:correct|right|best|final|my)\s+(?:option|choice|pick|one)(?:\s+is)?", r"\b(?:option|choice)\s+is",
    r"\bI(?:'ll|'d|\s+will|\s+would)?\s+(?:choose|select|pick|opt\s+for)", r"\bgo(?:ing)?\s+with",
    r"答案(?:应该|应|就)?(?:是|为)?", r"选项(?:是|为)", r"选择?(?!项)", r"答えは", r"正解は?", r"정답은?", r"답은", r"답\s*:",
    r"respuesta(?:\s+correcta)?\s+es", r"r[ée]ponse\s+est", r"antwort\s+(?:ist|lautet)", r"risposta\s+[èe]",
    r"resposta(?:\s+correta)?\s+[ée]", r"ответ"])
_SOFT_PHRASES = "|".join([       # first-person, contracted and concluding statements: "I think it's B", "So, C."
    r"\b(?:it|that|this)(?:'s|'d\s+be)", r"\b(?:is|was)", r"\b(?:gotta|would|must|should|ha(?:s|ve)\s+to)\s+be",
    r"\bI(?:'d|'ll|\s+would|\s+will)?\s+(?:say|guess|think|believe)", r"\b(?:corresponds|points|refers)\s+to",
    r"\b(?:so|thus|hence|therefore|leaving|definitely|clearly|probably|certainly)\s*,?"])
_ECHO_RE = re.compile(r"^\s*\(?([A-J])[.):]", re.M)   # lines that start like a listed option: "B. 4"

# The rules, in order; the first that finds a valid letter decides. Within the answer and soft rules the LAST match
# wins, because a final answer follows the options it weighed ("At first I thought C, ... the answer is A").
# 1. the whole answer is a letter: "C", "(c)", "[B]", "Option B", "Answer: D." (markdown/LaTeX already removed)
_BARE_RE = re.compile(r"(?i:(?:final\s+)?(?:answer|option|choice)\s*[:\-]?\s*)?"
                      r"[(\[{'\"]?\s*([A-Ja-j])\s*[)\]}'\"]?[.!]?")
# 2. LaTeX's final answer: what the last \boxed{} holds is read on its own ("\boxed{B. She lost her keys}")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
# 3. an answer phrase, then the letter: "the answer is (D)", "Answer: c", "I'd go with C", "答案：C", "选B"; a negated
#    letter never follows one directly ("the answer is not A" matches nothing)
_ANSWER_RE = re.compile(rf"(?i:{_ANSWER_PHRASES}){_BEFORE_LETTER}{_LETTER}")
# 4. a softer statement: "it's B", "I'd say C.", "So, C.", "not A, but C", "B is correct", "C best describes ..."
_SOFT_RES = [re.compile(rf"(?i:{_SOFT_PHRASES}){_BEFORE_LETTER}{_SOFT_LETTER}"),
             re.compile(rf"(?i:\bnot)\s+\(?[A-J]\)?\s*[,;]?\s*(?i:but|rather)\s+(?i:it's\s+)?{_SOFT_LETTER}"),
             re.compile(r"(?P<x>\(\s*[A-J]\s*\)|\b[A-J])\s*(?i:(?:is|seems|looks)\s+(?:to\s+be\s+)?(?:the\s+|my\s+)?"
                        r"(?:most\s+|more\s+)?(?:correct|right|best|answer|likely|accurate)"
                        r"|(?:best\s+)?(?:describes|matches|fits))\b")]
# 5. the answer starts with the option as the prompt lists it: "C. Blue sky", "(C) ...", "C) ...", "C, ...", "C - ...",
#    "C is ...", "C" alone on the first line -- unless the answer just echoes the option list ("A. 3\nB. 4 ...")
_HEAD_RE = re.compile(rf"\s*(?:[(\[]([A-Ja-j])[)\]]|([A-Ja-j]){_LIST}\s*[.),:](?!\d)|([A-J])\s+(?:is|-|–|—)\s"
                      r"|([A-J])[ \t]*\n)")
# 6. the answer ends with a lone letter after a line break, a colon or a full stop: "**Answer**\n\nD", "Not D. A."
_TAIL_RE = re.compile(r"(?:^|\n|:|[.!?]\s)\s*(?i:option\s+)?[(\[]?([A-J])[)\]]?\s*[.!]?\s*$")
# 7. the text of exactly one option: "The answer is the red ball" (done in _read, from `options`)


def _clean(text):
    """The text as the rules read it: full-width forms folded ("Ｂ", "（B）", "答案：B"), LaTeX wrappers and markdown
    emphasis dropped ("$\\boxed{\\text{B}}$" -> "\\boxed{B}"; "**B**", "_B_", "`B`", "### Answer")."""
    t = unicodedata.normalize("NFKC", text)
    t = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", t)
    t = re.sub(r"\$|\\[()\[\]]", " ", t)
    return re.sub(r"\*+|`+|^\s*#+\s*|(?<!\w)__?(?=\S)|(?<=\S)__?(?!\w)", "", t, flags=re.M)


def _last_letter(regexes, t, valid):
    """The valid letter of the last match (by position) of any of `regexes` in t, or None."""
    hits = [(m.start("x"), re.search(r"[A-Ja-j]", m["x"]).group().upper()) for r in regexes for m in r.finditer(t)]
    hits = [h for h in hits if h[1] in valid]
    return max(hits)[1] if hits else None


def _read(t, valid, texts):
    """The option one piece of an answer (an answer tag, a box, the text after </think>, the whole text) names."""
    t = t.strip()
    m = _BARE_RE.fullmatch(t)
    if m:
        return m.group(1).upper() if m.group(1).upper() in valid else None
    boxed = _BOXED_RE.findall(t)
    if boxed and boxed[-1].strip():
        got = _read(boxed[-1], valid, texts)
        if got:
            return got
    got = _last_letter([_ANSWER_RE], t, valid) or _last_letter(_SOFT_RES, t, valid)
    if got:
        return got
    echo = len(set(_ECHO_RE.findall(t))) > 1
    for m in ((None if echo else _HEAD_RE.match(t)), _TAIL_RE.search(t)):
        letter = next((g for g in m.groups() if g), "").upper() if m else ""
        if letter and letter in valid:
            return letter
    if texts:
        low = t.rstrip(".!").strip().lower()
        hits = [i for i, o in enumerate(texts) if o and (low == o or re.search(rf"\b{re.escape(o)}\b", low))]
        if len(hits) == 1:
            return valid[hits[0]]
    return None


def extract_choice(text, num_options=4, options=None):
    """The option letter a model's answer names, or None.

    Where: the last <answer>...</answer> alone when there is one (the answer the model declared; an empty or
    unreadable tag is no answer); else the text after the last </think>, then the whole text. An unclosed <think>
    is a response cut off mid-reasoning: None. What (the rules above, in order): the whole answer being a letter
    ("C", "(c)", "**B**", "Option B"); the last \\boxed{}; the last answer phrase ("the answer is C", "Answer: (c)",
    "I choose B", "答案是B", "La respuesta es C"); the last softer statement ("I think it's B", "that's D",
    "not A, but C", "B is correct", "So, C."); a leading "C. Blue sky" / "C) ..."; a trailing lone letter; else the
    text of exactly one option (options=["A. Candles", ...] -> "candles" gives "A"). Never the first capital of a
    word: "Based on the video, the answer is C." is C (a first-capital regex says B) and "A person walks." is None."""
    if not isinstance(text, str):
        return None
    valid = LETTERS[:num_options]
    # option texts without their label and leading article: "B. A red ball" -> "red ball"
    texts = [re.sub(r"^(?:a|an|the)\s+(?=\S)", "", re.sub(r"^\(?[A-J][.):]\s*", "", o.strip()).lower()).rstrip(".")
             for o in options[:num_options]] if options else None
    tags = ANSWER_TAG_RE.findall(text)
    if tags:
        return _read(_clean(tags[-1]), valid, texts)
    if "<think>" in text and "</think>" not in text:
        return None
    parts = [text.rsplit("</think>", 1)[1]] if "</think>" in text else []
    for part in parts + [text]:
        got = _read(_clean(part), valid, texts)
        if got:
            return got
    return None


# ---- open-ended and math answers (tests/test_tasks.py). Where the answer is: answer_text (the same rule as
# extract_choice). Open answers: normalised exact match. Math answers: math_equal -- our rules, then `math-verify`
# when it is installed (imported lazily), else a sympy check of simple expressions.
def answer_text(text):
    """The part of a response that states its answer: the last <answer>...</answer> when there is one; None for a
    response cut off inside <think> (an unclosed tag); else the text after the last </think>; else the whole text."""
    if not isinstance(text, str):
        return None
    tags = ANSWER_TAG_RE.findall(text)
    if tags:
        return tags[-1]
    if "<think>" in text and "</think>" not in text:
        return None
    return text.rsplit("</think>", 1)[1] if "</think>" in text else text


def last_boxed(text):
    """The content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced, or None."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    j = text.find("{", i) if i >= 0 else -1
    if j < 0 or text[i:j].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


_NUM_RE = re.compile(r"-?\d+(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_FINAL_RE = re.compile(r"(?i:(?:final\s+)?answer\s*(?:is|:|=)|####)\s*(?P<x>[^\n]+)")


def extract_math(text):
    """The final answer of a math response, as text, or None. Where: answer_text. What: the last \\boxed{} in it;
    else what follows the last "answer is" / "answer:" / "####" (up to the line's end; "<answer>The answer is 5
    </answer>" -> "5"); else, in an answer tag, the whole tag; else, in free text, the last number ("... so she has
    18 apples." -> "18")."""
    part = answer_text(text)
    if part is None:
        return None
    boxed = last_boxed(part)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    m = list(_FINAL_RE.finditer(part))
    if ANSWER_TAG_RE.search(text) and not m:
        return part.strip() or None
    if m:
        got = m[-1]["x"].strip().rstrip(".").strip()
        if got:
            return got
    nums = _NUM_RE.findall(part)
    return nums[-1].strip() if nums else None


def _norm_math(s):
    """Our normalisation of a math answer (rules 1-6 of math_equal): LaTeX wrappers and spacing dropped, units and
    currency dropped after a number, thousands commas dropped, "x = 5" -> "5", \\dfrac -> \\frac."""
    s = unicodedata.normalize("NFKC", str(s)).strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\left|\\right|\\[,;:! ]|\$|\\\(|\\\)|\\\[|\\\]", " ", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\%|%|°", " ", s)            # degrees and percent signs
    s = re.sub(r"^\s*[A-Za-z]\s*=\s*(?=\S)", "", s)                     # "x = 5" -> "5"
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)                       # "1,000" -> "1000"
    s = s.strip().rstrip(".").strip()
    m = re.fullmatch(r"(-?\s*(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?)\s*[A-Za-z][A-Za-z .]*", s)   # "18 dollars"
    if m:
        s = m[1]
    return re.sub(r"\s+", " ", s).strip()


def _to_number(s):
    """A normalised answer as an exact Fraction ("3/4", "-2", "0.5", "\\frac{3}{4}", "\\frac34"), else None."""
    from fractions import Fraction
    t = s.replace(" ", "")
    m = re.fullmatch(r"(-?)\\frac\{?(-?\d+(?:\.\d+)?)\}?\{?(\d+(?:\.\d+)?)\}?", t)
    if m and not (len(m[2]) > 1 and "{" not in t):   # "\frac34" = 3/4; "\frac{12}{5}" needs the braces
        return (-1 if m[1] else 1) * Fraction(m[2]) / Fraction(m[3]) if Fraction(m[3]) else None
    try:
        return Fraction(t) if re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?", t) and not t.endswith("/0") else None
    except (ValueError, ZeroDivisionError):
        return None


_SYMPY_NAMES = {"sqrt", "pi"}   # the only names longer than a letter


def _sympy_expr(s):
    """A simple LaTeX / plain expression -> a sympy expression, or None. Only digits, one-letter variables, + - * /
    ^ ( ), \\frac, \\sqrt, \\pi, \\cdot, \\times are read (parse_expr evaluates Python: nothing else reaches it)."""
    t = s
    for _ in range(5):   # innermost first: \frac{a}{b} -> ((a)/(b)), \sqrt{a} -> sqrt(a)
        t = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", t)
        t = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", t)
    t = re.sub(r"\\sqrt\s*(\d+|[a-z])", r"sqrt(\1)", t)
    t = t.replace("\\pi", " pi ").replace("\\cdot", "*").replace("\\times", "*").replace("{", "(").replace("}", ")")
    t = t.replace("^", "**")
    if len(t) > 200 or not re.fullmatch(r"[0-9a-z+\-*/().\s]*", t) or not t.strip():
        return None
    if re.search(r"\d\s+\.?\d", t):   # "1 1/2" is a mixed number, not 1 * 1/2: not read
        return None
    if any(len(w) > 1 and w not in _SYMPY_NAMES for w in re.findall(r"[a-z]+", t)):
        return None
    from sympy import Symbol, pi, sqrt
    from sympy.parsing.sympy_parser import (implicit_multiplication_application, parse_expr,
                                            standard_transformations)
    names = {c: Symbol(c) for c in "abcdfghjklmnopqrstuvwxyz"}
    names.update(sqrt=sqrt, pi=pi)
    try:
        return parse_expr(t, local_dict=names, global_dict={"__builtins__": {}, **_sympy_globals()},
                          transformations=standard_transformations + (implicit_multiplication_application,))
    except Exception:   # a malformed expression is no answer (SyntaxError, TokenError, TypeError, ...)
        return None


def _sympy_globals():
    import sympy
    return {k: getattr(sympy, k) for k in ("Integer", "Float", "Rational", "Symbol", "E", "I")}


def _sympy_equal(a, b):
    ea, eb = _sympy_expr(a), _sympy_expr(b)
    if ea is None or eb is None:
        return False
    try:
        import sympy
        return bool(sympy.simplify(ea - eb) == 0)
    except Exception:   # sympy could not decide: not equal
        return False


def _math_verify():
    """The math_verify module when installed, else None (the fallback rules then decide alone)."""
    try:
        import math_verify
        return math_verify
    except ImportError:
        return None


def math_equal(pred, gold, use_math_verify=True):
    """Whether a model's final math answer (extract_math's text) equals the gold answer. Our rules first, identical
    whether or not math-verify is installed:
      1. both normalised (_norm_math: $, \\(, \\text{}, \\left, spacing, degrees and % dropped; "x = 5" -> "5";
         "1,000" -> "1000"; a unit or currency word after a number dropped: "18 dollars" -> "18") and equal ->
         True ("\\frac{1}{2}" == "\\dfrac{1}{2}");
      2. both exact numbers (integers, decimals, a/b, \\frac{a}{b}) -> equal as fractions ("0.5" == "1/2" ==
         "\\frac{1}{2}", "18.00" == "18"; "0.33" != "1/3"), and no other rule is asked;
    then, for expressions: 3. `math-verify` (pip install math-verify) when installed and use_math_verify
    ("\\sqrt{2}/2" == "\\frac{1}{\\sqrt{2}}", sets, intervals); 4. otherwise sympy: simple expressions (digits,
    one-letter variables, + - * / ^, \\frac, \\sqrt, \\pi) equal when their difference simplifies to 0
    ("2x+2" == "2(x+1)"). None or an empty prediction is never equal."""
    if pred is None or not str(pred).strip():
        return False
    p, g = _norm_math(pred), _norm_math(gold)
    if p.replace(" ", "") == g.replace(" ", ""):
        return True
    pn, gn = _to_number(p), _to_number(g)
    if pn is not None and gn is not None:
        return pn == gn
    mv = _math_verify() if use_math_verify else None
    if mv is not None:
        try:
            return bool(mv.verify(mv.parse(f"${g}$"), mv.parse(f"${p}$")))
        except Exception:   # math-verify failed on this input (timeouts run on signals: main thread only): ours
            pass
    return _sympy_equal(p, g)


_NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                            "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}


def normalize_open(text):
    """An open-ended answer for matching: NFKC, lower case, punctuation dropped, articles (a, an, the) dropped,
    number words as digits ("Twenty-one" -> "21", "three" -> "3"), "1,000" -> "1000", whitespace collapsed."""
    s = unicodedata.normalize("NFKC", str(text)).lower()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    words = [w for w in re.findall(r"\d+(?:\.\d+)?|[^\W_]+", s) if w not in ("a", "an", "the")]
    out = []
    for w in words:
        if w in _NUMBER_WORDS and out and out[-1] in {str(v) for v in _TENS.values()} and _NUMBER_WORDS[w] < 10:
            out[-1] = str(int(out[-1]) + _NUMBER_WORDS[w])   # "twenty one" -> "21"
        else:
            out.append(str(_NUMBER_WORDS[w]) if w in _NUMBER_WORDS else str(_TENS[w]) if w in _TENS else w)
    return " ".join(out)


_LEAD_RE = re.compile(r"^(?i:(?:so\s*,?\s*)?(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*)")


def extract_open(text):
    """The short answer of an open-ended response, or None: answer_text, then a leading "the answer is" / "Answer:"
    dropped (free text: from the last such phrase on). No match is attempted here (open_equal)."""
    part = answer_text(text)
    if part is None:
        return None
    if not ANSWER_TAG_RE.search(text):
        hits = list(re.finditer(r"(?i:answer\s*(?:is\s*:?|:))", part))
        part = part[hits[-1].end():] if hits else part
    part = _LEAD_RE.sub("", part.strip()).strip()
    return part or None


def open_equal(pred, answers):
    """Normalised exact match (normalize_open) of a prediction with any of the acceptable answers."""
    if pred is None:
        return False
    p = normalize_open(pred)
    return bool(p) and any(p == normalize_open(a) for a in ([answers] if isinstance(answers, str) else answers))


def score_answer(text, record):
    """One response scored against a normalised record, by its answer type -> dict(extracted, correct, format).
    "choice": extract_choice (the letter) == answer; "open": extract_open matches one of `answers` (open_equal);
    "math": extract_math equals `answer` (math_equal). format: follows_format for the type."""
    kind = record.get("answer_type", "choice")
    opts = record.get("options") or None
    n = len(opts) if opts else len(LETTERS)
    if kind == "choice":
        pred = extract_choice(text, n, opts)
        correct = pred is not None and pred == record["answer"]
    elif kind == "open":
        pred = extract_open(text)
        correct = open_equal(pred, record.get("answers") or [record["answer"]])
    elif kind == "math":
        pred = extract_math(text)
        correct = math_equal(pred, record["answer"])
    else:
        raise ValueError(f"record {record.get('id')!r}: answer_type {kind!r}: expected one of {ANSWER_TYPES}")
    return dict(extracted=pred, correct=bool(correct), format=follows_format(text, n, opts, kind))
