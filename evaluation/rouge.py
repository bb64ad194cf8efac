"""Rouge-L as in the paper's tables: the `rouge-score` package, F-measure, Porter stemming."""

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 in points (0-100)."""
    return 100.0 * _SCORER.score(reference, prediction)["rougeL"].fmeasure


def mean_rouge_l(predictions: list[str], references: list[str]) -> float:
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need as many predictions as references, at least one")
    return sum(map(rouge_l, predictions, references)) / len(predictions)


def side_usage(sigmas_per_summary: list[list[int]]) -> float:
    """Share of all generated tokens chosen with sigma = 1 (not a mean of per-summary shares)."""
    tokens = sum(len(s) for s in sigmas_per_summary)
    return sum(sum(s) for s in sigmas_per_summary) / tokens if tokens else 0.0
