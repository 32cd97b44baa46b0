"""Which generated answers to trust: greedy answers under weight samples, and their Bayesian confidence.

For each prompt x and each of S weight draws θ_s (posterior samples, ensemble members, dropout masks), the model
answers greedily with its KV cache. Then, under every draw again, each distinct answer a (an exact-match cluster
after :func:`~bayes_peft.data.generative.normalize_answer`) is scored teacher-forced, end token included:

- the **answer**: the most frequent over the draws, ties broken by probability;
- its **confidence**, the Bayesian model average p(a | x) = 1/S Σ_s Π_t p(a_t | x, a_<t, θ_s);
- the **answer entropy**: −Σ_c f_c log f_c over the clusters' shares f_c of the S answers (0 when all agree);
- the **mutual information** along the answer, Σ_t [H(p̄_t) − 1/S Σ_s H(p_{s,t})] with p_{s,t} the next-token
  distribution under θ_s after x and a_<t, and p̄_t their mean: the epistemic part of the token uncertainty.

At the mean (one draw), the entropy and the mutual information are 0 and the confidence is the MAP's own sequence
probability. An MC-dropout draw is a fresh mask at every forward pass (greedy decoding and scoring do not share one).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from ..data.generative import (IGNORE_INDEX, answer_logits, answer_token_log_probs, at_least_float32,
                               normalize_answer, prompt_answer_batch)
from .calibration import fit_temperature
from .metrics import binned_ece, binned_reliability, save_figure
from .uncertainty import ood_auroc, risk_coverage_of_errors

__all__ = ["GeneratedAnswers", "generate_answers", "greedy_answer_ids", "choose_answer", "cluster_entropy",
           "token_mutual_information", "answer_token_logits", "fit_answer_temperature", "generation_plots",
           "reference_answer_nll", "answer_validation_prior", "ANSWER_PRIOR_GRID", "UNCERTAINTIES"]

# The uncertainty scores of a generated answer, each higher for an answer less to be trusted.
UNCERTAINTIES = ("1 - confidence", "answer entropy", "mutual information")
Draws = Callable[[], Iterable[contextlib.AbstractContextManager]]


@dataclass
class GeneratedAnswers:
    """Per prompt: the answer, its confidence and uncertainties, every draw's answer, and the reference."""

    answers: list[str]
    confidence: Tensor  # [N] p(answer | x), averaged over the draws
    answer_entropy: Tensor  # [N] nats, over exact-match clusters of the draws' answers
    mutual_information: Tensor  # [N] nats, summed over the answer's tokens
    sample_answers: list[list[str]]  # [N][S]
    references: list  # [N]: per prompt, the answer that counts as right, or a tuple of those that do
    levels: list[str]

    @property
    def correct(self) -> Tensor:
        """``[N]`` bool: the answer equals a reference after normalisation."""
        return torch.tensor([normalize_answer(a) in {normalize_answer(r) for r in ((refs,) if isinstance(refs, str)
                                                                                   else refs)}
                             for a, refs in zip(self.answers, self.references)])

    def uncertainty(self, name: str) -> Tensor:
        scores = {"1 - confidence": 1 - self.confidence, "answer entropy": self.answer_entropy,
                  "mutual information": self.mutual_information}
        if name not in scores:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTIES}, got {name!r}")
        return scores[name]

    def subset(self, level: str) -> "GeneratedAnswers":
        """The prompts of one ``level`` only."""
        keep = [i for i, lv in enumerate(self.levels) if lv == level]
        if not keep:
            raise ValueError(f"no prompt of level {level!r}; levels: {sorted(set(self.levels))}")
        index = torch.tensor(keep)
        return GeneratedAnswers([self.answers[i] for i in keep], self.confidence[index], self.answer_entropy[index],
                                self.mutual_information[index], [self.sample_answers[i] for i in keep],
                                [self.references[i] for i in keep], [self.levels[i] for i in keep])

    def metrics(self, n_bins: int = 10) -> dict[str, float]:
        """Exact-match accuracy; ECE and Brier of the confidence against correctness; per uncertainty score, the
        AURC of answering the most certain first and the AUROC of telling wrong answers (positives) from right
        ones (``nan`` when all are right or all wrong)."""
        correct, confidence = self.correct, self.confidence.double()
        out = {"acc": float(correct.double().mean()), "ece": float(binned_ece(confidence, correct, n_bins)),
               "brier": float((confidence - correct.double()).square().mean()), "n": len(self.answers)}
        for name in UNCERTAINTIES:
            score = self.uncertainty(name)
            out[f"aurc ({name})"] = float(risk_coverage_of_errors(~correct, score)[1].mean())
            both = bool(correct.any()) and bool((~correct).any())
            out[f"auroc ({name})"] = ood_auroc(score[correct], score[~correct]) if both else float("nan")
        return out


