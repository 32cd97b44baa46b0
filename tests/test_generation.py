"""Generative tasks and the generation evaluator against hand computations on a tiny random Llama."""

import json
import math

import pytest
import torch

import bayes_peft as bp
from bayes_peft.data.generative import QA, GenerativeTask, IGNORE_INDEX, load_generative_task, normalize_answer
from bayes_peft.evaluation.generation import GeneratedAnswers, choose_answer, cluster_entropy, token_mutual_information
from conftest import tiny_llama_lora

PAIRS = [("Review: a great film Sentiment:", "positive"), ("Review: the sky is blue Sentiment:", "negative"),
         ("Review: a long film Sentiment:", "positive"), ("Review: it wins Sentiment:", "negative"),
         ("Review: a word Sentiment:", "positive")]


@pytest.fixture
def qa_task():
    examples = [QA(p, a, "easy" if i % 2 else "hard") for i, (p, a) in enumerate(PAIRS)]
    return GenerativeTask("toy", train=examples, test=examples[:3])


def _model(tokenizer):
    return tiny_llama_lora(vocab_size=len(tokenizer)).double()


def _ivon_posterior(model, task, tokenizer, steps=2):
    opt = bp.IVON(model.parameters(), lr=0.05, ess=300.0, hess_init=0.1, clip_radius=0.1,
                  generator=torch.Generator().manual_seed(0))
    for _, batch in zip(range(steps), task.loader(tokenizer, batch_size=2)):
        task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return bp.PosteriorLoRA.from_ivon(model, opt)


def test_the_sft_loss_is_the_cross_entropy_of_the_answer_tokens_alone(qa_task, llama_style_tokenizer):
    tok, model = llama_style_tokenizer, _model(llama_style_tokenizer)
    batch = next(iter(qa_task.loader(tok, batch_size=3, shuffle=False)))
    losses, count = [], 0
    for qa in qa_task.train[:3]:  # one example at a time, unpadded, the prompt's positions skipped by hand
        prompt, answer = qa_task.prompt_ids(tok, qa.prompt), qa_task.answer_ids(tok, qa.answer)
        assert answer[-1] == tok.eos_token_id
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
        for t, token in enumerate(answer):
            losses.append(-torch.log_softmax(logits[len(prompt) + t - 1], -1)[token])
        count += len(answer)
    expected = torch.stack(losses).sum() / count
    torch.testing.assert_close(qa_task.loss(model, batch), expected, rtol=1e-9, atol=1e-9)
    assert (batch["labels"] != IGNORE_INDEX).sum() == count


