"""A synthetic Nectar: short topical chats whose responses are ranked by a hidden true utility.

Each prompt asks about one of TOPICS (sometimes after an earlier exchange about another topic). Each of the K
responses is a short sentence built from the topic's own words, generic words, other topics' words, repeats and
made-up junk words. `true_utility(messages, response_text)` scores ANY text (so RL can measure a policy's true
reward); ranks are drawn from a Plackett-Luce model over utility / noise (noise 0 = sorted by utility).

The utility (docs/DATA.md has the rationale): with words = lower-case [a-z'] runs of the response, topic = the topic
named last in the last user message,
    relevance  3.0 * (1 - exp(-distinct on-topic words / 2))      saturates: keyword stuffing stops paying
    length     1.0 * min(n, 10) / 10 - 0.15 * max(0, n - 16)      saturates at 10 words, rambling is penalised
    fluency    0.5 * min(generic words, 3) / 3                     some sentence-like glue
    period     0.5 if the text ends with "."
    off-topic  -1.0 per word of another topic
    repetition -0.5 per repeated word (n - distinct words)
    junk       -0.5 per word outside the lexicon
and an empty response scores EMPTY_UTILITY.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Optional, Sequence

import numpy as np

TOPICS: dict[str, tuple[str, ...]] = {
    "ocean": ("water", "waves", "fish", "salt", "deep", "blue", "tide", "coral"),
    "music": ("song", "rhythm", "notes", "guitar", "melody", "sing", "band", "piano"),
    "space": ("stars", "planet", "moon", "orbit", "rocket", "sun", "galaxy", "comet"),
    "forest": ("trees", "leaves", "wood", "moss", "birds", "green", "oak", "shade"),
    "cooking": ("food", "recipe", "oven", "bake", "spice", "pan", "taste", "bread"),
    "football": ("ball", "goal", "team", "players", "kick", "field", "match", "coach"),
    "winter": ("snow", "cold", "ice", "frost", "coat", "december", "sled", "freeze"),
    "coffee": ("beans", "cup", "brew", "roast", "milk", "morning", "bitter", "mug"),
    "history": ("past", "kings", "war", "ancient", "empire", "records", "dates", "century"),
    "computers": ("code", "chip", "memory", "software", "data", "screen", "keyboard", "program"),
    "garden": ("flowers", "soil", "seeds", "roses", "weeds", "grow", "spring", "bloom"),
    "dogs": ("puppy", "bark", "leash", "loyal", "tail", "fetch", "paws", "walk"),
    "cats": ("kitten", "purr", "whiskers", "claws", "meow", "nap", "fur", "mouse"),
    "rain": ("clouds", "storm", "umbrella", "wet", "drops", "thunder", "puddle", "grey"),
    "mountains": ("peak", "climb", "rock", "summit", "valley", "cliff", "hike", "altitude"),
    "cars": ("engine", "wheels", "road", "drive", "fuel", "speed", "brakes", "garage"),
    "books": ("pages", "story", "author", "read", "library", "chapter", "novel", "ink"),
    "health": ("sleep", "exercise", "diet", "heart", "doctor", "rest", "vitamins", "fitness"),
    "art": ("paint", "canvas", "brush", "color", "museum", "sketch", "artist", "gallery"),
    "trains": ("rails", "station", "track", "ticket", "carriage", "platform", "railway", "conductor"),
}
GENERIC = ("it", "is", "a", "the", "and", "very", "often", "can", "be", "quite", "really", "many", "people",
           "find", "this", "that", "with", "of", "about", "some", "has", "are", "also", "good", "nice",
           "interesting", "important", "useful", "we", "you", "they", "sure", "here", "there", "for", "in", "to",
           "lots")
JUNK = ("zorp", "blick", "frum", "qazz", "snerk", "plov", "grint", "wub", "krell", "vosh")
PROMPTS = ("Tell me about {t}.", "What do you know about {t}?", "Describe {t} briefly.", "Can you explain {t}?",
           "Write a short note on {t}.", "Give me some facts about {t}.", "Say something about {t}.",
           "I want to learn about {t}.")
FOLLOW_UPS = ("Now tell me about {t}.", "And what about {t}?", "Thanks. What about {t}?", "Next, describe {t}.")
EMPTY_UTILITY = -3.0

# The reporting splits (make_report_rows), generated apart from the training rows and sharing no prompt string with
# any row make_rows can draw: "heldout" conversations are about REPORT_TOPICS only (make_rows never names them; the
# trained templates ask), "unseen" conversations are about the training TOPICS with every user turn in a template
# make_rows never uses (UNSEEN_PROMPTS, UNSEEN_FOLLOW_UPS). docs/DATA.md says what each split shares with training.
REPORT_TOPICS: dict[str, tuple[str, ...]] = {
    "volcanoes": ("lava", "ash", "crater", "magma", "erupt", "molten", "vent", "smoke"),
    "bees": ("honey", "hive", "pollen", "queen", "buzz", "wax", "sting", "nectar"),
    "islands": ("beach", "palm", "sand", "shore", "lagoon", "ferry", "harbor", "tropical"),
    "chess": ("board", "pawn", "knight", "bishop", "castle", "checkmate", "rook", "opening"),
    "weddings": ("bride", "groom", "vows", "ring", "cake", "dress", "guests", "dance"),
    "deserts": ("dunes", "cactus", "camel", "dry", "heat", "oasis", "mirage", "scorpion"),
}
UNSEEN_PROMPTS = ("Please share what you know of {t}.", "Could you talk a little about {t}?",
                  "What is worth knowing about {t}?", "Explain {t} to me in one line.")
UNSEEN_FOLLOW_UPS = ("Switching subjects: {t}?", "One more question, on {t}.", "Let us move on to {t}.")

_ALL_TOPICS = {**TOPICS, **REPORT_TOPICS}
_WORD_TOPIC = {w: t for t, words in _ALL_TOPICS.items() for w in (t,) + words}
_GENERIC = frozenset(GENERIC)
_OWN = {t: (t,) + words for t, words in _ALL_TOPICS.items()}
_WORD_RE = re.compile(r"[a-z']+")
assert len(_WORD_TOPIC) == sum(len(w) + 1 for w in _ALL_TOPICS.values()), "topic word sets must be disjoint"
assert not _GENERIC & set(_WORD_TOPIC) and not set(JUNK) & (set(_WORD_TOPIC) | _GENERIC)


def topic_of(messages: Sequence[dict]) -> str | None:
    """The topic named last in the last user message (None when it names none)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        return None
    found = [_WORD_TOPIC[w] for w in _WORD_RE.findall(users[-1].lower()) if w in _ALL_TOPICS]
    return found[-1] if found else None


