"""bp.IVON through the Hugging Face Trainer: checkpoints at the mean, with the posterior, and exact resume."""

import pytest
import torch
from safetensors.torch import load_file

import bayes_peft as bp
from bayes_peft.integrations import Trainer
from conftest import tiny_llama_lora


def _dataset(n=12, length=10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def _trainer(out, max_steps=6, max_grad_norm=0.0, save_steps=3):
    from transformers import TrainingArguments

    model = tiny_llama_lora()
    opt = bp.IVON(model.parameters(), lr=0.05, ess=1e3, hess_init=0.01, clip_radius=0.1,
                  generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                             save_strategy="steps", save_steps=save_steps, logging_steps=1, report_to=[], use_cpu=True,
                             seed=0, data_seed=0, max_grad_norm=max_grad_norm, lr_scheduler_type="constant",
                             learning_rate=0.05, gradient_accumulation_steps=1, disable_tqdm=True,
                             save_only_model=False, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=_dataset(), optimizers=(opt, None)), model, opt


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoints_are_at_the_mean_and_resume_is_exact(tmp_path):
    trainer, model, opt = _trainer(tmp_path / "full")
    trainer.train()
    with opt.mean_params():
        final = _lora(model)

    checkpoint = tmp_path / "full" / "checkpoint-3"
    adapter = load_file(str(checkpoint / "adapter_model.safetensors"))
    posterior = load_file(str(checkpoint / "posterior.safetensors"))
    assert (checkpoint / "optimizer.pt").exists()
    means = {k.removeprefix("mean."): v for k, v in posterior.items() if k.startswith("mean.")}
    for name, value in adapter.items():
        match = [m for n, m in means.items() if n.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0], value)  # the adapter holds the posterior mean

    resumed, model2, opt2 = _trainer(tmp_path / "full")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    with opt2.mean_params():
        again = _lora(model2)
    assert opt2.state_dict()["bayes_peft"]["current_step"] == 6
    assert all(torch.equal(again[n], final[n]) for n in final)
    assert any(not torch.equal(final[n], v) for n, v in _lora(tiny_llama_lora()).items())  # it trained


def test_gradient_clipping_is_turned_off_for_ivon_with_a_warning(tmp_path):
    """Clipping would rescale the gradient IVON reads (its step and its Hessian): the run must equal an
    unclipped one. A threshold of 1e-3 clips every step of this model, so the test fails without the fix."""
    unclipped, model, opt = _trainer(tmp_path / "a", max_steps=3, save_steps=100)
    unclipped.train()
    clipped, model2, opt2 = _trainer(tmp_path / "b", max_steps=3, max_grad_norm=1e-3, save_steps=100)
    with pytest.warns(UserWarning, match="gradient clipping is turned off"):
        clipped.train()
    assert clipped.args.max_grad_norm == 0
    with opt.mean_params(), opt2.mean_params():
        assert all(torch.equal(a, b) for a, b in zip(_lora(model).values(), _lora(model2).values()))
    assert opt2.state_dict()["bayes_peft"]["current_step"] == 3


def test_the_trainer_gives_ivon_its_datasets_length(tmp_path):
    """``optimizer_cls_and_kwargs=(bp.IVON, {...})``: the automatic rule with n_data = the training set's
    length; hand-set values pass through unchanged."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, max_grad_norm=0.0)
    trainer = Trainer(model=tiny_llama_lora(), args=args, train_dataset=_dataset(n=12),
                      optimizer_cls_and_kwargs=(bp.IVON, {"lr": 0.03}))
    opt = trainer.create_optimizer()
    assert isinstance(opt, bp.IVON) and opt.settings.automatic and opt.settings.n_data == 12
    assert opt.settings.prior == "init"  # not the Trainer's weight_decay = 0 groups
    hand_set = Trainer(model=tiny_llama_lora(), args=args, train_dataset=_dataset(n=12),
                       optimizer_cls_and_kwargs=(bp.IVON, {"lr": 0.03, "ess": 1e4})).create_optimizer()
    assert not hand_set.settings.automatic and hand_set.settings.ess == 1e4
