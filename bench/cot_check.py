"""Where does the tiny model's chain of thought go wrong? For the synthetic set's temporal and spatial questions,
split each generated answer into what it read from the video and what it concluded from its own reasoning:

    python bench/cot_check.py --items=out/eval/sft/frames_16/items.jsonl --data=data/synth/test.jsonl

temporal ("Squares in order: ... The first one is X. That is option L."): is the square the question asks about
(first / last) listed right; does X repeat the model's own listed first / last square ("copy"); does L match X.
spatial ("Squares in order: red top-left, ... The red one was Q."): is the asked colour's quadrant listed right; does Q
repeat the model's own list. Reads prepare.py's bare list and the trial "first X, then Y, then Z, last W" format
(docs/BENCHMARKS.md, "Reading vs concluding"). A model that lists right and concludes wrong fails at reasoning over its
own text, not at seeing.
"""
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import apply_overrides  # noqa: E402

items = "out/eval/sft/frames_16/items.jsonl"
data = "data/synth/test.jsonl"

PALETTE = ("red", "green", "blue", "yellow")
WORDS = re.compile(r"^(first|then|last) ")


def listed(text):
    """'Squares in order: ...' -> the listed items, format words dropped, or None."""
    m = re.search(r"order: ([^.]*)\.", text)
    return [WORDS.sub("", x) for x in m.group(1).split(", ")] if m else None


if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    gold = {r["id"]: r for r in map(json.loads, open(data))}
    n = collections.Counter()
    for row in map(json.loads, open(items)):
        rec, pred = gold[row["id"]], row["prediction"]
        got, want = listed(pred), listed(rec["reasoning"])
        if rec["category"] == "temporal":
            k = "first" if "first" in rec["question"] else "last"
            m = re.search(r"The (first|last) one is (\w+)\. That is option (\w)", pred)
            n[f"temporal {k}"] += 1
            if got and m and len(got) == 4:
                i = 0 if k == "first" else -1
                n[f"temporal {k}: listed right"] += got[i] == want[i]
                n[f"temporal {k}: copy right"] += m.group(2) == got[i]
                n[f"temporal {k}: letter matches"] += (m.group(2) in PALETTE
                                                      and m.group(3) == "ABCD"[PALETTE.index(m.group(2))])
                n[f"temporal {k}: correct"] += bool(row["correct"])
        elif rec["category"] == "spatial":
            m = re.search(r"The (\w+) one was ([\w-]+)\.", pred)
            colour = re.search(r"Where did the (\w+) square", rec["question"]).group(1)
            n["spatial"] += 1
            if got and m:
                mine = dict(x.rsplit(" ", 1) for x in got if " " in x)
                truth = dict(x.rsplit(" ", 1) for x in want)
                n["spatial: listed right"] += mine.get(colour) == truth[colour]
                n["spatial: copy right"] += m.group(2) == mine.get(colour)
                n["spatial: correct"] += bool(row["correct"])
    for k in sorted(n):
        base = k.split(":")[0]
        print(f"{k:34s} {n[k]:4d}" + (f" / {n[base]} ({100 * n[k] / n[base]:.0f}%)" if ":" in k else ""))