def utility_terms(messages: Sequence[dict], response_text: str) -> dict[str, float]:
    """The utility's terms (their sum is true_utility); see the module docstring."""
    words = _WORD_RE.findall(response_text.lower())
    topic = topic_of(messages)
    n = len(words)
    on = {w for w in words if topic is not None and _WORD_TOPIC.get(w) == topic}
    off = sum(1 for w in words if w in _WORD_TOPIC and _WORD_TOPIC[w] != topic)
    junk = sum(1 for w in words if w not in _WORD_TOPIC and w not in _GENERIC)
    generic = sum(1 for w in words if w in _GENERIC)
    return {
        "relevance": 3.0 * (1.0 - math.exp(-len(on) / 2.0)),
        "length": 1.0 * min(n, 10) / 10.0 - 0.15 * max(0, n - 16),
        "fluency": 0.5 * min(generic, 3) / 3.0,
        "period": 0.5 if response_text.rstrip().endswith(".") else 0.0,
        "off_topic": -1.0 * off,
        "repetition": -0.5 * (n - len(set(words))),
        "junk": -0.5 * junk,
    }


def true_utility(messages: Sequence[dict], response_text: str) -> float:
    """Hidden true utility of a response to a conversation (any text; higher is better)."""
    if not _WORD_RE.search(response_text.lower()):
        return EMPTY_UTILITY
    return float(sum(utility_terms(messages, response_text).values()))


def true_ranks(row: dict) -> list[int]:
    """Ranks (1 = best) of a synthetic row's answers by their true utility, ties by answer order: the order a
    reward model's accuracy is measured against (the row's "ranks" are the noisy Plackett-Luce labels)."""
    if "utilities" not in row:
        raise ValueError(f"row {row.get('row', '?')} has no 'utilities' (only synthetic rows carry them)")
    return [int(r) for r in plackett_luce_ranks(np.asarray(row["utilities"]), 0.0, None)]


