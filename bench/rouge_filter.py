"""Time Self-Instruct's ROUGE-L novelty filter: 10,000 candidate instructions against a 10,000 pool.

The instructions are synthetic but shaped like real ones: a verb, a task object, a topic, and
usually a specific detail and a constraint, drawn from a few hundred words, so that pairs share
many words and some candidates are near-copies of pool entries, as a model's proposals are.

    .venv/bin/python bench/rouge_filter.py [--candidates 10000] [--pool 10000] [--check 200]

Prints seconds for (1) the bulk best match of every candidate (`max_rouge_l`) and (2) the
sequential filter (`RougePool.add_if_novel`: each candidate against the pool plus the
candidates accepted before it). --check N compares N candidates with the rouge-score package.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

VERBS = ["Write", "Summarize", "Explain", "Describe", "List", "Give", "Suggest", "Classify", "Translate", "Rewrite",
         "Compare", "Identify", "Generate", "Create", "Outline", "Evaluate", "Convert", "Find", "Name", "Plan",
         "Draft", "Tell me", "Recommend", "Sort", "Estimate", "Correct", "Paraphrase", "Extract", "Predict", "Design"]
OBJECTS = ["a short poem", "a haiku", "three reasons", "a product description", "a polite email", "the main idea",
           "five questions", "a headline", "a recipe", "a weekly schedule", "two arguments", "a dialogue",
           "a list of tips", "the sentiment", "the key facts", "a short story", "a limerick", "a slogan",
           "an outline", "a cover letter", "a summary", "the pros and cons", "a definition", "an analogy",
           "a riddle", "a travel plan", "a study guide", "a budget", "a tweet", "a thank-you note"]
TOPICS = ["about the ocean", "for a bakery", "on climate change", "about friendship", "for new employees",
          "about the history of tea", "on remote work", "for a science fair", "about volcanoes", "for beginners",
          "about saving money", "on healthy sleep", "for a birthday party", "about electric cars", "on chess openings",
          "about honeybees", "for a job interview", "about the moon landing", "on learning a language",
          "for a rainy day", "about city gardens", "on public transport", "about ancient Rome", "for a hiking trip",
          "about recycling", "on time management", "for a small library", "about jazz", "on online privacy",
          "about desert animals"]
DETAILS = ("that mentions", "including", "focusing on", "while avoiding", "with a nod to", "contrasting",
           "that a child would enjoy, featuring", "for someone who likes")
NOUNS = """apples bridges castles dolphins engines forests glaciers harbors islands jungles kettles lanterns meadows
nurses orchards pianos quilts rivers sailors tigers umbrellas violins windmills yachts zebras acorns bakers candles
deserts elephants farmers gardens hammers inventors jewelers kites ladders mountains novels oceans painters
questions robots satellites teachers unicorns valleys whales xylophones yogurt zoos anchors balloons cactuses
diamonds eagles feathers giraffes helmets icebergs jackets koalas lemons magnets nests owls pencils rabbits
scissors tulips vases wolves airports bicycles cameras doctors engineers festivals guitars hospitals insects
journalists kitchens libraries museums neighbors oranges parks rainbows schools trains universities villages
waterfalls athletes beaches cookies dragons emails fountains grandparents hurricanes ink jazz keyboards lakes
markets nights operas puzzles recipes storms tomatoes uniforms voyages wizards""".split()
CONSTRAINTS = ["", "", "", "in under 50 words", "using simple words", "for a ten-year-old", "in a formal tone",
               "with exactly three bullet points", "without using the letter e", "in the style of a news report",
               "and explain your choice", "given the text below", "in two sentences", "as a numbered list"]


def instruction(rng: random.Random) -> str:
    text = f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TOPICS)}"
    if rng.random() < 0.8:  # most real instructions carry some specific detail
        text += f" {rng.choice(DETAILS)} " + " and ".join(rng.sample(NOUNS, rng.randint(1, 3)))
    constraint = rng.choice(CONSTRAINTS)
    return (f"{text} {constraint}" if constraint else text) + rng.choice([".", ".", "?", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=10_000)
    parser.add_argument("--pool", type=int, default=10_000)
    parser.add_argument("--check", type=int, default=200, help="candidates to verify against rouge-score (0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from sftlab.quality.similarity import RougePool, max_rouge_l

    rng = random.Random(args.seed)
    pool = [instruction(rng) for _ in range(args.pool)]
    candidates = [instruction(rng) for _ in range(args.candidates)]

    start = time.perf_counter()
    scores, index = max_rouge_l(candidates, pool)
    bulk = time.perf_counter() - start

    start = time.perf_counter()
    matches = RougePool(pool).add_if_novel(candidates, threshold=0.7)
    sequential = time.perf_counter() - start
    kept = sum(m.added for m in matches)

    checked = 0
    if args.check:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        for i in range(min(args.check, len(candidates))):
            best = max(scorer.score(candidates[i], p)["rougeL"].fmeasure for p in pool)
            if best != scores[i]:
                raise SystemExit(f"mismatch on candidate {i}: {scores[i]} != rouge-score {best}")
            checked += 1

    result = {"candidates": len(candidates), "pool": len(pool), "cores": os.cpu_count(),
              "max_rouge_l_seconds": round(bulk, 2), "sequential_filter_seconds": round(sequential, 2),
              "kept_by_filter": kept, "similar_above_0.7": len(candidates) - kept,
              "checked_against_rouge_score": checked}
    print(json.dumps(result, indent=1))
    print(f"max_rouge_l {len(candidates):,} x {len(pool):,}: {bulk:.2f} s; "
          f"sequential filter: {sequential:.2f} s ({kept:,} kept)")


if __name__ == "__main__":
    main()