# ----------------------------------------------------------------------------------------------------
# Pure parts


def cluster_entropy(answers: Sequence[str]) -> float:
    """−Σ_c f_c log f_c over the exact-match clusters of ``answers`` (their shares f_c), in nats."""
    counts = torch.tensor(list(Counter(normalize_answer(a) for a in answers).values()), dtype=torch.float64)
    shares = counts / counts.sum()
    return float(-(shares * shares.log()).sum())


def choose_answer(answers: Sequence[str], probability: dict[str, float]) -> str:
    """The most frequent cluster of ``answers`` (normalised), ties broken by ``probability`` (by cluster); the
    answer returned is the first draw's text of that cluster."""
    counts = Counter(normalize_answer(a) for a in answers)
    best = max(counts, key=lambda c: (counts[c], probability.get(c, 0.0)))
    return next(a for a in answers if normalize_answer(a) == best)


def token_mutual_information(log_probs: Tensor, mask: Tensor) -> Tensor:
    """``[B]``: Σ_t [H(p̄_t) − mean_s H(p_{s,t})] over the positions where ``mask [B, T]`` is true, from the draws'
    next-token log probabilities ``log_probs [S, B, T, V]``."""
    moments = _InformationMoments()
    for draw in log_probs:
        moments.add(draw)
    return moments.information(mask)


class _InformationMoments:
    """Running sums over draws of the next-token probabilities and of their entropies, so that the S draws'
    ``[B, T, V]`` distributions never need to be held at once."""

    def __init__(self):
        self.n, self.probs, self.entropy = 0, 0.0, 0.0

    def add(self, log_probs: Tensor) -> None:
        probs = log_probs.double().exp()
        self.n += 1
        self.probs = self.probs + probs
        self.entropy = self.entropy - (probs * log_probs.double()).sum(-1)

    def information(self, mask: Tensor) -> Tensor:
        mean = self.probs / self.n
        entropy_of_mean = -(mean * mean.clamp_min(1e-300).log()).sum(-1)
        return ((entropy_of_mean - self.entropy / self.n).clamp_min(0) * mask).sum(-1)


# ----------------------------------------------------------------------------------------------------
# With a model


@torch.no_grad()  # not inference_mode: see Evaluator._probs_of_batches (FSDP2)
def greedy_answer_ids(model, batch: dict, max_new_tokens: int, end_id: int, pad_id: int) -> list[list[int]]:
    """Per prompt of ``batch`` (left-padded ``input_ids``/``attention_mask``), the greedy continuation's token ids
    up to and including the first ``end_id`` (at most ``max_new_tokens``), decoded with the KV cache."""
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=end_id, pad_token_id=pad_id,
                         num_beams=1, temperature=None, top_p=None, top_k=None)
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        rows.append(row[: row.index(end_id) + 1] if end_id in row else row)
    return rows


def _prompts(batch: dict) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


@torch.no_grad()  # not inference mode: fit_answer_temperature differentiates through these logits
def answer_token_logits(model, batches: Iterable[dict]) -> tuple[Tensor, Tensor]:
    """``(logits [M, V], targets [M])`` at the M answer tokens of training-style batches (a
    :class:`~bayes_peft.data.generative.GenerativeTask`'s ``loader``): the logits that predict each answer token
    (the end token included), teacher-forced."""
    device = next(model.parameters()).device
    logits_out, targets_out = [], []
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            logits, targets = answer_logits(model, batch)
            keep = targets != IGNORE_INDEX
            logits_out.append(at_least_float32(logits[keep]).cpu())
            targets_out.append(targets[keep].cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits_out), torch.cat(targets_out)