def _sentence(words: list[str], period: bool) -> str:
    text = " ".join(words)
    return text[:1].upper() + text[1:] + ("." if period else "")


@functools.lru_cache(maxsize=None)
def _others(topic: str, pool: tuple[str, ...]) -> tuple[str, ...]:
    """The words of the pool's other topics (a reply's off-topic defects)."""
    return tuple(w for u in pool if u != topic for w in _ALL_TOPICS[u])


def _response(rng: np.random.Generator, topic: str, quality: float, pool: tuple[str, ...] = tuple(TOPICS)) -> str:
    """A response whose expected utility grows with quality in [0, 1].

    Quality sets the on-topic content; the defects (off-topic words, repeats, which mostly repeat topic words, junk,
    a missing period, now and then a reply about another topic altogether) vary independently of it, so that
    rankings carry evidence about every term of the utility and a reward model can tell each one apart. Were they
    all tied to quality, a reward model could score "more topic words" alone and RL would exploit it (stuffing the
    reply with repeated topic words). pool: the topics its defects come from (the training rows: TOPICS only).
    """
    own, others = _OWN[topic], _others(topic, pool)
    if rng.random() < 0.1:  # a fluent reply about the wrong topic
        own = _OWN[str(rng.choice([t for t in pool if t != topic]))]
    n_on = int(rng.binomial(5, quality))
    n_off = int(rng.choice([0, 0, 0, 1, 2]))
    n_generic = int(rng.integers(1, 7))
    n_repeat = int(rng.integers(0, 4))
    n_junk = int(rng.random() < 0.2)
    on_words = [own[i] for i in rng.permutation(len(own))[:n_on]]
    words = (on_words + [others[i] for i in rng.permutation(len(others))[:n_off]]
             + [GENERIC[i] for i in rng.integers(0, len(GENERIC), n_generic)]
             + [JUNK[i] for i in rng.integers(0, len(JUNK), n_junk)])
    pool = on_words if on_words and rng.random() < 0.7 else words
    words += [pool[i] for i in rng.integers(0, len(pool), n_repeat)]
    words = [words[i] for i in rng.permutation(len(words))]
    return _sentence(words, period=bool(rng.random() < 0.7))


@functools.lru_cache(maxsize=None)
def unseen_prompts(n: int) -> frozenset[str]:
    """The first user turns a study keeps unseen: every topic in each of the last n templates of PROMPTS."""
    if not 0 <= n < len(PROMPTS):
        raise ValueError(f"unseen_templates must be in [0, {len(PROMPTS) - 1}], got {n}")
    return frozenset(p.format(t=t) for p in PROMPTS[len(PROMPTS) - n:] for t in TOPICS)


def uses_unseen_template(messages: Sequence[dict], n: int) -> bool:
    """Whether the conversation's first user turn uses one of the last n templates of PROMPTS."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return bool(n) and bool(users) and users[0] in unseen_prompts(n)


def plackett_luce_ranks(utilities: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Ranks (1 = best) drawn from Plackett-Luce with scores utilities / noise (Gumbel-max); noise 0 sorts."""
    u = np.asarray(utilities, np.float64)
    keys = u if noise == 0 else u / noise + rng.gumbel(size=u.shape)
    order = np.argsort(-keys, kind="stable")
    ranks = np.empty(len(u), np.int64)
    ranks[order] = np.arange(1, len(u) + 1)
    return ranks


def nectar_prompt(messages: Sequence[dict]) -> str:
    """Nectar's prompt string for a conversation ending with a user turn."""
    out = ""
    for m in messages:
        out += ("\n\nHuman: " if m["role"] == "user" else "\n\nAssistant: ") + m["content"]
    return out + "\n\nAssistant: "


def make_conversation(rng: np.random.Generator, multi_turn_fraction: float = 0.2, topics: Sequence[str] = tuple(TOPICS),
                      prompts: Sequence[str] = PROMPTS, follow_ups: Sequence[str] = FOLLOW_UPS,
                      pool: Optional[tuple[str, ...]] = None) -> list[dict]:
    """A conversation ending with a user turn: a question about one of `topics` in one of `prompts`, sometimes
    (multi_turn_fraction) after an exchange about another of them, asked in one of `follow_ups`; the earlier reply's
    defects come from the `pool` topics (default: `topics`)."""
    pool = tuple(topics) if pool is None else pool
    topics = list(topics)
    topic = str(rng.choice(topics))
    messages = [{"role": "user", "content": str(rng.choice(prompts)).format(t=topic)}]
    if rng.random() < multi_turn_fraction:
        messages.append({"role": "assistant", "content": _response(rng, topic, 0.9, pool)})
        topic = str(rng.choice([t for t in topics if t != topic]))
        messages.append({"role": "user", "content": str(rng.choice(follow_ups)).format(t=topic)})
    return messages


