"""Time `sftlab quality`'s near-duplicate and ROUGE-L steps on 100,000 synthetic rows.

The rows are shaped like instruction data: templated instructions (a task verb and object, a
topic, often a detail and a constraint; a third are questions such as "What is the capital of
X?"), responses of 10-300 words (log-normal) drawn from a Zipf-distributed vocabulary of 30,000
words whose top ranks are English function words. Planted among them:

- near duplicates: 2% of rows copy an earlier row and edit 0-4% of the response words
  (replace, insert or delete) and the instruction's case/punctuation;
- exact duplicates: 0.5% copy an earlier row and change only case, whitespace and punctuation;
- hard negatives: 1% reuse an earlier row's instruction with a new response (similar
  instructions, but not near duplicates of the whole row).

    .venv/bin/python bench/quality_scale.py [--rows 100000] [--rouge-check 10000] [--datasketch 5000] [--full]

Timed separately (wall clock, this process, CPU only):
  near-duplicate step   `dedup.near_duplicates` on instruction + response: word 5-gram shingles,
                        MinHash (256 permutations, numpy), LSH (25 bands x 10), verification of the
                        candidates (MinHash estimate, then exact Jaccard), union-find clusters
  ROUGE-L step          `dedup.similar_instructions` on the instructions with method "lsh" (the
                        default above 20,000 rows): MinHash LSH candidates over multiset tokens,
                        then exact ROUGE-L (`sftlab.quality.similarity.max_rouge_l`) per row against
                        its candidates
--rouge-check N       runs the exact all-pairs method on the first N rows and reports the recall of
                      the "lsh" method on those rows (the share of rows flagged by "all" that "lsh"
                      also flags with the same best score)
--datasketch N        times datasketch's `MinHash.bulk` on N rows for comparison (extrapolated)
--full                also times the whole `analyze()` (no IFD, spaCy diversity included) on the rows
Prints the timings and the planted-pair recall; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

FUNCTION_WORDS = ("the of and a to in is that it for as with was on be by this are or from at an which "
                  "can not but have has you your they their we our more one all also when how what")
VERBS = ["Write", "Summarize", "Explain", "Describe", "List", "Give", "Suggest", "Classify", "Translate", "Rewrite",
         "Compare", "Identify", "Generate", "Create", "Outline", "Evaluate", "Convert", "Find", "Name", "Plan",
         "Draft", "Recommend", "Sort", "Estimate", "Correct", "Paraphrase", "Extract", "Predict", "Design", "Analyze",
         "Brainstorm", "Compose", "Edit", "Calculate", "Propose", "Discuss", "Define", "Illustrate", "Review", "Prepare"]
OBJECTS = ["a short poem", "a haiku", "three reasons", "a product description", "a polite email", "the main idea",
           "five questions", "a headline", "a recipe", "a weekly schedule", "two arguments", "a dialogue",
           "a list of tips", "the sentiment", "the key facts", "a short story", "a slogan", "an outline",
           "a cover letter", "a summary", "the pros and cons", "a definition", "an analogy", "a riddle",
           "a travel plan", "a study guide", "a budget", "a tweet", "a thank-you note", "a blog post", "an essay",
           "a speech", "a tagline", "a lesson plan", "a checklist", "a story opening", "a job advert", "an apology"]
QUESTIONS = ["What is the capital of {}?", "Who invented the {}?", "How does {} work?", "Why is {} important?",
             "What are the benefits of {}?", "How can I improve my {}?", "What is the difference between {} and {}?",
             "When did {} begin?", "Is {} good for {}?", "How do you make {}?"]
CONSTRAINTS = ["", "", "", "in under 50 words", "using simple words", "for a ten-year-old", "in a formal tone",
               "with exactly three bullet points", "in the style of a news report", "and explain your choice",
               "in two sentences", "as a numbered list", "for a general audience"]
DETAILS = ["that mentions", "including", "focusing on", "while avoiding", "contrasting", "for someone who likes"]


class Vocabulary:
    def __init__(self, rng: random.Random, size: int = 30_000, exponent: float = 1.1):
        syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
        words = list(FUNCTION_WORDS.split())
        seen = set(words)
        while len(words) < size:
            w = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.words = words
        weights = [1 / (rank + 1) ** exponent for rank in range(size)]
        total = sum(weights)
        self.cumulative = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cumulative.append(acc)

    def sample(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self.cumulative, k=k)

    def content(self, rng: random.Random, k: int) -> list[str]:
        """Rarer words for topics: ranks 200..30,000, log-uniform."""
        top = len(self.words) / 200
        return [self.words[min(len(self.words) - 1, int(200 * top ** rng.random()))] for _ in range(k)]


def make_instruction(rng: random.Random, vocab: Vocabulary) -> str:
    if rng.random() < 0.33:
        template = rng.choice(QUESTIONS)
        return template.format(*(" ".join(vocab.content(rng, rng.randint(1, 3))) for _ in range(template.count("{}"))))
    text = f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} about {' '.join(vocab.content(rng, rng.randint(2, 4)))}"
    if rng.random() < 0.7:
        text += f" {rng.choice(DETAILS)} " + " and ".join(vocab.content(rng, rng.randint(1, 3)))
    constraint = rng.choice(CONSTRAINTS)
    return (f"{text} {constraint}" if constraint else text) + rng.choice([".", ".", "?", ""])


def make_response(rng: random.Random, vocab: Vocabulary) -> str:
    n = max(10, min(300, int(rng.lognormvariate(math.log(70), 0.7))))
    words = vocab.sample(rng, n)
    out, sentence = [], []
    for w in words:
        sentence.append(w)
        if len(sentence) >= rng.randint(8, 20):
            out.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    if sentence:
        out.append(" ".join(sentence).capitalize() + ".")
    return " ".join(out)


def edit_words(rng: random.Random, text: str, share: float, vocab: Vocabulary) -> str:
    words = text.split()
    for _ in range(round(len(words) * share)):
        k = rng.randrange(len(words))
        action = rng.random()
        if action < 0.5:
            words[k] = vocab.sample(rng, 1)[0]
        elif action < 0.75:
            words.insert(k, vocab.sample(rng, 1)[0])
        elif len(words) > 5:
            del words[k]
    return " ".join(words)


def respell(rng: random.Random, text: str) -> str:
    """Only case, whitespace and punctuation change."""
    text = text.upper() if rng.random() < 0.3 else text.lower()
    text = text.replace(". ", " .  ").replace(",", " ,")
    return text + rng.choice(["!", "", " ..."])


def generate(n: int, seed: int = 0):
    rng = random.Random(seed)
    vocab = Vocabulary(rng)
    rows, planted = [], {"near": [], "exact": [], "negative": []}
    for i in range(n):
        roll = rng.random()
        if i > 100 and roll < 0.02:
            j = rng.randrange(i)
            src = rows[j]
            instruction = src["instruction"] if rng.random() < 0.5 else src["instruction"].lower().rstrip(".?")
            rows.append({"instruction": instruction, "input": "",
                         "output": edit_words(rng, src["output"], rng.uniform(0.0, 0.04), vocab)})
            planted["near"].append((j, i))
        elif i > 100 and roll < 0.025:
            j = rng.randrange(i)
            src = rows[j]
            rows.append({"instruction": respell(rng, src["instruction"]), "input": "", "output": respell(rng, src["output"])})
            planted["exact"].append((j, i))
        elif i > 100 and roll < 0.035:
            j = rng.randrange(i)
            rows.append({"instruction": rows[j]["instruction"], "input": "", "output": make_response(rng, vocab)})
            planted["negative"].append((j, i))
        else:
            rows.append({"instruction": make_instruction(rng, vocab), "input": "", "output": make_response(rng, vocab)})
    return rows, planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rouge-check", type=int, default=10_000, help="rows for the exact-vs-lsh recall check (0 = skip)")
    parser.add_argument("--datasketch", type=int, default=0, help="rows to time datasketch MinHash.bulk on (0 = skip)")
    parser.add_argument("--full", action="store_true", help="also time the whole analyze() on the rows")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from sftlab.quality import dedup, minhash

    t0 = time.perf_counter()
    rows, planted = generate(args.rows, args.seed)
    generated = time.perf_counter() - t0
    texts = [f"{r['instruction']}\n\n{r['output']}" for r in rows]
    instructions = [r["instruction"] for r in rows]
    words = sum(len(t.split()) for t in texts)
    print(f"{len(rows):,} rows, {words / len(rows):.0f} words per row on average, generated in {generated:.1f} s; "
          f"planted: {len(planted['near'])} near, {len(planted['exact'])} exact, {len(planted['negative'])} hard negatives",
          flush=True)

    # -- near duplicates ----------------------------------------------------------------------
    t0 = time.perf_counter()
    near = dedup.near_duplicates(texts, threshold=0.7)
    near_seconds = time.perf_counter() - t0
    cluster_of = {m: k for k, c in enumerate(near.clusters) for m in c}
    same = lambda a, b: a in cluster_of and cluster_of.get(a) == cluster_of.get(b)
    truth = near.jaccard_of(planted["near"]) if planted["near"] else []
    expected = [p for p, j in zip(planted["near"], truth) if j >= 0.7]
    found_near = sum(same(a, b) for a, b in expected)
    found_exact = sum(same(a, b) for a, b in planted["exact"])
    negatives = sum(same(a, b) for a, b in planted["negative"])
    print(f"near-duplicate step: {near_seconds:.1f} s "
          f"(shingles {near.seconds['shingles']:.1f}, MinHash {near.seconds['minhash']:.1f}, "
          f"LSH {near.seconds['lsh']:.1f}, verify {near.seconds['verify']:.1f}); "
          f"{near.candidates:,} candidate pairs, {len(near.pairs):,} verified, {len(near.clusters):,} clusters", flush=True)
    print(f"  planted near duplicates with true Jaccard >= 0.7: {found_near}/{len(expected)} found; "
          f"planted exact (respelled) duplicates: {found_exact}/{len(planted['exact'])} found; "
          f"hard negatives wrongly clustered: {negatives}/{len(planted['negative'])}", flush=True)

    # -- ROUGE-L ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    similar = dedup.similar_instructions(instructions, 0.7, method="lsh")
    rouge_seconds = time.perf_counter() - t0
    print(f"ROUGE-L step (lsh candidates): {rouge_seconds:.1f} s; {similar.candidates:,} pairs scored; "
          f"{len(similar.flagged):,} instructions with ROUGE-L > 0.7 to an earlier one", flush=True)

    result = {"rows": len(rows), "cores": os.cpu_count(), "words_per_row": round(words / len(rows), 1),
              "near_duplicate_seconds": round(near_seconds, 2),
              "near_duplicate_parts": {k: round(v, 2) for k, v in near.seconds.items()},
              "near_candidates": near.candidates, "near_verified_pairs": len(near.pairs),
              "near_clusters": len(near.clusters), "planted_near_expected": len(expected), "planted_near_found": found_near,
              "planted_exact": len(planted["exact"]), "planted_exact_found": found_exact,
              "hard_negatives_clustered": negatives,
              "rouge_seconds": round(rouge_seconds, 2), "rouge_pairs_scored": similar.candidates,
              "rouge_flagged": len(similar.flagged)}

    if args.rouge_check:
        m = min(args.rouge_check, len(rows))
        t0 = time.perf_counter()
        exact = dedup.similar_instructions(instructions[:m], 0.7, method="all")
        exact_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        approx = dedup.similar_instructions(instructions[:m], 0.7, method="lsh")
        approx_seconds = time.perf_counter() - t0
        flagged = exact.flagged
        agree = int(sum(approx.best_score[i] == exact.best_score[i] for i in flagged))
        extra = len(set(approx.flagged.tolist()) - set(flagged.tolist()))
        print(f"ROUGE-L check on the first {m:,} rows: exact all-pairs {exact_seconds:.1f} s "
              f"({m * (m - 1) // 2:,} pairs), lsh {approx_seconds:.1f} s; lsh recall {agree}/{len(flagged)} "
              f"flagged rows with the same best score; {extra} flagged by lsh only (must be 0)", flush=True)
        result.update({"rouge_check_rows": m, "rouge_all_seconds": round(exact_seconds, 2),
                       "rouge_lsh_seconds_on_check": round(approx_seconds, 2), "rouge_check_flagged": len(flagged),
                       "rouge_lsh_recall": round(agree / len(flagged), 4) if len(flagged) else None,
                       "rouge_lsh_only": extra})

    if args.datasketch:
        from datasketch import MinHash

        m = min(args.datasketch, len(rows))
        shingle_sets = []
        for t in texts[:m]:
            w = minhash.words(t)
            shingle_sets.append([" ".join(w[k : k + 5]).encode() for k in range(max(1, len(w) - 4))])
        t0 = time.perf_counter()
        MinHash.bulk(shingle_sets, num_perm=256)
        ds = time.perf_counter() - t0
        hashes, offsets = minhash.ngram_hashes([minhash.words(t) for t in texts[:m]], 5)
        t0 = time.perf_counter()
        minhash.signatures(hashes, offsets, 256)
        ours = time.perf_counter() - t0
        print(f"MinHash signatures on {m:,} rows: datasketch MinHash.bulk {ds:.1f} s "
              f"(~{ds * len(rows) / m:.0f} s for {len(rows):,}), sftlab numpy {ours:.2f} s", flush=True)
        result.update({"datasketch_rows": m, "datasketch_bulk_seconds": round(ds, 2), "numpy_minhash_seconds": round(ours, 2)})

    if args.full:
        from sftlab.quality.analysis import analyze

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "rows.jsonl")
            with open(path, "w") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in rows)
            t0 = time.perf_counter()
            report = analyze([path], report=os.path.join(folder, "quality.html"), builtin_suite=True)
            full = time.perf_counter() - t0
        print(f"whole analyze() with the HTML report: {full:.1f} s; steps: {report['seconds']}", flush=True)
        result.update({"analyze_seconds": round(full, 2), "analyze_steps": report["seconds"]})

    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