def test_generation_and_its_bayesian_confidence_equal_a_decoding_by_hand(qa_task, llama_style_tokenizer):
    """Under each of S seeded IVON samples: greedy decoding one position at a time without a cache gives the
    same answers as the batched, left-padded, cached decoding; the confidence of the chosen answer is the mean
    over the samples of the product of its token probabilities, each computed by hand; the weights are as
    they were; and the same seed gives the same answers."""
    tok, model = llama_style_tokenizer, _model(llama_style_tokenizer)
    posterior = _ivon_posterior(model, qa_task, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ev = bp.Evaluator(model, posterior, tokenizer=tok, progress=False)
    loader = qa_task.prompt_loader(tok, "test", batch_size=2)
    out = ev.generate(loader, method="sample", n_samples=3, tau=1.0, max_new_tokens=4, seed=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The draws disagree (several clusters a prompt, ties broken by probability), so the check below is not trivial.
    assert all(len({normalize_answer(a) for a in drawn}) > 1 for drawn in out.sample_answers)
    assert (out.mutual_information > 0).all()

    prompts = [qa_task.prompt_ids(tok, qa.prompt) for qa in qa_task.test]
    generator, by_hand = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for _ in range(3):
            with posterior.sample(tau=1.0, generator=generator):
                answers = []
                for prompt in prompts:
                    ids = []
                    while len(ids) < 4 and (not ids or ids[-1] != tok.eos_token_id):
                        ids.append(int(model(input_ids=torch.tensor([prompt + ids])).logits[0, -1].argmax()))
                    answers.append(ids)
                by_hand.append(answers)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    for i, prompt in enumerate(prompts):
        assert out.sample_answers[i] == [decode(by_hand[s][i]) for s in range(3)]
        clusters = {}
        for s in range(3):
            clusters.setdefault(normalize_answer(decode(by_hand[s][i])), by_hand[s][i] or [tok.eos_token_id])
        probability = {}
        for cluster, ids in clusters.items():
            total, generator = 0.0, torch.Generator().manual_seed(0)
            with torch.no_grad():
                for _ in range(3):
                    with posterior.sample(tau=1.0, generator=generator):
                        product = 1.0
                        for t, token in enumerate(ids):
                            logits = model(input_ids=torch.tensor([prompt + ids[:t]])).logits[0, -1]
                            product *= float(torch.softmax(logits, -1)[token])
                    total += product
            probability[cluster] = total / 3
        chosen = choose_answer(out.sample_answers[i], probability)
        assert out.answers[i] == chosen
        assert out.confidence[i].item() == pytest.approx(probability[normalize_answer(chosen)], rel=1e-6)
        assert out.answer_entropy[i].item() == pytest.approx(cluster_entropy(out.sample_answers[i]))
    again = ev.generate(loader, method="sample", n_samples=3, tau=1.0, max_new_tokens=4, seed=0)
    assert again.answers == out.answers and torch.equal(again.confidence, out.confidence)


def test_at_the_mean_one_answer_its_sequence_probability_and_no_spread(qa_task, llama_style_tokenizer):
    tok, model = llama_style_tokenizer, _model(llama_style_tokenizer)
    posterior = _ivon_posterior(model, qa_task, tok)
    out = bp.Evaluator(model, posterior, tokenizer=tok, progress=False).generate(
        qa_task.prompt_loader(tok, "test"), method="mean", max_new_tokens=3)
    assert all(len(s) == 1 for s in out.sample_answers)
    assert out.answer_entropy.abs().max() == 0 and out.mutual_information.abs().max() < 1e-12
    assert ((out.confidence > 0) & (out.confidence <= 1)).all()
    with pytest.raises(ValueError, match="tokenizer"):
        bp.Evaluator(model, posterior, progress=False).generate(qa_task.prompt_loader(tok, "test"))


def test_answer_entropy_mutual_information_and_choice_equal_hand_values():
    # Clusters {1234: 2, 99: 1, x: 1}: −(½ ln ½ + 2 · ¼ ln ¼) = ½ ln 2 + ½ ln 4.
    assert cluster_entropy(["1,234", "1234.", "99", "X"]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4))
    assert cluster_entropy(["7", " 7 "]) == 0
    # Two draws, two positions, two tokens: at t = 0 they disagree (0.9/0.1 against 0.1/0.9), at t = 1 they agree.
    probs = torch.tensor([[[[0.9, 0.1], [0.5, 0.5]]], [[[0.1, 0.9], [0.5, 0.5]]]], dtype=torch.float64)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    expected = math.log(2) - h
    assert token_mutual_information(probs.log(), torch.tensor([[True, True]])).item() == pytest.approx(expected)
    assert token_mutual_information(probs.log(), torch.tensor([[False, True]])).item() == pytest.approx(0.0, abs=1e-12)
    assert choose_answer(["a", "a", "b"], {"b": 0.9}) == "a"
    assert choose_answer(["a", "B"], {"a": 0.2, "b": 0.7}) == "B"
    assert normalize_answer(" -1,234. ") == "-1234" and normalize_answer("\u22125") == "-5"


def test_the_metrics_of_generated_answers_equal_hand_values():
    out = GeneratedAnswers(answers=["1", "2", "3", "4"], confidence=torch.tensor([0.9, 0.8, 0.3, 0.6]),
                           answer_entropy=torch.tensor([0.0, 0.1, 1.0, 0.5]),
                           mutual_information=torch.tensor([0.0, 0.2, 0.1, 0.9]),
                           sample_answers=[["1"], ["2"], ["3"], ["4"]], references=["1", "2", "0", "0"],
                           levels=["easy", "easy", "hard", "hard"])
    metrics = out.metrics(n_bins=10)
    assert metrics["acc"] == 0.5
    assert metrics["brier"] == pytest.approx((0.1 ** 2 + 0.2 ** 2 + 0.3 ** 2 + 0.6 ** 2) / 4)
    assert metrics["ece"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.6) / 4)  # one example a bin
    # The wrong answers have confidence 0.3 and 0.6, the right ones 0.9 and 0.8: 1 − confidence ranks them all.
    assert metrics["auroc (1 - confidence)"] == 1.0 and metrics["auroc (mutual information)"] == 0.75
    assert metrics["aurc (1 - confidence)"] == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)
    assert out.subset("hard").metrics()["acc"] == 0.0