def make_rows(num_prompts: int = 2000, seed: int = 0, noise: float = 1.0, num_responses: int = 7,
              multi_turn_fraction: float = 0.2) -> list[dict]:
    """Nectar-format rows (prompt, answers [{answer, model, rank}], turns, num_responses, source, good_natured).

    Row i depends only on (seed, i), so a smaller num_prompts gives a prefix of a larger one. Each row also carries
    "utilities" (the true utility of each answer, same order) for measuring reward-model ranking accuracy.
    """
    _check(noise, num_responses)
    return [_row(np.random.default_rng([seed, i]), make_conversation, tuple(TOPICS), noise, num_responses,
                 multi_turn_fraction) for i in range(num_prompts)]


# The reporting splits: (topics asked about, first-turn templates, follow-up templates, the topics a reply's defects
# come from, stream tag) of each. The unseen split changes only the phrasing, so its replies use the training lexicon.
REPORT_SPLITS = {
    "heldout": (tuple(REPORT_TOPICS), PROMPTS, FOLLOW_UPS, tuple(_ALL_TOPICS), 1),
    "unseen": (tuple(TOPICS), UNSEEN_PROMPTS, UNSEEN_FOLLOW_UPS, tuple(TOPICS), 2),
}


def make_report_rows(split: str, num_prompts: int, seed: int = 0, noise: float = 1.0, num_responses: int = 7,
                     multi_turn_fraction: float = 0.2) -> list[dict]:
    """Rows of a reporting split ("heldout": conversations about REPORT_TOPICS, which no training row names, in the
    trained templates; "unseen": the training topics with every user turn in an untrained template), in the format of
    make_rows. Row i depends only on (seed, split, i), drawn from a random stream that make_rows never uses, and no
    row shares a prompt string with any row make_rows can produce (whatever its seed)."""
    if split not in REPORT_SPLITS:
        raise ValueError(f"reporting split must be one of {', '.join(REPORT_SPLITS)}, got {split!r}")
    _check(noise, num_responses)
    topics, prompts, follow_ups, pool, tag = REPORT_SPLITS[split]
    conversation = functools.partial(make_conversation, topics=topics, prompts=prompts, follow_ups=follow_ups,
                                     pool=pool)
    return [_row(np.random.default_rng([seed, i, tag]), conversation, pool, noise, num_responses, multi_turn_fraction)
            for i in range(num_prompts)]


def _check(noise: float, num_responses: int) -> None:
    if noise < 0:
        raise ValueError(f"synthetic noise must be >= 0, got {noise}")
    if num_responses < 2:
        raise ValueError(f"synthetic num_responses must be >= 2, got {num_responses}")


def _row(rng: np.random.Generator, conversation, pool: tuple[str, ...], noise: float, num_responses: int,
         multi_turn_fraction: float) -> dict:
    messages = conversation(rng, multi_turn_fraction)
    topic = topic_of(messages)
    answers: list[str] = []
    qualities = np.linspace(0.0, 1.0, num_responses)
    for q in rng.permutation(qualities):
        for _ in range(20):  # distinct answers, so that a strict order means something
            a = _response(rng, topic, float(q), pool)
            if a not in answers:
                break
        answers.append(a)
    utilities = np.array([true_utility(messages, a) for a in answers])
    ranks = plackett_luce_ranks(utilities, noise, rng)
    return {
        "prompt": nectar_prompt(messages),
        "answers": [{"answer": a, "model": f"synthetic-{j}", "rank": float(r)}
                    for j, (a, r) in enumerate(zip(answers, ranks))],
        "turns": (len(messages) + 1) // 2,
        "num_responses": num_responses,
        "source": ["synthetic"],
        "good_natured": True,
        "utilities": [float(u) for u in utilities],
    }
