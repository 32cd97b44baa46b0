"""Ensembles: the predictive is the average of the members' probabilities, the snapshots are the weights
at the epochs' ends, and a saved ensemble loads again, also in a fresh process."""

import pytest
import torch

from bayes_peft.posteriors.ensemble import Ensemble, EpochSnapshots
from bayes_peft.evaluation.evaluator import Evaluator
from bayes_peft.posteriors.gaussian import PosteriorFileError
from bayes_peft.posteriors.posterior_lora import PosteriorLoRA
from conftest import choice_logits_of, load_in_fresh_process, tiny_llama_lora


def _members(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{name: p.detach() + 0.3 * torch.randn(p.shape, generator=g) for name, p in model.named_parameters()
             if p.requires_grad} for _ in range(n)]


def test_an_ensembles_probabilities_are_the_average_of_its_members(sst_like, gpt2_style_tokenizer):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer)).eval()
    members = _members(model, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = list(sst_like.loader(gpt2_style_tokenizer, "test", batch_size=3, shuffle=False))
    prediction = Evaluator(model, Ensemble(model, members), sst_like, progress=False).predict(loader, "sample",
                                                                                                n_samples=10)
    # The oracle: each member's probabilities through functional_call, averaged by hand.
    expected = torch.cat([torch.stack([torch.softmax(choice_logits_of(model, b)(m), -1) for m in members]).mean(0)
                          for b in loader])
    torch.testing.assert_close(prediction.probs, expected.detach(), rtol=1e-5, atol=1e-6)
    assert prediction.sample_probs.shape[0] == 3  # each member once, whatever n_samples says
    assert (prediction.sample_probs[0] - prediction.sample_probs[1]).abs().max() > 1e-3  # the members differ
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the weights came back


def test_bad_ensembles_and_a_mean_prediction_are_refused(llama_lora):
    members = _members(llama_lora, 2)
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble(llama_lora, [])
    with pytest.raises(ValueError, match="member 1 does not hold"):
        Ensemble(llama_lora, [members[0], {k: v for k, v in list(members[1].items())[1:]}])
    with pytest.raises(ValueError, match="shape"):
        Ensemble(llama_lora, [{k: v[..., :1] for k, v in members[0].items()}])
    with pytest.raises(ValueError, match="no single weights"):
        Ensemble(llama_lora, members).mean()


def test_a_saved_ensemble_loads_again_also_in_a_fresh_process(tmp_path):
    model = tiny_llama_lora(vocab_size=64)
    ensemble = Ensemble(model, _members(model, 3), kind="checkpoint")
    ensemble.save(tmp_path / "ens")
    loaded = PosteriorLoRA.load(tmp_path / "ens", tiny_llama_lora(vocab_size=64))
    assert isinstance(loaded, Ensemble) and loaded.kind == "checkpoint" and len(loaded) == 3
    for ours, theirs in zip(ensemble.members, loaded.members):
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    total = sum(float(w.double().sum()) for m in ensemble.members for w in m.values())
    report = load_in_fresh_process(tmp_path / "ens", "type(p).__name__, len(p), "
                                   "repr(sum(float(w.double().sum()) for m in p.members for w in m.values()))")
    assert report == f"Ensemble 3 {total!r}"
    (tmp_path / "ens" / "ensemble.safetensors").write_bytes(b"truncated")
    with pytest.raises(PosteriorFileError, match="corrupt"):
        Ensemble.load(tmp_path / "ens", model)
    with pytest.raises(PosteriorFileError, match="no saved ensemble"):
        Ensemble.load(tmp_path / "elsewhere", model)


def test_snapshots_keep_the_weights_at_the_ends_of_the_last_epochs_and_resume(llama_lora):
    params = [p for p in llama_lora.parameters() if p.requires_grad]
    snapshots = EpochSnapshots(llama_lora, every=2, keep=2)
    seen = {}
    for step in range(1, 8):
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * step)
        snapshots.step()
        seen[step] = {n: p.detach().clone() for n, p in llama_lora.named_parameters() if p.requires_grad}
    assert [s for s, _ in snapshots.kept] == [4, 6]
    ensemble = snapshots.ensemble()
    for member, step in zip(ensemble.members, (4, 6)):
        assert all(torch.equal(member[n], seen[step][n]) for n in member)
    resumed = EpochSnapshots(llama_lora, every=2, keep=2)
    resumed.load_state_dict(snapshots.state_dict())
    assert resumed.steps == 7 and [s for s, _ in resumed.kept] == [4, 6]
    with pytest.raises(ValueError, match="saved snapshots had"):
        EpochSnapshots(llama_lora, every=3, keep=2).load_state_dict(snapshots.state_dict())
    short = EpochSnapshots(llama_lora, every=20, keep=2)
    short.step()
    with pytest.raises(ValueError, match="no epoch ended"):
        short.ensemble()
    short.keep_if_none()  # a run shorter than an epoch: its last weights, once
    short.keep_if_none()
    assert [s for s, _ in short.kept] == [1] and all(torch.equal(short.ensemble().members[0][n], w)
                                                      for n, w in seen[7].items())