def test_the_arithmetic_task_splits_by_seed_and_keeps_hard_as_a_shift():
    task = bp.load_task("arithmetic", val_split=0.2, seed=0)
    assert isinstance(task, GenerativeTask)
    assert (len(task.train), len(task.validation), len(task.test), len(task.shifts["hard"])) == (1280, 320, 400, 1000)
    prompts = [{qa.prompt for qa in split} for split in (task.train, task.validation, task.test)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert {qa.level for qa in task.train + task.test} == {"easy", "medium"}
    assert {qa.level for qa in task.shifts["hard"]} == {"hard"}
    assert task.test == bp.load_task("arithmetic", val_split=0.2, seed=0).test
    assert task.test != bp.load_task("arithmetic", val_split=0.2, seed=1).test
    first = next(qa for qa in task.train + task.test + task.validation if qa.prompt == "Calculate 5 + 91 =")
    assert first.answer == "96"  # the answer text of its answerKey
    small = task.subset(n_train=8, n_test=5, seed=0)
    assert (len(small.train), len(small.test), len(small.shifts["hard"])) == (8, 5, 5)


def test_a_users_prompt_and_answer_files(tmp_path):
    rows = [{"prompt": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(10)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = bp.load_task("qa", data_files={"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"},
                        val_split=0.2)
    assert (len(task.train), len(task.validation), len(task.test)) == (8, 2, 10)
    assert task.test[3] == QA("What is 3 plus one?", "4", "")
    with pytest.raises(ValueError, match="data_files"):
        bp.load_task("qa")
    with pytest.raises(ValueError, match="row 0.*answer"):
        load_generative_task("qa", data_files={"train": [{"prompt": "x"}], "test": [{"prompt": "y", "answer": "1"}]})


@pytest.mark.parametrize("backend", ["laplace", "swag", "mc_dropout", "ensemble"])
def test_every_posterior_trains_on_the_sft_loss_and_generates(qa_task, llama_style_tokenizer, backend):
    """Laplace (the Monte Carlo Fisher of the LM loss, predicting with weight samples), SWAG collecting from an
    AdamW run, MC dropout and a LoRA ensemble all answer with a confidence, and leave the weights as they were."""
    from bayes_peft.laplace import fit_laplace
    from bayes_peft.posteriors.ensemble import Ensemble
    from bayes_peft.posteriors.posterior_lora import MCDropout
    from bayes_peft.posteriors.swag import SWAGCollector

    tok = llama_style_tokenizer
    model = tiny_llama_lora(vocab_size=len(tok), lora_dropout=0.3 if backend == "mc_dropout" else 0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    collector = SWAGCollector(model, max_rank=2, start=1) if backend == "swag" else None
    snapshots = []
    for _, batch in zip(range(4), qa_task.loader(tok, batch_size=2)):
        qa_task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        if collector is not None:
            collector.step()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    if backend == "laplace":
        posterior = fit_laplace(model, qa_task.loader(tok, batch_size=2, shuffle=False), n_kfac=4, prior="evidence",
                                fisher="mc", generator=torch.Generator().manual_seed(0), progress=False)
        assert posterior.n_examples == len(qa_task.train) and posterior.log_likelihood < 0
    elif backend == "swag":
        posterior = collector.posterior()
    elif backend == "mc_dropout":
        posterior = MCDropout(model)
    else:
        posterior = Ensemble(model, snapshots[-2:], kind="checkpoint")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = bp.Evaluator(model, posterior, tokenizer=tok, progress=False).generate(
        qa_task.prompt_loader(tok, "test"), method="sample", n_samples=2, max_new_tokens=3)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(out.answers) == len(qa_task.test) and all(len(s) == 2 for s in out.sample_answers)
    assert ((out.confidence > 0) & (out.confidence <= 1)).all() and (out.mutual_information >= 0).all()


def test_temperature_scaling_of_answers_fits_the_validation_nll_and_rescales_the_confidence(qa_task,
                                                                                            llama_style_tokenizer):
    from bayes_peft.evaluation.generation import fit_answer_temperature

    tok, model = llama_style_tokenizer, _model(llama_style_tokenizer)
    loader = list(qa_task.loader(tok, batch_size=2, shuffle=False))
    temperature = fit_answer_temperature(model, loader)

    def nll(t):  # the summed token NLL of the reference answers at temperature t, one example at a time by hand
        total = 0.0
        for qa in qa_task.train:
            prompt, answer = qa_task.prompt_ids(tok, qa.prompt), qa_task.answer_ids(tok, qa.answer)
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0] / t
            total -= sum(float(torch.log_softmax(logits[len(prompt) + i - 1], -1)[a]) for i, a in enumerate(answer))
        return total

    with torch.no_grad():
        assert nll(temperature) <= min(nll(temperature * 0.9), nll(temperature * 1.1))
        ev = bp.Evaluator(model, None, tokenizer=tok, progress=False)
        plain = ev.generate(qa_task.prompt_loader(tok, "test"), max_new_tokens=3)
        scaled = ev.generate(qa_task.prompt_loader(tok, "test"), max_new_tokens=3, temperature=temperature)
    assert plain.answers == scaled.answers and not torch.allclose(plain.confidence, scaled.confidence)


def test_generation_tables_give_mean_se_over_seeds_and_paired_differences():
    from bayes_peft.experiments.tables import generation_summary, generation_tables

    def result(acc, ece):
        metrics = {"acc": acc, "ece": ece, "brier": 0.2, "auroc (1 - confidence)": 0.7, "aurc (1 - confidence)": 0.1,
                   "auroc (mutual information)": 0.6}
        return {"test": metrics, "shifts": {"hard": metrics}, "seconds": 10.0}

    saved = {"seeds": {"0": {"Temperature scaling": result(0.5, 0.1), "IVON": result(0.6, 0.05)},
                       "1": {"Temperature scaling": result(0.7, 0.1), "IVON": result(0.7, 0.07)}}}
    text = generation_tables(saved)
    assert "| IVON | 0.650 ± 0.050 | 6.0 ± 1.0 |" in text  # EM mean ± SE, ECE×100
    assert "shift: hard" in text and "paired differences to Temperature scaling" in text
    assert "| IVON | 0.050 ± 0.050 | -4.0 ± 1.0 |" in text
    summary = generation_summary({"seeds": {**saved["seeds"], "1": {**saved["seeds"]["1"],
                                                                     "IVON": {**result(0.7, 0.07), "seconds": 14.0}}}})
    assert summary.splitlines()[0] == ("| method | EM | ECE×100 | AUROC | AURC | hard: EM | hard: ECE×100 | hard: AUROC "
                                       "| seconds |")
    assert ("| IVON | 0.650 ± 0.050 | 6.0 ± 1.0 | 0.700 ± 0.000 | 0.100 ± 0.000 | 0.650 ± 0.050 | 6.0 ± 1.0 "
            "| 0.700 ± 0.000 | 12 ± 2 |") in summary
    # On a shift where one seed's answers were all wrong its AUROC is undefined: the others' mean, and how many.
    nan_seed = {**saved["seeds"]["1"], "IVON": {**result(0.7, 0.07), "shifts": {"hard": {**result(0.0, 0.2)["test"],
                                                                                         "auroc (1 - confidence)": math.nan}}}}
    summary = generation_summary({"seeds": {**saved["seeds"], "1": nan_seed, "2": saved["seeds"]["0"]}})
    row = next(line for line in summary.splitlines() if line.startswith("| IVON |"))
    assert row.split(" | ")[7] == "0.700 ± 0.000 (2 of 3)" and row.split(" | ")[5] == "0.400 ± 0.200"
    assert "–" in generation_tables({"seeds": {"1": nan_seed}}).split("shift: hard")[1].split("| IVON |")[1]


def test_nq_open_counts_every_listed_answer_as_right():
    task = bp.load_task("nq_open", val_split=0.2, seed=0)
    assert (len(task.train), len(task.validation), len(task.test), task.shifts) == (2310, 578, 722, {})
    moon = load_generative_task("nq_open", data_files={
        "train": [{"question": "when was the last time anyone was on the moon",
                   "answer": ["14 December 1972 UTC", "December 1972"]}], "test": [{"prompt": "x", "answer": "y"}]})
    qa = moon.train[0]
    assert (qa.prompt, qa.answer, qa.aliases) == ("when was the last time anyone was on the moon?",
                                                  "14 December 1972 UTC", ("December 1972",))
    out = GeneratedAnswers(answers=["december 1972", "1969"], confidence=torch.tensor([0.5, 0.5]),
                           answer_entropy=torch.zeros(2), mutual_information=torch.zeros(2),
                           sample_answers=[["december 1972"], ["1969"]],
                           references=[(qa.answer, *qa.aliases), "1970"], levels=["", ""])
    assert out.correct.tolist() == [True, False]



def test_the_answer_validation_prior_minimises_the_reference_answers_nll_computed_by_hand(qa_task,
                                                                                          llama_style_tokenizer):
    """reference_answer_nll is −mean log(1/S Σ_s Π_t p(a_t | x, a_<t, θ_s)) with every token probability taken
    one position at a time by hand under the same seeded Laplace samples, and answer_validation_prior returns
    the grid's λ of the lowest such NLL; the generation preset's Laplace row asks for it."""
    from bayes_peft.config import preset_config
    from bayes_peft.evaluation.generation import answer_validation_prior, reference_answer_nll
    from bayes_peft.laplace import fit_laplace

    tok, model = llama_style_tokenizer, _model(llama_style_tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _, batch in zip(range(4), qa_task.loader(tok, batch_size=2)):
        qa_task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    batches = list(qa_task.loader(tok, batch_size=2, shuffle=False))
    fit = fit_laplace(model, batches, n_kfac=4, prior=1.0, fisher="mc", generator=torch.Generator().manual_seed(0),
                      progress=False)

    def by_hand(lam: float, n_samples: int = 3) -> float:
        posterior, generator = fit.with_prior_precision(dict.fromkeys(fit.prior_precision, lam)), torch.Generator()
        generator.manual_seed(0)
        probability = torch.zeros(len(qa_task.train), dtype=torch.float64)
        with torch.no_grad():
            for _ in range(n_samples):
                with posterior.sample(tau=1.0, generator=generator):
                    for n, qa in enumerate(qa_task.train):
                        prompt, answer = qa_task.prompt_ids(tok, qa.prompt), qa_task.answer_ids(tok, qa.answer)
                        product = 1.0
                        for t, token in enumerate(answer):
                            logits = model(input_ids=torch.tensor([prompt + answer[:t]])).logits[0, -1]
                            product *= float(torch.softmax(logits, -1)[token])
                        probability[n] += product / n_samples
        return float(-probability.log().mean())

    grid = (3.0, 30.0, 3e3)
    hand = {lam: by_hand(lam) for lam in grid}
    assert len({round(v, 6) for v in hand.values()}) == 3  # the grid's NLLs differ: the choice below means something
    for lam in grid:
        posterior = fit.with_prior_precision(dict.fromkeys(fit.prior_precision, lam))

        def draws(posterior=posterior):
            generator = torch.Generator().manual_seed(0)
            return (posterior.sample(tau=1.0, generator=generator) for _ in range(3))
        assert reference_answer_nll(model, draws, batches) == pytest.approx(hand[lam], rel=1e-9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert answer_validation_prior(fit, model, batches, n_samples=3, seed=0, grid=grid) == min(hand, key=hand.get)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert preset_config("generation").laplace.prior == "validation"