def fit_answer_temperature(model, batches: Iterable[dict]) -> float:
    """The one temperature T of the token logits that minimises the teacher-forced NLL of the reference answers
    of ``batches`` (the sum over sequences of their token NLLs): temperature scaling for generated answers."""
    logits, targets = answer_token_logits(model, batches)
    return fit_temperature(torch.softmax(logits.double(), -1), targets)


# The prior precisions a Laplace posterior of generated answers is chosen from (answer_validation_prior): from
# σ_prior ≈ 0.3, which the LoRA weights' own scale (~0.02) makes a posterior of noise, to 1e-4, the MAP's answers.
ANSWER_PRIOR_GRID = tuple(10.0 ** (k / 2) for k in range(2, 17))


@torch.no_grad()  # not inference_mode: see Evaluator._probs_of_batches (FSDP2)
def reference_answer_nll(model, draws: Draws, batches: Sequence[dict]) -> float:
    """−1/N Σ_n log(1/S Σ_s p(a_n | x_n, θ_s)): the teacher-forced NLL of the N reference answers of ``batches``
    (training-style batches of a :class:`~bayes_peft.data.generative.GenerativeTask`'s ``loader``) under the
    model average of the S weight draws that ``draws()`` yields, each answer's probability the product of its
    tokens' (the end token included)."""
    device = next(model.parameters()).device
    per_draw = []  # [S] of [N]
    for draw in draws():
        with draw:
            rows = []
            for batch in batches:
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                rows.append(answer_token_log_probs(*answer_logits(model, batch)).sum(-1).double().cpu())
        per_draw.append(torch.cat(rows))
    log_p = torch.stack(per_draw)
    return float(-(torch.logsumexp(log_p, 0) - math.log(len(per_draw))).mean())


def answer_validation_prior(posterior, model, batches: Sequence[dict], n_samples: int, seed: int = 0,
                            grid: Sequence[float] = ANSWER_PRIOR_GRID) -> float:
    """The scalar prior precision λ on ``grid`` whose sampled posterior (``posterior.with_prior_precision``, a
    Laplace posterior; ``n_samples`` draws seeded by ``seed``, the same noise for every λ) gives the reference
    answers of ``batches`` the lowest :func:`reference_answer_nll`: the classifier's validation prior for
    generated answers, which have no linearized predictive."""
    was_training = model.training
    model.eval()

    def nll(lam: float) -> float:
        candidate = posterior.with_prior_precision(dict.fromkeys(posterior.prior_precision, lam))
        generator = torch.Generator()

        def draws():
            generator.manual_seed(seed)
            return (candidate.sample(tau=1.0, generator=generator) for _ in range(n_samples))
        return reference_answer_nll(model, draws, batches)

    try:
        return float(min(grid, key=nll))
    finally:
        model.train(was_training)


