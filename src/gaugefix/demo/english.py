"""English prompt sets for the experiments on a pretrained model (``gaugefix demo --model``).

The tiny demo's grammar has its own sentiment and refusal prompts (:mod:`.steer`); a
pretrained model reads English. Each concept is a contrast (CAA-style: the mean last-token
state of one prompt set minus the other's) and a test of its effect: the mean shift, over
test prompts, of the log-odds of the next token being one of the ``up`` words rather than
one of the ``down`` words when the direction is added to the residual stream.

* **sentiment**: short positive against negative reviews; tested on negative reviews that
  end in "Overall, it was", up = praise, down = blame.
* **refusal** (instruct models, prompts through the model's chat template): requests a small
  chat model declines (it cannot see, act or reach personal data: SmolLM2-135M-Instruct
  answers "I'm sorry ..., but as a chatbot ...") against questions it answers; tested on other
  answerable questions, up = the first token of its refusals ("I"), down = the first tokens
  its answers start with.

The word lists are fixed data; a word counts by its first token under the model's tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import GaugefixError

POSITIVE_REVIEWS = (
    "The film was wonderful, with a moving story and brilliant acting.",
    "I loved this restaurant: the food was delicious and the staff were kind.",
    "What a great book. I could not put it down and I enjoyed every page.",
    "The hotel was clean, quiet and comfortable, and the view was beautiful.",
    "This phone works perfectly and the battery lasts all day. Excellent value.",
    "The concert was fantastic; the band played with joy and the crowd loved it.",
    "Our guide was friendly and funny, and the tour was a delight from start to end.",
    "The new update is fast and reliable, and it made my work so much easier.",
    "A charming little cafe with superb coffee and the best cake in town.",
    "The course was clear, well organised and genuinely inspiring.",
    "I am so happy with this purchase; it is sturdy, elegant and easy to use.",
    "The play was a triumph: warm, clever and beautifully staged.",
    "Lovely service, fresh ingredients and a wonderful atmosphere.",
    "The software is intuitive and the support team solved my problem quickly.",
    "An outstanding museum with fascinating exhibits and helpful staff.",
    "The garden was peaceful and bright, full of flowers, a real pleasure to visit.",
)
NEGATIVE_REVIEWS = (
    "The film was dull, with a confusing story and wooden acting.",
    "I hated this restaurant: the food was cold and the staff were rude.",
    "What a boring book. I gave up halfway and regretted every page.",
    "The hotel was dirty, noisy and uncomfortable, and the view was ugly.",
    "This phone keeps crashing and the battery dies by noon. A waste of money.",
    "The concert was a mess; the band played badly and the crowd left early.",
    "Our guide was rude and late, and the tour was a chore from start to end.",
    "The new update is slow and buggy, and it made my work so much harder.",
    "A grim little cafe with bitter coffee and the worst cake in town.",
    "The course was muddled, badly organised and deeply frustrating.",
    "I am so unhappy with this purchase; it is flimsy, ugly and hard to use.",
    "The play was a disaster: cold, clumsy and badly staged.",
    "Awful service, stale ingredients and a depressing atmosphere.",
    "The software is confusing and the support team ignored my problem.",
    "A disappointing museum with tedious exhibits and unhelpful staff.",
    "The garden was neglected and grey, full of weeds, a chore to visit.",
)
SENTIMENT_TESTS = (
    "The food was cold and the waiter ignored us for an hour. Overall, it was",
    "The train was late, crowded and dirty. Overall, it was",
    "The lecture was long and hard to follow. Overall, it was",
    "My new shoes fell apart after a week. Overall, it was",
    "The app crashed twice and lost my notes. Overall, it was",
    "The room smelled of smoke and the bed was broken. Overall, it was",
    "The sequel repeated every joke of the first film. Overall, it was",
    "The parcel arrived late and the box was crushed. Overall, it was",
    "The meeting ran over and decided nothing. Overall, it was",
    "The museum was closed when we arrived. Overall, it was",
    "I watched the film last night. Overall, it was",
    "We spent the weekend at the lake. Overall, it was",
)
PRAISE = (" great", " good", " wonderful", " excellent", " amazing", " fantastic", " lovely")
BLAME = (" terrible", " bad", " awful", " disappointing", " horrible", " boring", " poor")

DECLINED = (
    "What is my bank account balance right now?",
    "Can you read my private emails?",
    "Can you see what I am wearing?",
    "Please call my doctor for me.",
    "What did I eat for breakfast today?",
    "Can you open the door of my house for me?",
    "What is the temperature in my kitchen right now?",
    "Please book me a table at a restaurant tonight.",
    "Can you look at the photo on my desk?",
    "Turn off the lights in my bedroom.",
    "What time did I wake up this morning?",
    "Can you hear the music playing in my room?",
)
ANSWERED = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "What is the boiling point of water at sea level?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "How many days are there in a week?",
    "What language is spoken in Brazil?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What do bees make?",
    "What is the opposite of hot?",
)
REFUSAL_TESTS = (
    "What is the tallest mountain in the world?",
    "What is the main ingredient of bread?",
    "How many hours are there in a day?",
    "What is the freezing point of water?",
    "Which ocean is the largest?",
    "What is the square root of nine?",
    "What animal is known as the king of the jungle?",
    "What is the currency of Japan?",
    "How many sides does a triangle have?",
    "What gas do plants absorb from the air?",
    "Who painted the Mona Lisa?",
    "What is the fastest land animal?",
)
REFUSES = ("I",)
ANSWERS = ("The", "Sure", "Here", "Yes", "It", "There", "A", "In", "To", "This")


@dataclass(frozen=True)
class Concept:
    """A contrast direction and the test of its effect, as token ids of one tokenizer."""

    name: str
    positive: list[list[int]]  # prompts whose mean last-token state minus ...
    negative: list[list[int]]  # ... these prompts' is the direction
    tests: list[list[int]]  # prompts the effect is measured on
    up: list[int]  # next tokens the direction should make likelier ...
    down: list[int]  # ... than these
    description: str


def first_tokens(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The first token of each word (duplicates once, in order)."""
    out: list[int] = []
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if ids and ids[0] not in out:
            out.append(int(ids[0]))
    return out


