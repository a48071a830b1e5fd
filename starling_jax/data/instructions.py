"""An instruction-following task with constraints a program checks (IFEval-style): data.source = "task:ifeval".

A prompt is one chat instruction ("Write a short note inviting a colleague to lunch.") followed by one to three
constraints, each written as one fixed sentence that `parse_constraints` reads back from the prompt text (rows hold
their problem: a held-out prompt is checked exactly as a training one):

| type | sentence in the prompt | met when (`check`) | partial credit when not met |
|---|---|---|---|
| max_words | Answer in at most N words. | words <= N | N / words |
| min_words | Answer in at least N words. | words >= N | words / N |
| sentences | Write exactly N sentence(s). | sentences == N | 1 - abs(sentences - N) / N, >= 0 |
| include | Include the word(s) "a" (and "b"). | each keyword occurs as a whole word | fraction present |
| forbid | Do not use the word(s) "a" (or "b"). | none occurs as a whole word | fraction absent |
| bullets | Format the answer as a bulleted list of exactly N items ... | lines starting with "- " or "* " == N | as sentences |
| json | Answer with a JSON object only, with the key(s) "a" (and "b"). | the whole reply (an optional ```json fence stripped) is one JSON object holding every key, nothing after it | 0.5 x fraction of keys, if it is an object |
| lowercase | Write everything in lowercase letters. | a letter, and no letter with a lower-case form other than itself | fraction of cased letters in lower case |
| end_phrase | End your answer with the exact phrase "P". | the stripped reply ends with P (letter case ignored) | 0 |
| no_commas | Do not use any commas. | no "," and no fullwidth "，" | 0 |
| title | Start with a title in double angle brackets, like <<title>>. | a line-internal <<...>> with a letter inside | 0 |

Definitions (deterministic, no NLP): words are runs of Unicode word characters joined by an apostrophe (`don't` is one
word, `e-mail` two; punctuation and emoji are not words); sentences are the pieces of the stripped text split after
".", "!", "?" or "…" (runs of them count once) followed by white space, that contain a word character - so a reply
without final punctuation still has its last sentence, and "Dr. Smith" is two; keywords match case-insensitively
(casefolded) with no word character on either side.

true_utility (what evaluation reports) = the fraction of the prompt's constraints met (IFEval's instruction-level
accuracy); `all_met` gives the prompt-level figure. judge (what the feedback stage ranks K samples by) = the mean over
constraints of 1 if met else 0.5 x partial credit, so near misses rank above wild ones and a met constraint always
outweighs any partial one.

Splits. The 11 types give COMBINATIONS (1 to 3 types that can hold together, e.g. not json with bullets); a fixed
quarter of the 2- and 3-type combinations and a fixed quarter of the instructions are reserved for reporting
(REPORT_COMBINATIONS, REPORT_INSTRUCTIONS; a fixed draw, the same at every seed). make_rows draws training rows from
the other instructions x the other combinations (every single type among them, so each reported type was trained);
make_report_rows("heldout") draws reported instructions x reported combinations: no held-out row shares its
instruction or its set of constraint types with any row make_rows can produce, at any seed. Parameters (N, keywords,
keys, phrases) are drawn per row from shared pools.

Every row carries a reference reply built to meet all its constraints and variants built to break one of them (or
all), each scored by the checker (the row's `utilities`, ranks by utility): an SFT stage can train on the reference,
and a reward model's ranking can be scored against the checker's order on held-out rows.

Why this file is long (~460 lines): the task is one unit - the constraint sentences, their parser, the checker and
partial credit of each type, the instruction and combination pools and the split that reserves some of them - and a
constraint type reads in one place. The seam to cut when it grows is the per-type checkers (check, partial credit)
into their own module.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from typing import Optional, Sequence

TYPES = ("max_words", "min_words", "sentences", "include", "forbid", "bullets", "json", "lowercase", "end_phrase",
         "no_commas", "title")
# pairs of types that cannot hold together (or that a reader would find contradictory)
_CONFLICTS = {frozenset(p) for p in [("max_words", "min_words"), ("sentences", "bullets"), ("sentences", "json"),
                                     ("bullets", "json"), ("json", "end_phrase"), ("json", "no_commas"),
                                     ("json", "title"), ("lowercase", "end_phrase")]}

# (instruction, its subject): the subject only feeds the reference replies
INSTRUCTIONS = (
    ("Write a short note inviting a colleague to lunch.", "lunch"),
    ("Describe your ideal weekend.", "the weekend"),
    ("Give advice to someone starting a new job.", "a new job"),
    ("Explain why sleep matters.", "sleep"),
    ("Write a thank-you message to a neighbour who watered your plants.", "the plants"),
    ("Describe a city you would like to visit.", "the city"),
    ("Suggest a plan for a rainy afternoon.", "the afternoon"),
    ("Write a product description for a reusable water bottle.", "the bottle"),
    ("Explain how to make a cup of tea.", "tea"),
    ("Write a reminder about a team meeting on Monday.", "the meeting"),
    ("Describe your favourite season.", "the season"),
    ("Give tips for studying for an exam.", "the exam"),
    ("Write a short review of a film you enjoyed.", "the film"),
    ("Explain what a library is to a child.", "the library"),
    ("Write an apology for missing a friend's birthday party.", "the party"),
    ("Describe a good breakfast.", "breakfast"),
    ("Suggest a name for a new bakery and explain it.", "the bakery"),
    ("Write a message welcoming a new member to a book club.", "the book club"),
    ("Explain why people keep pets.", "pets"),
    ("Give directions for planting a tree.", "the tree"),
    ("Describe the view from a mountain top.", "the view"),
    ("Write a short speech for a friend's farewell.", "the farewell"),
    ("Explain how to save money on groceries.", "groceries"),
    ("Write a postcard from the seaside.", "the seaside"),
    ("Describe a hobby you enjoy.", "the hobby"),
    ("Write a request to borrow a ladder from a neighbour.", "the ladder"),
    ("Explain what makes a good teacher.", "teaching"),
    ("Suggest three things to pack for a camping trip.", "the trip"),
    ("Write a note congratulating a cousin on graduating.", "the graduation"),
    ("Describe how a bicycle works.", "the bicycle"),
    ("Write an invitation to a picnic in the park.", "the picnic"),
    ("Explain why exercise is healthy.", "exercise"),
    ("Give advice on keeping a plant alive indoors.", "the plant"),
    ("Write a message asking a shop about its opening hours.", "the shop"),
    ("Describe the sounds of a busy market.", "the market"),
    ("Explain how to write a good email.", "the email"),
    ("Write a short story opening about a lost key.", "the key"),
    ("Describe a meal you would cook for friends.", "the meal"),
    ("Suggest ways to spend less time on a phone.", "the phone"),
    ("Write a note to a teacher explaining an absence.", "the absence"),
)
KEYWORDS = ("garden", "friday", "coffee", "river", "window", "summer", "bread", "lamp", "ocean", "pencil", "mountain",
            "violin", "candle", "orange", "bridge", "forest")
FORBIDDEN = ("really", "just", "truly", "simply", "basically", "actually", "literally", "honestly")
JSON_KEYS = ("title", "summary", "mood", "reason", "answer", "detail", "advice", "topic")
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have questions.", "Thanks for reading.",
               "That is all for now.", "See you soon!")
PARAMS = {"max_words": (12, 20, 30), "min_words": (15, 25), "sentences": (1, 2, 3), "bullets": (2, 3, 4)}

_SPLIT_SEED = 20240624  # the reporting draw of instructions and combinations: fixed, independent of every data seed
ROWS = 1000  # make_rows: training rows per seed


def _compatible(combo: Sequence[str]) -> bool:
    return not any(frozenset(p) in _CONFLICTS for p in itertools.combinations(combo, 2))


COMBINATIONS = tuple(c for n in (1, 2, 3) for c in itertools.combinations(TYPES, n) if _compatible(c))


def _reserve(items: Sequence, fraction: float, salt: str) -> tuple:
    rng = random.Random(f"{_SPLIT_SEED} {salt}")
    picked = sorted(rng.sample(range(len(items)), round(len(items) * fraction)))
    return tuple(items[i] for i in picked)


REPORT_COMBINATIONS = _reserve([c for c in COMBINATIONS if len(c) > 1], 0.25, "combinations")
TRAIN_COMBINATIONS = tuple(c for c in COMBINATIONS if c not in REPORT_COMBINATIONS)
REPORT_INSTRUCTIONS = _reserve(INSTRUCTIONS, 0.25, "instructions")
TRAIN_INSTRUCTIONS = tuple(i for i in INSTRUCTIONS if i not in REPORT_INSTRUCTIONS)

# -- reading replies ---------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:['’]\w+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
_BULLET = re.compile(r"^[ \t]*[-*] \S", re.MULTILINE)
_FENCE = re.compile(r"\A```(?:json)?\s*\n(.*)\n```\Z", re.DOTALL | re.IGNORECASE)
_TITLE = re.compile(r"<<[^\n<>]*[^\W\d_][^\n<>]*>>")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if re.search(r"\w", s)]


def bullet_items(text: str) -> int:
    return len(_BULLET.findall(text))


def contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.casefold())}(?!\w)", text.casefold()) is not None


def json_object(text: str) -> Optional[dict]:
    """The reply as one JSON object (an optional ```json fence stripped), or None: trailing text, a list, a
    string or broken JSON is not one."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _cased_letters(text: str) -> list[str]:
    return [ch for ch in text if ch.lower() != ch.upper()]


def check(kind: str, param, reply: str) -> tuple[bool, float]:
    """(met, partial credit in [0, 1)) of one constraint on a reply (the table of the module docstring)."""
    if kind in ("max_words", "min_words"):
        n = len(words(reply))
        if kind == "max_words":
            return n <= param, (param / n if n > param else 1.0)
        return n >= param, n / param
    if kind in ("sentences", "bullets"):
        n = len(sentences(reply)) if kind == "sentences" else bullet_items(reply)
        return n == param, max(0.0, 1.0 - abs(n - param) / param)
    if kind == "include":
        found = sum(contains_word(reply, w) for w in param)
        return found == len(param), found / len(param)
    if kind == "forbid":
        absent = sum(not contains_word(reply, w) for w in param)
        return absent == len(param), absent / len(param)
    if kind == "json":
        obj = json_object(reply)
        if obj is None:
            return False, 0.0
        present = sum(k in obj for k in param)
        return present == len(param), 0.5 * present / len(param)
    if kind == "lowercase":
        cased = _cased_letters(reply)
        lower = sum(ch == ch.lower() for ch in cased)
        return bool(cased) and lower == len(cased), (lower / len(cased) if cased else 0.0)
    if kind == "end_phrase":
        return reply.strip().casefold().endswith(param.casefold()), 0.0
    if kind == "no_commas":
        return "," not in reply and "，" not in reply, 0.0
    if kind == "title":
        return _TITLE.search(reply) is not None, 0.0
    raise ValueError(f"unknown constraint type {kind!r}")


# -- writing and reading prompts ---------------------------------------------------------------------------------------

def _quoted(items: Sequence[str], joiner: str) -> str:
    q = [f'"{w}"' for w in items]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + f" {joiner} " + q[-1]


def render(kind: str, param) -> str:
    """The constraint's sentence in a prompt."""
    if kind == "max_words":
        return f"Answer in at most {param} words."
    if kind == "min_words":
        return f"Answer in at least {param} words."
    if kind == "sentences":
        return f"Write exactly {param} sentence{'s' if param != 1 else ''}."
    if kind == "include":
        return f"Include the word{'s' if len(param) > 1 else ''} {_quoted(param, 'and')}."
    if kind == "forbid":
        return f"Do not use the word{'s' if len(param) > 1 else ''} {_quoted(param, 'or')}."
    if kind == "bullets":
        return f'Format the answer as a bulleted list of exactly {param} items, each on its own line starting with "- ".'
    if kind == "json":
        return f"Answer with a JSON object only, with the key{'s' if len(param) > 1 else ''} {_quoted(param, 'and')}."
    if kind == "lowercase":
        return "Write everything in lowercase letters."
    if kind == "end_phrase":
        return f'End your answer with the exact phrase "{param}".'
    if kind == "no_commas":
        return "Do not use any commas."
    if kind == "title":
        return "Start with a title in double angle brackets, like <<title>>."
    raise ValueError(f"unknown constraint type {kind!r}")


_QUOTED = r'((?:"[^"]+"(?:, | and | or )?)+)'
_PATTERNS = (
    ("max_words", re.compile(r"Answer in at most (\d+) words\.")),
    ("min_words", re.compile(r"Answer in at least (\d+) words\.")),
    ("sentences", re.compile(r"Write exactly (\d+) sentences?\.")),
    ("include", re.compile(r"Include the words? " + _QUOTED + r"\.")),
    ("forbid", re.compile(r"Do not use the words? " + _QUOTED + r"\.")),
    ("bullets", re.compile(r"Format the answer as a bulleted list of exactly (\d+) items")),
    ("json", re.compile(r"Answer with a JSON object only, with the keys? " + _QUOTED + r"\.")),
    ("lowercase", re.compile(r"Write everything in lowercase letters\.")),
    ("end_phrase", re.compile(r'End your answer with the exact phrase "([^"]+)"\.')),
    ("no_commas", re.compile(r"Do not use any commas\.")),
    ("title", re.compile(r"Start with a title in double angle brackets")),
)


def parse_constraints(prompt: str) -> list[tuple[str, object]]:
    """The (type, parameter) constraints a prompt states, in TYPES order."""
    out = []
    for kind, pattern in _PATTERNS:
        m = pattern.search(prompt)
        if m is None:
            continue
        if kind in ("max_words", "min_words", "sentences", "bullets"):
            param = int(m.group(1))
        elif kind in ("include", "forbid", "json"):
            param = tuple(re.findall(r'"([^"]+)"', m.group(1)))
        elif kind == "end_phrase":
            param = m.group(1)
        else:
            param = None
        out.append((kind, param))
    return out


def constraints_of(messages: Sequence[dict]) -> list[tuple[str, object]]:
    """The constraints of the last user turn of an instruction prompt (ValueError if it states none)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    found = parse_constraints(users[-1]) if users else []
    if not found:
        raise ValueError(f"not an instruction-following prompt: {users[-1] if users else messages!r:.120}")
    return found


def results(messages: Sequence[dict], reply: str) -> list[tuple[str, bool, float]]:
    """[(type, met, partial)] of every constraint of the prompt on `reply`."""
    return [(kind, *check(kind, param, reply)) for kind, param in constraints_of(messages)]


def true_utility(messages: Sequence[dict], reply: str) -> float:
    """The fraction of the prompt's constraints the reply meets (instruction-level accuracy)."""
    r = results(messages, reply)
    return sum(met for _, met, _ in r) / len(r)


def all_met(messages: Sequence[dict], reply: str) -> float:
    """1.0 if the reply meets every constraint of the prompt (prompt-level accuracy), else 0.0."""
    return float(all(met for _, met, _ in results(messages, reply)))


def judge(messages: Sequence[dict], reply: str) -> float:
    """The feedback ranking score: mean over constraints of 1 if met, else 0.5 x its partial credit."""
    r = results(messages, reply)
    return sum(1.0 if met else 0.5 * partial for _, met, partial in r) / len(r)


# -- generating rows -----------------------------------------------------------------------------------------------------

_PAD = ("and", "we", "can", "plan", "the", "rest", "of", "it", "together", "over", "a", "long", "chat", "with", "tea",
        "on", "some", "quiet", "day", "later", "this", "month", "when", "everyone", "is", "free", "to", "join", "in")
_FILLERS = ("Hope that works.", "Thanks a lot.", "Talk soon.", "All the best.", "Enjoy the day.")


def _draw_param(kind: str, rng: random.Random, taken: set):
    if kind in PARAMS:
        return rng.choice(PARAMS[kind])
    if kind in ("include", "forbid", "json"):
        pool = [w for w in {"include": KEYWORDS, "forbid": FORBIDDEN, "json": JSON_KEYS}[kind] if w not in taken]
        picked = tuple(rng.sample(pool, rng.choice((1, 2))))
        taken.update(picked)
        return picked
    if kind == "end_phrase":
        return rng.choice(END_PHRASES)
    return None


def build_reply(subject: str, constraints: Sequence[tuple[str, object]], broken: frozenset = frozenset(),
                pad: int = 0) -> str:
    """A reply meant to meet every constraint not in `broken` and to break those in it (the checker decides):
    sentences (or list items) about the subject, the keywords, the end phrase last, merged with "; " down to the
    wanted count, `pad` filler words in the first one."""
    c = dict(constraints)
    parts = [f"This is about {subject}."]
    if "include" in c and "include" not in broken:
        parts.append(f"Think of {' and '.join(c['include'])}.")
    if "forbid" in broken:
        parts.append(f"I {c['forbid'][0]} mean it.")
    want = c.get("sentences", c.get("bullets", 2)) + ("sentences" in broken or "bullets" in broken)
    ending = [c["end_phrase"]] if "end_phrase" in c and "end_phrase" not in broken else []
    for filler in _FILLERS:
        if len(parts) + len(ending) >= want:
            break
        parts.append(filler)
    parts += ending
    while len(parts) > want:  # merge the first two into one sentence ("; " ends none)
        parts[:2] = [parts[0][:-1] + "; " + parts[1][0].lower() + parts[1][1:]]
    extra = pad + (c["max_words"] + 3 if "max_words" in broken else 0)
    if extra:
        parts[0] = parts[0][:-1] + " " + " ".join(_PAD[i % len(_PAD)] for i in range(extra)) + parts[0][-1]
    if "no_commas" in broken:
        parts[0] = "Well, " + parts[0][0].lower() + parts[0][1:]
    if "json" in c and "json" not in broken:
        keys = c["json"]
        values = parts[:len(keys) - 1] + [" ".join(parts[len(keys) - 1:])]
        values += [parts[0]] * (len(keys) - len(values))
        text = json.dumps(dict(zip(keys, values)), ensure_ascii=False, indent=1)
    elif "bullets" in c:
        text = "\n".join("- " + p for p in parts)
    else:
        text = " ".join(parts)
    if "title" in c and "title" not in broken:
        text = f"<<{subject.capitalize()} notes>>\n" + text
    if "lowercase" in c and "lowercase" not in broken:
        text = text.lower()
    return text


def _answers(subject: str, constraints: list, messages: list) -> Optional[tuple[list[str], list[float]]]:
    """The reference reply (every constraint met, the smallest padding that meets the word bounds) and its
    one-broken and all-broken variants with their checked utilities; None if no reference meets every constraint."""
    c = dict(constraints)
    reference = None
    for pad in range(0, 40):
        text = build_reply(subject, constraints, pad=pad)
        if true_utility(messages, text) == 1.0:
            reference = text
            break
        if "max_words" in c and len(words(text)) > c["max_words"]:
            return None
    if reference is None:
        return None
    replies = [reference]
    kinds = [k for k, _ in constraints]
    for broken in [frozenset([k]) for k in kinds] + ([frozenset(kinds)] if len(kinds) > 1 else []):
        text = build_reply(subject, constraints, broken, pad=0 if "min_words" in broken else pad)
        if text not in replies:
            replies.append(text)
    return replies, [true_utility(messages, t) for t in replies]


def _row(rng: random.Random, instructions: Sequence, combinations: Sequence, source: str) -> dict:
    for _ in range(100):  # parameters that admit a reference reply (redrawn e.g. for max_words 12 with 3 sentences)
        instruction, subject = rng.choice(instructions)
        combo = rng.choice(combinations)
        taken: set = set()
        constraints = [(k, _draw_param(k, rng, taken)) for k in combo]
        text = " ".join([instruction] + [render(k, p) for k, p in constraints])
        messages = [{"role": "user", "content": text}]
        made = _answers(subject, constraints, messages)
        if made is not None:
            break
    else:
        raise ValueError(f"task:ifeval: no reference reply meets {combinations} (a bug in build_reply)")
    replies, utilities = made
    order = sorted(range(len(replies)), key=lambda i: -utilities[i])  # stable: the reference first among ties
    return {"prompt": f"\n\nHuman: {text}\n\nAssistant:", "turns": 1, "num_responses": len(replies),
            "answers": [{"answer": replies[i], "model": "reference" if i == 0 else "variant",
                         "rank": float(r + 1)} for r, i in enumerate(order)],
            "utilities": [utilities[i] for i in order], "source": [source], "good_natured": True}


def _combination_weights(combinations: Sequence) -> list[float]:
    """Draw weights: a third of rows with 1 constraint, a third with 2, a third with 3 (spread over combinations)."""
    sizes = {n: sum(len(c) == n for c in combinations) for n in (1, 2, 3)}
    return [1.0 / sizes[len(c)] for c in combinations]


def _draw(rng: random.Random, instructions, combinations, n: int, source: str) -> list[dict]:
    weights = _combination_weights(combinations)
    rows = []
    for _ in range(n):
        combo = rng.choices(combinations, weights)[0]
        rows.append(_row(rng, instructions, [combo], source))
    return rows


def make_rows(seed: int, n: int = ROWS) -> list[dict]:
    """Training rows: TRAIN_INSTRUCTIONS x TRAIN_COMBINATIONS, parameters drawn by `seed`."""
    return _draw(random.Random(f"ifeval train {seed}"), TRAIN_INSTRUCTIONS, TRAIN_COMBINATIONS, n, "task:ifeval")


def make_report_rows(split: str, n: int, seed: int) -> list[dict]:
    """Reporting rows: "heldout" = REPORT_INSTRUCTIONS x REPORT_COMBINATIONS (its own random stream per seed)."""
    if split != "heldout":
        raise ValueError(f"task:ifeval has one reporting split, 'heldout' (got {split!r})")
    return _draw(random.Random(f"ifeval heldout {seed}"), REPORT_INSTRUCTIONS, REPORT_COMBINATIONS, n,
                 "task:ifeval heldout")


def signature(messages: Sequence[dict]) -> tuple[str, tuple[str, ...]]:
    """(instruction, its set of constraint types) of a prompt: what the held-out split shares with no training row."""
    text = [m["content"] for m in messages if m["role"] == "user"][-1]
    instruction = next((i for i, _ in INSTRUCTIONS if text.startswith(i)), None)
    if instruction is None:
        raise ValueError(f"not an instruction-following prompt: {text!r:.120}")
    return instruction, tuple(k for k, _ in constraints_of(messages))


def check_reporting(train_rows: Sequence[dict], report_rows: Sequence[dict]) -> None:
    """ValueError unless no reporting row shares its instruction or its constraint combination with a training row."""
    trained = [signature(r["messages"]) for r in train_rows]
    instructions, combos = {i for i, _ in trained}, {c for _, c in trained}
    for r in report_rows:
        instruction, combo = signature(r["messages"])
        if instruction in instructions or combo in combos:
            raise ValueError(f"task:ifeval held-out row {instruction!r} with {combo} shares its "
                             f"{'instruction' if instruction in instructions else 'constraint combination'} "
                             f"with a training row")