@torch.no_grad()  # not inference_mode: see Evaluator._probs_of_batches (FSDP2)
def _teacher_forced(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                    device: torch.device, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """For each (prompt, answer) pair: log p(answer) ``[R]``, the next-token log probabilities at the answer's
    positions ``[R, L, V]`` and their mask ``[R, L]`` (L the longest answer), the logits divided by
    ``temperature``."""
    batch = prompt_answer_batch(prompts, answers, pad_id)
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    logits, labels = answer_logits(model, batch)
    logits = logits / temperature
    sequence = answer_token_log_probs(logits, labels).sum(-1)
    return sequence.double(), torch.log_softmax(at_least_float32(logits), dim=-1), labels != IGNORE_INDEX


def generate_answers(model, draws: Draws, batches: Sequence[dict], decode: Callable[[list[int]], str], end_id: int,
                     pad_id: int, max_new_tokens: int = 16, progress: Optional[Callable[[int], None]] = None,
                     temperature: float = 1.0) -> GeneratedAnswers:
    """:class:`GeneratedAnswers` of ``batches`` (prompt batches of a
    :class:`~bayes_peft.data.generative.GenerativeTask`), the model answering under each weight draw that
    ``draws()`` yields (called twice a batch: it must yield the same draws each time, as a seeded posterior
    sample does). ``decode`` turns answer token ids (end token included) into text. ``temperature`` divides the
    logits of the scoring (the greedy answers do not depend on it)."""
    device = next(model.parameters()).device
    answers, confidence, entropy, information, samples, references, levels = [], [], [], [], [], [], []
    for batch in batches:
        prompts = _prompts(batch)
        on_device = {k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)}
        generated = []  # [S][B] token ids
        for draw in draws():
            with draw:
                generated.append(greedy_answer_ids(model, on_device, max_new_tokens, end_id, pad_id))
        texts = [[decode(ids) for ids in per_draw] for per_draw in generated]  # [S][B]
        # The distinct answers of each prompt, each as the first draw's tokens of its cluster.
        candidates: list[dict[str, list[int]]] = []
        for i in range(len(prompts)):
            clusters: dict[str, list[int]] = {}
            for s in range(len(generated)):
                clusters.setdefault(normalize_answer(texts[s][i]), generated[s][i] or [end_id])
            candidates.append(clusters)
        pairs = [(i, c) for i, clusters in enumerate(candidates) for c in clusters]
        pair_prompts = [prompts[i] for i, _ in pairs]
        pair_answers = [candidates[i][c] for i, c in pairs]
        probability, moments, mask = torch.zeros(len(pairs), dtype=torch.float64), _InformationMoments(), None
        for draw in draws():
            with draw:
                sequence, steps, mask = _teacher_forced(model, pair_prompts, pair_answers, pad_id, device,
                                                        temperature)
                moments.add(steps)
            probability += sequence.exp().cpu()
        probability /= moments.n
        pair_information = moments.information(mask).cpu()
        for i in range(len(prompts)):
            mine = {c: k for k, (j, c) in enumerate(pairs) if j == i}
            drawn = [texts[s][i] for s in range(len(texts))]
            chosen = choose_answer(drawn, {c: float(probability[k]) for c, k in mine.items()})
            k = mine[normalize_answer(chosen)]
            answers.append(chosen)
            confidence.append(float(probability[k]))
            information.append(float(pair_information[k]))
            entropy.append(cluster_entropy(drawn))
            samples.append(drawn)
        references.extend(batch["answers"])
        levels.extend(batch["levels"])
        if progress is not None:
            progress(1)
    return GeneratedAnswers(answers, torch.tensor(confidence, dtype=torch.float64),
                            torch.tensor(entropy, dtype=torch.float64), torch.tensor(information, dtype=torch.float64),
                            samples, references, levels)


def generation_plots(answers: dict[str, dict], risk_coverage_path, reliability_path, title: str = "",
                     n_bins: int = 10) -> None:
    """A risk–coverage PNG (answering the most confident first) and a reliability PNG (accuracy against the
    confidence, per bin) of each method's answers: ``{method: {"correct": [...], "confidence": [...]}}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, rc = plt.subplots(figsize=(5, 4))
    fig_rel, rel = plt.subplots(figsize=(5, 4))
    for name, kept in answers.items():
        correct, confidence = torch.tensor(kept["correct"]), torch.tensor(kept["confidence"], dtype=torch.float64)
        coverage, risk = risk_coverage_of_errors(~correct, -confidence)
        rc.plot(coverage.numpy(), risk.numpy(), linewidth=1, label=f"{name} (AURC {float(risk.mean()):.3f})")
        count, acc, conf = binned_reliability(confidence, correct, n_bins)
        filled = count > 0
        rel.plot(conf[filled].numpy(), acc[filled].numpy(), marker="o", linewidth=1, label=name)
    rc.set(xlabel="coverage (most confident answered first)", ylabel="risk (wrong answers among the answered)",
           title=title)
    rc.legend(fontsize=6)
    rel.plot([0, 1], [0, 1], "k--", linewidth=1)
    rel.set(xlabel="confidence p(answer | x)", ylabel="exact-match accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    rel.legend(fontsize=6)
    save_figure(fig, risk_coverage_path)
    save_figure(fig_rel, reliability_path)