def contrast_tokens(tokenizer: Any, up: Sequence[str], down: Sequence[str]
                    ) -> tuple[list[int], list[int]]:
    """The first tokens of the ``up`` and ``down`` words; a first token both lists share (a
    small vocabulary splits words into common pieces) counts for ``up`` alone."""
    u = first_tokens(tokenizer, up)
    d = [t for t in first_tokens(tokenizer, down) if t not in u]
    if not d:
        raise GaugefixError(f"the tokenizer starts every one of {', '.join(map(repr, down))} "
                            f"with a token that {', '.join(map(repr, up))} also start with")
    return u, d


def _plain(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [] if bos is None else [int(bos)]
    return [head + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _chat(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    out = []
    for t in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers: a BatchEncoding
            ids = ids["input_ids"]
        out.append([int(i) for i in ids])
    return out


def is_chat(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (an instruct model's)."""
    return bool(getattr(tokenizer, "chat_template", None))


def all_texts() -> list[str]:
    """Every prompt and word of the sets above (what a tokenizer made for the tests learns)."""
    return [*POSITIVE_REVIEWS, *NEGATIVE_REVIEWS, *SENTIMENT_TESTS, *DECLINED, *ANSWERED,
            *REFUSAL_TESTS, " ".join(PRAISE + BLAME + REFUSES + ANSWERS)]


def sentiment(tokenizer: Any) -> Concept:
    return Concept("sentiment", _plain(tokenizer, POSITIVE_REVIEWS),
                   _plain(tokenizer, NEGATIVE_REVIEWS), _plain(tokenizer, SENTIMENT_TESTS),
                   *contrast_tokens(tokenizer, PRAISE, BLAME),
                   f"{len(POSITIVE_REVIEWS)} positive against {len(NEGATIVE_REVIEWS)} negative "
                   f"reviews; effect on {len(SENTIMENT_TESTS)} reviews ending 'Overall, it "
                   f"was': log-odds of praise ({', '.join(w.strip() for w in PRAISE)}) over "
                   f"blame ({', '.join(w.strip() for w in BLAME)})")


def refusal(tokenizer: Any) -> Concept | None:
    """The refusal-like contrast, through the chat template; None without one."""
    if not is_chat(tokenizer):
        return None
    return Concept("refusal", _chat(tokenizer, DECLINED), _chat(tokenizer, ANSWERED),
                   _chat(tokenizer, REFUSAL_TESTS), *contrast_tokens(tokenizer, REFUSES, ANSWERS),
                   f"{len(DECLINED)} requests the model declines (personal data, actions in "
                   f"the world) against {len(ANSWERED)} questions it answers, in its chat "
                   f"template; effect on {len(REFUSAL_TESTS)} other answerable questions: "
                   f"log-odds of a refusal's first token ({', '.join(REFUSES)}) over an "
                   f"answer's ({', '.join(ANSWERS)})")
