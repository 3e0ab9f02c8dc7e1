"""Synthetic retrieval sequences built from running text: key-value facts planted in a stretch of a token
stream and asked later in the same sequence, for recovery training (and for multi-key retrieval measures).

A sequence is a pure function of (source stream, tokenizer, length, seed, index): the same arguments give the
same tokens, so a run that resumes at step k needs no data state. Its running text is one contiguous span
of `source` and nothing else (statements and questions are made of the templates below, made-up names and
random numbers): built from the recovery stream, it never overlaps the held-out text.

    ... running text ... <fact 1> ... running text ... <fact 2> ... running text ...
    Question: <asks fact 2>
    Answer: <prefix> <value>.
    Question: <asks fact 1> ...
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

# (statement, question, answer prefix); the value follows the prefix after a space
TEMPLATES = (
    ("The access code of {key} is {value}.", "What is the access code of {key}?", "The access code of {key} is"),
    ("{key} keeps the key to locker {value}.", "Which locker does {key} keep the key to?",
     "{key} keeps the key to locker"),
    ("The parcel for {key} was sent with tracking number {value}.", "What tracking number was the parcel for {key} "
     "sent with?", "The parcel for {key} was sent with tracking number"),
    ("Note that {key} is registered under account {value}.", "Under which account is {key} registered?",
     "{key} is registered under account"),
)
SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vel", "quin", "dar", "sel", "bri", "mon", "zu", "fa", "hel", "gor",
             "nim", "pas", "tek", "ul", "wen", "yor", "cas", "dru", "fen")
TOKENS_PER_FACT = 512  # one planted fact per this many tokens of sequence, by default


@dataclass
class Fact:
    key: str
    value: str
    template: int

    def statement(self) -> str:
        return "\n" + TEMPLATES[self.template][0].format(key=self.key, value=self.value) + "\n"

    def question(self) -> str:
        return "\nQuestion: " + TEMPLATES[self.template][1].format(key=self.key) + "\nAnswer: " + \
            TEMPLATES[self.template][2].format(key=self.key)

    def answer(self) -> str:
        return " " + self.value


@dataclass
class RetrievalSequence:
    ids: torch.Tensor  # (length,) token ids
    answers: list[tuple[int, int]]  # [start, end) of each asked value's tokens in `ids`, in the order asked
    facts: list[Fact]  # planted, in the order they appear
    asked: list[int]  # indices into `facts`, in the order asked
    source_span: tuple[int, int]  # [start, end) of the running text taken from `source`


def make_facts(rng: random.Random, count: int) -> list[Fact]:
    """`count` facts with distinct made-up names and random 4-6 digit values."""
    keys: set[str] = set()
    while len(keys) < count:
        keys.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize())
    return [Fact(key, str(rng.randrange(10 ** (d - 1), 10 ** d)), rng.randrange(len(TEMPLATES)))
            for key, d in zip(sorted(keys), [rng.randint(4, 6) for _ in range(count)])]


def retrieval_sequence(tokenizer, source: torch.Tensor, *, length: int, seed: int, index: int = 0,
                       facts: int | None = None, ask: int | None = None) -> RetrievalSequence:
    """Sequence `index` of stream `seed`: `facts` facts (default one per TOKENS_PER_FACT tokens) planted at
    random points of a span of `source` (token ids), then `ask` of them (default all) asked in random order
    at the end, each question followed by its answer; exactly `length` tokens."""
    rng = random.Random(seed * 1_000_003 + index)
    n = facts if facts is not None else max(1, length // TOKENS_PER_FACT)
    ask = n if ask is None else ask
    if n < 1 or not 1 <= ask <= n:
        raise ValueError(f"need facts >= 1 and 1 <= ask <= facts, got facts={n}, ask={ask}")
    planted = make_facts(rng, n)
    asked = rng.sample(range(n), ask)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    statements = [encode(f.statement()) for f in planted]
    questions = [(encode(planted[k].question()), encode(planted[k].answer())) for k in asked]
    filler = length - sum(map(len, statements)) - sum(len(q) + len(a) for q, a in questions)
    if filler < length // 4:
        raise ValueError(f"a {length}-token retrieval sequence cannot hold {n} facts and {ask} questions with "
                         "enough running text; use longer sequences or fewer facts")
    if source.numel() < filler:
        raise ValueError(f"the source text has {source.numel()} tokens, fewer than the {filler} one sequence needs")
    start = rng.randrange(0, source.numel() - filler + 1)
    text = source[start : start + filler].tolist()
    cuts = sorted(rng.sample(range(filler + 1), n))
    ids: list[int] = []
    prev = 0
    for cut, statement in zip(cuts, statements):
        ids += text[prev:cut] + statement
        prev = cut
    ids += text[prev:]
    answers = []
    for question, answer in questions:
        ids += question
        answers.append((len(ids), len(ids) + len(answer)))
        ids += answer
    return RetrievalSequence(torch.tensor(ids, dtype=torch.long), answers, planted, asked, (start, start + filler))
