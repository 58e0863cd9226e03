"""Search and retrieval: answer questions about a fictional corpus with `search` and `read`.

The corpus (corpus.jsonl, 300 short documents made by make_data.py) is indexed with BM25
(`bm25s`). `search(query)` returns the top 3 document ids, titles and first sentences;
`read(doc_id)` returns a whole document. Facts sit after the first sentence, so the model has
to read what it found. The answer must cite the documents it used as [doc-N].

Rewards (partial credit, so a weak model's groups are not tied):
  correct             1.0   the gold answer is in a short final reply (0.5 if the reply is long)
  citation_precision  0.25  share of cited ids that are relevant
  citation_recall     0.25  share of relevant ids cited
  search_efficiency   0.25  searched at all, and used at most one call more than needed
  answer_format       0.1   a short final reply citing at least one [doc-N]

Warm-up: `demonstrate(example)` searches for the name in each relevant document's title, reads
that document, then answers "<answer> [doc-N]"; config.toml trains on these (train split) before RL.
"""

import json
from pathlib import Path

import bm25s

from rlft import Environment, Reward, tool
from rlft.rewards import checks

HERE = Path(__file__).parent
DOCS = {d["id"]: d for d in map(json.loads, (HERE / "corpus.jsonl").read_text().splitlines())}
_IDS = list(DOCS)
_INDEX = bm25s.BM25()
_INDEX.index(bm25s.tokenize([f"{d['title']} {d['text']}" for d in DOCS.values()], stopwords="en", show_progress=False),
             show_progress=False)


@tool
def search(query: str) -> str:
    """Search the encyclopedia. Returns the ids, titles and first sentences of the 3 best documents.

    Args:
        query: keywords, e.g. a name
    """
    tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
    if not tokens.vocab:
        return "no results: use words that appear in the documents"
    ids, scores = _INDEX.retrieve(tokens, k=3, show_progress=False)
    hits = [DOCS[_IDS[i]] for i, s in zip(ids[0], scores[0]) if s > 0]
    if not hits:
        return "no results"
    return "\n".join(f"[{d['id']}] {d['title']}: {d['text'].split('. ')[0]}." for d in hits)


@tool
def read(doc_id: str) -> str:
    """Read a whole document.

    Args:
        doc_id: a document id from the search results, e.g. "doc-12"
    """
    key = doc_id.strip().strip("[]")
    key = key if key.startswith("doc-") else f"doc-{key}"
    if key not in DOCS:
        raise KeyError(f"no document {doc_id!r}; ids look like doc-12")
    d = DOCS[key]
    return f"[{d['id']}] {d['title']}\n{d['text']}"


def correct(rollout) -> float:
    """1 if the gold answer is in a final reply of at most 30 words; 0.5 if the reply is longer."""
    text = rollout.completion
    if checks.normalize(rollout.ground_truth) not in checks.normalize(text):
        return 0.0
    return 1.0 if checks.word_count(text) <= 30 else 0.5


def citations(rollout) -> dict:
    precision, recall = checks.citation_precision_recall(checks.citations(rollout.completion),
                                                         rollout.example["relevant_ids"])
    return {"citation_precision": precision, "citation_recall": recall}


def answer_format(rollout) -> float:
    """1 for a short final reply that cites at least one document as [doc-N] (the shape asked for)."""
    text = rollout.completion
    return float(checks.word_count(text) <= 30 and any(c.startswith("doc-") for c in checks.citations(text)))


def search_efficiency(rollout) -> float:
    """0 without a successful search; 1 within min_calls + 1 tool calls, then decreasing."""
    failed = sum(e.where.startswith("tool:") for e in rollout.errors)
    searched = any(m.get("name") == "search" for m in rollout.tool_messages) and rollout.tool_calls > failed
    if not searched:
        return 0.0
    budget = rollout.example["min_calls"] + 1
    return min(1.0, budget / max(rollout.tool_calls, 1))


def _call(name: str, **arguments) -> dict:
    return {"tool_calls": [{"function": {"name": name, "arguments": arguments}}]}


def demonstrate(example):
    """Per relevant document (one per hop): search its name, read it; then the short cited answer."""
    turns = []
    for doc_id in example["relevant_ids"]:
        name = DOCS[doc_id]["title"].removesuffix(" Island").removesuffix(" (city)")
        turns += [_call("search", query=name), _call("read", doc_id=doc_id)]
    cited = " ".join(f"[{doc_id}]" for doc_id in example["relevant_ids"])
    return [*turns, f"{example['ground_truth']} {cited}"]


SYSTEM = """You answer questions about an encyclopedia of islands and cities. You know nothing about them: \
first call search with the name from the question, then read the most relevant document, then answer.
Example:
<tool_call>{"name": "search", "arguments": {"query": "Velmora"}}</tool_call>
<tool_call>{"name": "read", "arguments": {"doc_id": "doc-7"}}</tool_call>
Final reply: one short sentence with the answer and the ids of the documents you used, e.g. "Brenhaven [doc-7]"."""

env = Environment(
    system_prompt=SYSTEM,
    tools=[search, read],
    rewards=[correct, Reward(citations, weight=0.25), Reward(search_efficiency, weight=0.25),
             Reward(answer_format, weight=0.1)],
    max_turns=5,
    max_tool_calls=6,
    max_tokens=768,
    max_tokens_per_turn=96,
    demonstrate=demonstrate,
    name="search",
)
