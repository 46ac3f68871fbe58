"""Build examples/data/if_demo.json: demo rows that teach instruction following.

Each row is a question of the demo set (alpaca_demo.json, or one of the list questions below)
with one or two verifiable constraints of the kinds `sftlab eval` checks: case, word and
sentence limits, bullets, numbered lists, JSON, titles, highlights, sections, a postscript,
keywords, no commas, quotation marks, a fixed first word or last phrase, repeating the request,
fixed yes/no answers, placeholders. The response is the demo answer rewritten to satisfy them.

Every row is checked with the eval's own checkers (sftlab.eval.ifeval.check_instruction,
strict) before it is written, so no row teaches a violation. The constraint phrases are worded
for this file, not taken from the eval suite; `sftlab quality ... --against` the suite finds no
13-gram overlap (tests/test_demo_data.py checks both).

    python examples/data/make_if_demo.py            # writes examples/data/if_demo.json
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from sftlab.eval.ifeval import check_instruction, sentences, words

HERE = Path(__file__).parent
SEED = 7

# Questions whose answers are lists (the demo set's answers are one or two sentences).
LISTS = [
    ("Name some fruits that are rich in vitamin C.", ["Oranges", "Kiwi fruit", "Strawberries", "Guavas", "Papayas"]),
    ("List a few ways to save water at home.", ["Fix dripping taps quickly", "Take shorter showers",
     "Run the dishwasher only when it is full", "Water plants in the early morning", "Collect rainwater for the garden"]),
    ("What are some common types of clouds?", ["Cumulus", "Stratus", "Cirrus", "Nimbostratus", "Cumulonimbus"]),
    ("Give some tips for learning a new language.", ["Practise a little every day", "Listen to native speakers",
     "Learn the most common words first", "Speak from the first week", "Keep a small notebook of new phrases"]),
    ("Name some instruments found in an orchestra.", ["Violin", "Cello", "Flute", "Trumpet", "Timpani"]),
    ("What are some good habits for healthy teeth?", ["Brush twice a day", "Floss once a day", "Cut down on sugary drinks",
     "Visit a dentist regularly", "Replace your toothbrush every few months"]),
    ("List some renewable sources of energy.", ["Solar power", "Wind power", "Hydroelectric power", "Geothermal heat",
     "Tidal power"]),
    ("Name some animals that live in the Arctic.", ["Polar bears", "Arctic foxes", "Walruses", "Snowy owls", "Narwhals"]),
    ("Suggest some ways to stay active during a work day.", ["Take the stairs", "Stand up every hour",
     "Walk during phone calls", "Stretch at your desk", "Go for a short walk at lunch"]),
    ("What should go into a basic first aid kit?", ["Adhesive bandages", "Sterile gauze", "Antiseptic wipes",
     "Tweezers", "Disposable gloves"]),
    ("List some planets of the solar system.", ["Mercury", "Venus", "Earth", "Mars", "Jupiter"]),
    ("Name some ingredients for a simple pancake batter.", ["Flour", "Milk", "Eggs", "A pinch of salt", "Melted butter"]),
    ("Give some ideas for a rainy afternoon indoors.", ["Bake some bread", "Start a jigsaw puzzle", "Read a novel",
     "Write letters to friends", "Try a new board game"]),
    ("What are some ways to reduce plastic waste?", ["Carry a reusable bag", "Use a refillable bottle",
     "Buy loose fruit and vegetables", "Choose products with less packaging", "Say no to plastic straws"]),
    ("Name some parts of a flowering plant.", ["Roots", "Stem", "Leaves", "Petals", "Seeds"]),
    ("List some things to check before a long car trip.", ["Tyre pressure", "Oil level", "Windscreen washer fluid",
     "Lights and indicators", "The spare tyre"]),
]
YES_NO = [
    ("Is the Sun a star?", "yes"), ("Can penguins fly?", "no"), ("Is water made of hydrogen and oxygen?", "yes"),
    ("Is the Moon larger than the Earth?", "no"), ("Do plants need light to make their food?", "yes"),
    ("Is a tomato botanically a fruit?", "yes"), ("Is gold magnetic?", "no"), ("Will it rain somewhere tomorrow?", "maybe"),
    ("Is a whale a fish?", "no"), ("Does sound travel faster than light?", "no"),
    ("Will a coin tossed once land on heads?", "maybe"), ("Is Mount Everest the tallest mountain above sea level?", "yes"),
]
PLACEHOLDER_TASKS = [
    ("Write a short note inviting a neighbour to a garden party.",
     "Dear [neighbour name], we are having a small garden party on [date] at [time]. We would love to see you there."),
    ("Draft a two-line message telling a customer their order has shipped.",
     "Hello [customer name], your order [order number] has shipped today. It should reach [address] within three days."),
    ("Write a brief reminder for a team meeting.",
     "Reminder: the team meeting is on [day] at [time] in [room]. Please bring your weekly update."),
    ("Write a one-sentence thank-you card for a gift.",
     "Dear [name], thank you so much for the lovely [gift]; it made my [occasion] special."),
]
POSTSCRIPTS = ["P.S. Ask me if you would like more detail.", "P.S. I hope this helps.", "P.S. There is more to learn about this.",
               "P.S. Feel free to ask a follow-up question."]
FIRST_WORDS = ["Sure", "Certainly", "Okay", "Gladly", "Alright"]
END_SENTENCES = ["Hope that helps.", "Let me know if you need more.", "Happy to explain further.", "That is my answer."]
STOP = set("the a an and or of to in on for with is are was were it its this that as by from at be can their they "
           "them has have more most some very than then into also".split())


def _words_of(text: str) -> list[str]:
    return [w for w in words(text) if len(w) > 3 and w.lower() not in STOP]


# -- constraints: (id, phrase, rewrite) — rewrite(answer, question, rng) -> (response, kwargs) or None

def lowercase(a, q, rng):
    return a.lower(), {}


def uppercase(a, q, rng):
    return a.upper(), {}


def max_words(a, q, rng):
    n = len(words(a)) + rng.choice([3, 5, 8, 10])
    return a, {"n": n}


def n_sentences(a, q, rng):
    count = len(sentences(a))
    if rng.random() < 0.5:
        return a, {"relation": "less than", "n": count + 1}
    return a, {"relation": "at least", "n": count}


def bullets(a, q, rng):
    parts = sentences(a)
    if len(parts) < 2:
        return None
    return "\n".join(f"* {p}" for p in parts), {"n": len(parts)}


def json_answer(a, q, rng):
    return json.dumps({"answer": a}, ensure_ascii=False), {}


def title(a, q, rng):
    head = " ".join(w.strip(".,:;!?") for w in a.split()[:4]).strip()
    return f"<<{head}>>\n{a}", {}


def highlights(a, q, rng):
    parts = sentences(a)
    return " ".join(f"*{p}*" for p in parts), {"n": len(parts)}


def sections(a, q, rng):
    parts = sentences(a)
    if len(parts) < 2:
        return None
    return "\n".join(f"SECTION {i}\n{p}" for i, p in enumerate(parts, 1)), {"n": len(parts), "splitter": "SECTION"}


def paragraphs(a, q, rng):
    parts = sentences(a)
    if len(parts) < 2:
        return None
    return "\n***\n".join(parts), {"n": len(parts)}


def postscript(a, q, rng):
    return f"{a}\n\n{rng.choice(POSTSCRIPTS)}", {"marker": "P.S."}


def keywords(a, q, rng):
    pool = [w for w in dict.fromkeys(_words_of(a)) if w.lower() not in q.lower()]
    if len(pool) < 2:
        return None
    return a, {"keywords": rng.sample(pool, 2)}


def forbidden(a, q, rng):
    absent = [w for w in ("really", "basically", "actually", "simply", "thing", "stuff", "very", "just")
              if not re.search(rf"\b{w}\b", a, flags=re.IGNORECASE)]
    return a, {"forbidden_words": rng.sample(absent, 2)}


def no_comma(a, q, rng):
    return (a, {}) if "," not in a else None


def quotation(a, q, rng):
    return f'"{a}"', {}


def end_phrase(a, q, rng):
    phrase = rng.choice(END_SENTENCES)
    return f"{a} {phrase}", {"end_phrase": phrase}


def first_word(a, q, rng):
    word = rng.choice(FIRST_WORDS)
    rest = a[0].lower() + a[1:] if a[:2].isalpha() and not a[:2].isupper() else a
    return f"{word}, {rest}", {"first_word": word}


def repeat(a, q, rng):
    return f"{q}\n{a}", {"prompt_to_repeat": q}


def letter_count(a, q, rng):
    letter = rng.choice([c for c in "aeinorst" if a.lower().count(c) >= 2] or ["e"])
    n = a.lower().count(letter)
    if n < 2:
        return None
    return a, {"letter": letter, "relation": "at least", "n": rng.randint(1, n)}


PHRASES = {
    "change_case:english_lowercase": (lowercase, lambda: "Write your whole reply using only small letters, with no capitals anywhere."),
    "change_case:english_capital": (uppercase, lambda: "Write your whole reply in block capitals."),
    "length_constraints:max_words": (max_words, lambda n: f"Keep the reply to {n} words or fewer."),
    "length_constraints:number_sentences": (n_sentences, lambda relation, n: (
        f"Use fewer than {n} sentences." if relation == "less than" else f"Write no fewer than {n} sentence{'s' if n > 1 else ''}.")),
    "detectable_format:number_bullet_lists": (bullets, lambda n: f"Format the reply as {n} markdown bullets, each line starting with '* '."),
    "detectable_format:json_format": (json_answer, lambda: "Return the reply as a JSON object and nothing else."),
    "detectable_format:title": (title, lambda: "Start with a short title inside double angle brackets, like <<my title>>."),
    "detectable_format:number_highlighted_sections": (highlights, lambda n: (
        f"Mark {n} part{'s' if n > 1 else ''} of the reply as italic with single asterisks, like *this*.")),
    "detectable_format:multiple_sections": (sections, lambda n, splitter: (
        f"Split the reply into {n} parts headed {splitter} 1, {splitter} 2 and so on.")),
    "length_constraints:number_paragraphs": (paragraphs, lambda n: f"Give {n} paragraphs with a line of *** between them."),
    "detectable_content:postscript": (postscript, lambda marker: f"Close with a note that begins with {marker}"),
    "keywords:existence": (keywords, lambda keywords: "Be sure to use the words " + " and ".join(f"'{k}'" for k in keywords) + "."),
    "keywords:forbidden_words": (forbidden, lambda forbidden_words: (
        "Avoid the words " + " and ".join(f"'{w}'" for w in forbidden_words) + " in the reply.")),
    "punctuation:no_comma": (no_comma, lambda: "Do not put a single comma in the reply."),
    "startend:quotation": (quotation, lambda: "Put the whole reply between double quotes."),
    "startend:end_checker": (end_phrase, lambda end_phrase: f"The last words of the reply must be exactly: {end_phrase}"),
    "startend:first_word": (first_word, lambda first_word: f"Begin the reply with the word {first_word}."),
    "combination:repeat_prompt": (repeat, lambda prompt_to_repeat: (
        "First copy the question exactly as written, on a line of its own, then answer it.")),
    "keywords:letter_frequency": (letter_count, lambda letter, relation, n: (
        f"Make sure the letter '{letter}' shows up at least {n} time{'s' if n > 1 else ''}.")),
    # written by hand in build() (no rewrite of a demo answer); the last two phrase their rows themselves
    "detectable_format:numbered_list": (None, lambda n: f"Answer with a list numbered 1 to {n}, one item a line."),
    "detectable_format:constrained_response": (None, lambda: ""),
    "detectable_content:number_placeholders": (None, lambda n: ""),
}
# constraint pairs that can hold at once, applied in this order
PAIRS = [
    ("change_case:english_lowercase", "detectable_content:postscript"),
    ("detectable_format:title", "punctuation:no_comma"),
    ("detectable_format:number_bullet_lists", "change_case:english_lowercase"),
    ("length_constraints:max_words", "startend:end_checker"),
    ("keywords:existence", "detectable_content:postscript"),
    ("startend:first_word", "length_constraints:max_words"),
    ("change_case:english_capital", "keywords:existence"),
    ("detectable_format:number_highlighted_sections", "keywords:forbidden_words"),
]


def _check(response: str, constraints: list[tuple[str, dict]]) -> bool:
    return all(check_instruction(i, response, k)["strict"] for i, k in constraints)


def _row(question: str, context: str, constraints: list[tuple[str, dict]], response: str) -> dict:
    phrases = " ".join(PHRASES[i][1](**k) for i, k in constraints)
    return {"instruction": f"{question} {phrases}", "input": context, "output": response,
            "constraints": [{"id": i, "kwargs": k} for i, k in constraints]}


def _constrain(question: str, context: str, answer: str, ids: list[str], rng: random.Random) -> dict | None:
    response, constraints = answer, []
    for instruction_id in ids:
        made = PHRASES[instruction_id][0](response, question, rng)
        if made is None:
            return None
        response, kwargs = made
        constraints.append((instruction_id, kwargs))
    if not _check(response, constraints):
        return None
    return _row(question, context, constraints, response)


def build(per_kind: int = 8, pairs: int = 5) -> list[dict]:
    rng = random.Random(SEED)
    demo = [r for r in json.loads((HERE / "alpaca_demo.json").read_text()) if not r["input"]]
    rng.shuffle(demo)
    rows, used = [], 0

    def take() -> dict:
        nonlocal used
        row = demo[used % len(demo)]
        used += 1
        return row

    for instruction_id, (rewrite, _) in PHRASES.items():
        if rewrite is None:  # the kinds written by hand below
            continue
        made = 0
        for _ in range(per_kind * 6):
            if made == per_kind:
                break
            source = take()
            row = _constrain(source["instruction"], "", source["output"], [instruction_id], rng)
            if row:
                rows.append(row)
                made += 1
    for pair in PAIRS:
        made = 0
        for _ in range(pairs * 8):
            if made == pairs:
                break
            source = take()
            row = _constrain(source["instruction"], "", source["output"], list(pair), rng)
            if row:
                rows.append(row)
                made += 1
    for question, items in LISTS:
        n = rng.randint(3, 5)
        chosen = items[:n]
        kind = rng.choice(["bullets", "numbered", "bullets_lower", "numbered_title"])
        if kind.startswith("bullets"):
            text = "\n".join(f"* {item}" for item in chosen)
            constraints = [("detectable_format:number_bullet_lists", {"n": n})]
            if kind == "bullets_lower":
                text = text.lower()
                constraints.append(("change_case:english_lowercase", {}))
        else:
            text = "\n".join(f"{i}. {item}" for i, item in enumerate(chosen, 1))
            constraints = [("detectable_format:numbered_list", {"n": n})]
            if kind == "numbered_title":
                text = f"<<{question.rstrip('?.').split(' ', 2)[-1].capitalize()}>>\n{text}"
                constraints.append(("detectable_format:title", {}))
        assert _check(text, constraints), (question, text)
        rows.append(_row(question, "", constraints, text))
    for question, answer in YES_NO:
        text = f"My answer is {answer}."
        constraints = [("detectable_format:constrained_response", {})]
        assert _check(text, constraints)
        rows.append({"instruction": f"{question} Reply with exactly one of these: 'My answer is yes.', "
                                    "'My answer is no.' or 'My answer is maybe.'", "input": "", "output": text,
                     "constraints": [{"id": "detectable_format:constrained_response", "kwargs": {}}]})
    for question, text in PLACEHOLDER_TASKS:
        n = text.count("[")
        constraints = [("detectable_content:number_placeholders", {"n": n})]
        assert _check(text, constraints)
        rows.append({"instruction": f"{question} Leave {n} blanks for the details in square brackets, like [place].",
                     "input": "", "output": text,
                     "constraints": [{"id": "detectable_content:number_placeholders", "kwargs": {"n": n}}]})
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = build()
    out = HERE / "if_demo.json"
    out.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    kinds = sorted({c["id"] for r in rows for c in r["constraints"]})
    print(f"{out}: {len(rows)} rows, {len(kinds)} instruction kinds, every row passes its checkers")


if __name__ == "__main__":
    main()
