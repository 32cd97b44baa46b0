"""bayes_peft.IVON against the reference package ivon-opt, and the drop-in promises it makes beyond it."""

import io
import math

import ivon
import pytest
import torch
import torch.nn.functional as F

import bayes_peft as bp
from bayes_peft.ivon.devices import DeviceLayout, Segment, split_by_device
from conftest import tiny_llama_lora

HP = dict(lr=0.05, ess=100.0, hess_init=0.1, beta1=0.9, beta2=0.999, weight_decay=1e-3, clip_radius=1.0)
X = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))


def mlp(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = slice(t % 4 * 16, t % 4 * 16 + 16)
    return X[rows], Y[rows]


def loss_at(model, t):
    x, y = batch(t)
    return F.cross_entropy(model(x), y)


def drop_in_loop(model, opt, steps, start=0):
    for t in range(start, steps):
        loss_at(model, t).backward()
        opt.step()
        opt.zero_grad()


def raw_ivon_run(steps, mc_samples=1, seed=7, **overrides):
    """The reference: ivon-opt's own sampled_params(train=True) loop, noise from torch's global RNG."""
    model = mlp()
    torch.manual_seed(seed)
    opt = ivon.IVON(model.parameters(), rescale_lr=False, **{**HP, **overrides})
    for t in range(steps):
        for _ in range(mc_samples):
            with opt.sampled_params(train=True):
                loss_at(model, t).backward()
            opt.zero_grad()
        opt.step()
    return model, opt


def assert_same_posterior(model, opt, ref_model, ref_opt, atol=1e-6):
    with opt.mean_params():
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, atol=atol, rtol=0)
    for g, h in zip(opt.param_groups, ref_opt.param_groups):
        torch.testing.assert_close(g["hess"], h["hess"], atol=atol, rtol=0)
        torch.testing.assert_close(g["momentum"], h["momentum"], atol=atol, rtol=0)


# ---------------------------------------------------------------- (a) trajectory equivalence


@pytest.mark.parametrize("n_data", [None, 999], ids=["ess", "ess+n_data"])
def test_drop_in_loop_follows_ivon_opt_trajectory(n_data):
    """Hand-set values are ivon-opt's rule, n_data given beside them or not."""
    ref_model, ref_opt = raw_ivon_run(50)
    model = mlp()
    opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(7), n_data=n_data, **HP)
    assert not opt.settings.automatic and opt.settings.ess == HP["ess"]
    drop_in_loop(model, opt, 50)
    assert_same_posterior(model, opt, ref_model, ref_opt)
    # the comparison is not vacuous: the posterior moved away from its start
    assert (ref_opt.param_groups[0]["hess"] - HP["hess_init"]).abs().max() > 1e-3
    assert (ref_model[0].weight - mlp()[0].weight).abs().max() > 1e-2


def test_ivon_opt_style_loop_runs_unchanged_and_matches():
    ref_model, ref_opt = raw_ivon_run(30)
    model = mlp()
    opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(7), **HP)
    for t in range(30):
        with opt.sampled_params(train=True):
            loss_at(model, t).backward()
        opt.zero_grad()
        opt.step()
    assert_same_posterior(model, opt, ref_model, ref_opt)
    # explicit style: the weights rest at the mean between steps, as in ivon-opt
    for p, m in zip(model.parameters(), opt.posterior_mean()):
        assert torch.equal(p, m)


def test_closure_draws_a_fresh_sample_for_each_mc_sample():
    ref_model, ref_opt = raw_ivon_run(20, mc_samples=3)
    model = mlp()
    opt = bp.IVON(model.parameters(), mc_samples=3, generator=torch.Generator().manual_seed(7), **HP)
    for t in range(20):
        opt.step(lambda: loss_at(model, t).backward())
    assert_same_posterior(model, opt, ref_model, ref_opt)


def test_closure_returns_the_mean_loss_over_samples():
    model = mlp()
    opt = bp.IVON(model.parameters(), mc_samples=4, generator=torch.Generator().manual_seed(0), **HP)
    seen = []

    def closure():
        loss = loss_at(model, 0)
        loss.backward()
        seen.append(loss.detach())
        return loss

    out = opt.step(closure)
    assert len(seen) == 4 and len({float(s) for s in seen}) == 4  # four different samples
    torch.testing.assert_close(out, torch.stack(seen).mean())


# ---------------------------------------------------------------- (b) the swap itself


def test_swap_trains_peft_llama_through_the_adamw_loop():
    model = tiny_llama_lora()
    ids = torch.randint(0, 64, (64, 8), generator=torch.Generator().manual_seed(0))
    labels = torch.where(ids[:, 0] % 2 == 0, 3, 5)

    def loss_fn(rows):
        return F.cross_entropy(model(input_ids=ids[rows]).logits[:, -1], labels[rows])

    # was: opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = bp.IVON(model.parameters(), lr=0.1, ess=1e4, hess_init=1e-2, clip_radius=0.1,
                  generator=torch.Generator().manual_seed(0))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable  # the frozen base is left out

    with torch.no_grad(), opt.mean_params():
        before = loss_fn(slice(None)).item()
    for step in range(60):
        rows = slice(step % 4 * 16, step % 4 * 16 + 16)
        loss = loss_fn(rows)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad(), opt.mean_params():
        after = loss_fn(slice(None)).item()
    assert after < before - 0.3, (before, after)


# ---------------------------------------------------------------- (c) exact resume


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# IVON's automatic rules: the posterior under a given prior (h averaged over the run), and the initialisation's scale
PRIOR_GIVEN = dict(lr=0.05, n_data=64, weight_decay=1e-3, clip_radius=1.0)
INIT_SCALE = dict(lr=0.05, clip_radius=1.0)


@pytest.mark.parametrize("hp", [HP, PRIOR_GIVEN, INIT_SCALE], ids=["hand-set", "prior-given", "init-scale"])
@pytest.mark.parametrize("style", ["drop_in", "closure"])
def test_resume_at_step_20_is_bit_identical(style, hp):
    def train(model, opt, start, stop):
        for t in range(start, stop):
            if style == "drop_in":
                drop_in_loop(model, opt, t + 1, start=t)
            else:
                opt.step(lambda: loss_at(model, t).backward())

    mc = 1 if style == "drop_in" else 2
    model = mlp()
    opt = bp.IVON(model.parameters(), mc_samples=mc, generator=torch.Generator().manual_seed(3), **hp)
    train(model, opt, 0, 40)

    model_a = mlp()
    opt_a = bp.IVON(model_a.parameters(), mc_samples=mc, generator=torch.Generator().manual_seed(3), **hp)
    train(model_a, opt_a, 0, 20)
    saved_model, saved_opt = _roundtrip(model_a.state_dict()), _roundtrip(opt_a.state_dict())

    model_b = mlp(seed=99)  # different initial weights and a different generator: all must be restored
    opt_b = bp.IVON(model_b.parameters(), mc_samples=mc, generator=torch.Generator().manual_seed(12345), **hp)
    model_b.load_state_dict(saved_model)
    opt_b.load_state_dict(saved_opt)
    assert opt_b.current_step == 20
    train(model_b, opt_b, 20, 40)

    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for g, h in zip(opt.param_groups, opt_b.param_groups):
        assert torch.equal(g["hess"], h["hess"]) and torch.equal(g["momentum"], h["momentum"])


def test_a_state_dict_saved_with_one_generator_still_resumes():
    """State dicts of IVON before parameters on several devices kept ``"generator"``, one state, not ``"generators"``."""
    model = mlp()
    opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(3), **HP)
    drop_in_loop(model, opt, 3)
    state = opt.state_dict()
    extra = state["bayes_peft"]
    extra["generator"] = extra.pop("generators")["cpu"]
    again = bp.IVON(mlp().parameters(), generator=torch.Generator().manual_seed(7), **HP)
    again.load_state_dict(state)
    assert torch.equal(again.generator.get_state(), opt.generator.get_state())


def test_load_state_dict_rejects_a_mismatched_model():
    opt = bp.IVON(mlp().parameters(), **HP)
    other = bp.IVON(torch.nn.Linear(4, 2).parameters(), **HP)
    with pytest.raises(ValueError, match="groups of"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not a bayes_peft.IVON state dict"):
        other.load_state_dict(torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=1).state_dict())


# ---------------------------------------------------------------- (d) exception safety


class Boom(Exception):
    pass


def _explicit_opt():
    model = mlp()
    opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(0), **HP)
    with opt.sampled_params(train=True):  # switch to the explicit style: the weights rest at the mean
        loss_at(model, 0).backward()
    opt.step()
    opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("context", ["mean", "sample", "sample_tau", "train"])
def test_exception_inside_a_context_leaves_the_mean(context):
    model, opt = _explicit_opt()
    mean = [p.detach().clone() for p in model.parameters()]
    hess = opt.param_groups[0]["hess"].clone()
    ctx = {
        "mean": lambda: opt.mean_params(),
        "sample": lambda: opt.sampled_params(),
        "sample_tau": lambda: opt.sampled_params(tau=0.3, generator=torch.Generator().manual_seed(1)),
        "train": lambda: opt.sampled_params(train=True),
    }[context]
    with pytest.raises(Boom):
        with ctx():
            if context != "mean":
                assert not torch.equal(next(model.parameters()), mean[0])  # a sample is in place
            loss_at(model, 1).backward()
            raise Boom
    for p, m in zip(model.parameters(), mean):
        assert torch.equal(p, m)
    assert torch.equal(opt.param_groups[0]["hess"], hess)
    assert opt._samples is None  # the gradient of a failed context is not recorded


def test_exception_in_drop_in_contexts_returns_to_the_training_sample():
    model = mlp()
    opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(0), **HP)
    drop_in_loop(model, opt, 3)
    at_sample = [p.detach().clone() for p in model.parameters()]
    mean = opt.posterior_mean()
    for ctx in (opt.mean_params, opt.sampled_params):
        with pytest.raises(Boom):
            with ctx():
                raise Boom
        for p, s in zip(model.parameters(), at_sample):
            assert torch.equal(p, s)
    with opt.mean_params():
        for p, m in zip(model.parameters(), mean):
            assert torch.equal(p, m)


def test_exception_in_a_closure_changes_nothing():
    model, opt = _explicit_opt()
    mean = [p.detach().clone() for p in model.parameters()]
    state = [t.clone() for g in opt.param_groups for t in (g["hess"], g["momentum"])]

    def closure():
        loss_at(model, 0).backward()
        raise Boom

    with pytest.raises(Boom):
        opt.step(closure)
    for p, m in zip(model.parameters(), mean):
        assert torch.equal(p, m)
    assert all(torch.equal(a, b) for a, b in zip(state, [t for g in opt.param_groups for t in (g["hess"], g["momentum"])]))


# ---------------------------------------------------------------- (e) tau


def test_tau_zero_is_the_mean_exactly():
    model = mlp()
    opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(0), **HP)
    drop_in_loop(model, opt, 5)
    mean = opt.posterior_mean()
    with opt.sampled_params(tau=0.0):
        for p, m in zip(model.parameters(), mean):
            assert torch.equal(p, m)


@pytest.mark.parametrize("tau", [0.25, 1.0, 2.0])
def test_tau_samples_have_variance_tau_times_v(tau):
    model = mlp()
    opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(0), **HP)
    drop_in_loop(model, opt, 5)
    group = opt.param_groups[0]  # spread the Hessian over two decades, so v differs between elements
    group["hess"] = torch.logspace(-2, 0, group["numel"])[torch.randperm(group["numel"])]
    mean = torch.cat([m.flatten() for m in opt.posterior_mean()])
    var = torch.cat([v.flatten() for v in opt.posterior_variance()])
    assert var.max() / var.min() > 50
    n = 4000
    gen = torch.Generator().manual_seed(1)
    draws = torch.empty(n, mean.numel())
    for i in range(n):
        with opt.sampled_params(tau=tau, generator=gen):
            draws[i] = torch.cat([p.detach().flatten() for p in model.parameters()])
    # per element, the sample variance / (τ v) is chi²(n-1)/(n-1): sd sqrt(2/n) ≈ 0.022
    ratio = draws.var(dim=0) / (tau * var)
    assert (ratio - 1).abs().max() < 6 * math.sqrt(2 / n)
    assert abs(ratio.mean() - 1) < 4 * math.sqrt(2 / n / mean.numel())
    z = (draws.mean(dim=0) - mean) / (tau * var / n).sqrt()
    assert z.abs().max() < 5


def test_posterior_variance_is_one_over_ess_times_hess_plus_delta():
    model = mlp()
    opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(0), **HP)
    drop_in_loop(model, opt, 5)
    expected = 1.0 / (HP["ess"] * (opt.param_groups[0]["hess"] + HP["weight_decay"]))
    got = torch.cat([v.flatten() for v in opt.posterior_variance()])
    torch.testing.assert_close(got, expected)
    assert [v.shape for v in opt.posterior_variance()] == [p.shape for p in model.parameters()]


# ---------------------------------------------------------------- robustness beyond ivon-opt


def test_parameters_without_grad_are_skipped():
    model = mlp()
    unused = torch.nn.Parameter(torch.ones(4))
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    opt = bp.IVON([*model.parameters(), unused, frozen], generator=torch.Generator().manual_seed(0), **HP)
    assert all(p is not frozen for p in opt.param_groups[0]["params"])
    assert torch.equal(frozen, torch.ones(3))  # never sampled
    n_unused = unused.numel()
    hess_before = opt.param_groups[0]["hess"][-n_unused:].clone()
    drop_in_loop(model, opt, 5)
    with opt.mean_params():
        assert torch.equal(unused, torch.ones(4))
    assert torch.equal(opt.param_groups[0]["hess"][-n_unused:], hess_before)
    assert torch.equal(opt.param_groups[0]["momentum"][-n_unused:], torch.zeros(n_unused))
    assert (opt.param_groups[0]["hess"][:-n_unused] != HP["hess_init"]).all()  # the used ones did learn


def test_a_step_without_any_gradient_changes_nothing():
    model = mlp()
    opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(0), **HP)
    at_sample = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.current_step == 0
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), at_sample))


def test_gradient_accumulation_is_one_sample_of_the_summed_loss():
    def run(micro_batches):
        model = mlp()
        opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(5), **HP)
        for t in range(10):
            x, y = batch(t)
            for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
                (F.cross_entropy(model(xs), ys) / micro_batches).backward()
            opt.step()
            opt.zero_grad()
        return opt.posterior_mean()

    for a, b in zip(run(1), run(4)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_low_precision_parameters_get_a_clear_error():
    with pytest.raises(ValueError, match="float32"):
        bp.IVON(torch.nn.Linear(3, 3).to(torch.bfloat16).parameters(), lr=0.1, ess=10)
    with pytest.raises(ValueError, match="no trainable parameters"):
        bp.IVON([torch.nn.Parameter(torch.ones(2), requires_grad=False)], lr=0.1, ess=10)


def test_weights_given_new_storage_before_the_first_step_are_followed():
    """accelerate's preparation may re-materialise the weights after the optimizer is built (``p.data = ...``):
    before the first step IVON starts again on them, exactly as if built on them; after it, it refuses."""
    def run(rematerialise: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = bp.IVON(model.parameters(), lr=0.1, ess=100.0, generator=torch.Generator().manual_seed(1))
        if rematerialise:
            for p in model.parameters():
                p.data = p.data.clone()
        for _ in range(3):
            model(torch.ones(3, 4)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        return opt.posterior_mean()

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))
    model = torch.nn.Linear(4, 2)
    opt = bp.IVON(model.parameters(), lr=0.1, ess=100.0)
    model(torch.ones(3, 4)).sum().backward()
    opt.step()
    model.weight.data = model.weight.data.clone()
    with pytest.raises(RuntimeError, match="replaced or moved after it had started training"):
        opt.step()


def test_a_group_over_several_devices_is_split_into_runs_of_one_device():
    """LoRA weights spread by device_map or CPU offload; the meta device stands in for a second one."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    a, b, c, d = (torch.nn.Parameter(torch.ones(n, device=dev)) for n, dev in ((2, cpu), (3, cpu), (4, meta), (5, cpu)))
    e = torch.nn.Parameter(torch.ones(6))
    groups, layout = split_by_device([{"params": [a, b, c, d], "lr": 0.1}, {"params": [e]}])
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(a), id(b)], [id(c)], [id(d)], [id(e)]]
    assert [g.get("lr") for g in groups] == [0.1, 0.1, 0.1, None]
    assert [(s.group, s.group_numel, s.start, s.numel, s.device) for s in layout.segments] == [
        (0, 14, 0, 5, cpu), (0, 14, 5, 4, meta), (0, 14, 9, 5, cpu), (1, 6, 0, 6, cpu)]
    assert layout.devices == [cpu, meta]
    assert split_by_device([{"params": [a, b]}, {"params": [e]}])[1] is None
    with pytest.raises(ValueError, match="meta device"):
        bp.IVON([a, c], lr=0.1, ess=10)


def test_a_group_split_over_devices_trains_as_the_whole_group(monkeypatch):
    """IVON's path for parameters on several devices (a group cut into segments; each device draws every group's
    whole noise and keeps its segments'; the NaN verdict sent to each; state, resume and test-time samples per
    segment), taken with both segments on the CPU, which has no second device (benchmarks/gpu_check.py's "several
    devices" part runs it over cuda:0 and the CPU): the run must equal the unsplit group's to the bit."""
    from bayes_peft.ivon import optimizer

    def split_after_two(groups):
        params = list(groups[0]["params"])
        numel = sum(p.numel() for p in params)
        head = sum(p.numel() for p in params[:2])
        cpu = torch.device("cpu")
        return ([{**groups[0], "params": params[:2]}, {**groups[0], "params": params[2:]}],
                DeviceLayout([Segment(0, numel, 0, head, cpu), Segment(0, numel, head, numel - head, cpu)]))

    def run(split: bool, interrupt: bool = False):
        model = mlp()
        with monkeypatch.context() as patch:
            if split:
                patch.setattr(optimizer, "split_by_device", split_after_two)
            opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(3), **HP)
            assert len(opt.param_groups) == 1 + split
            drop_in_loop(model, opt, 3)
            if interrupt:
                state = io.BytesIO()
                torch.save(opt.state_dict(), state)
                model = mlp()
                opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(99), **HP)
                opt.load_state_dict(torch.load(io.BytesIO(state.getvalue()), weights_only=False))
            drop_in_loop(model, opt, 6, start=3)
            torch.manual_seed(11)
            with opt.sampled_params(tau=0.5):
                drawn = [p.detach().clone() for p in model.parameters()]
            with opt.sampled_params(generator=torch.Generator().manual_seed(12)):
                drawn += [p.detach().clone() for p in model.parameters()]
        return [*opt.posterior_mean(), *opt.hessian(), *drawn]

    whole = run(False)
    assert all(torch.equal(a, b) for a, b in zip(whole, run(True)))
    assert all(torch.equal(a, b) for a, b in zip(whole, run(True, interrupt=True)))


def test_lr_scheduler_drives_the_learning_rate():
    model = mlp()
    opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(0), **HP)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 3 else 0.0)
    for t in range(3):
        drop_in_loop(model, opt, t + 1, start=t)
        sched.step()
    frozen_mean = opt.posterior_mean()
    for t in range(3, 8):
        drop_in_loop(model, opt, t + 1, start=t)
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    for a, b in zip(frozen_mean, opt.posterior_mean()):
        assert torch.equal(a, b)  # lr 0: the mean stays, though the Hessian keeps learning


def test_global_seed_makes_default_generator_repeatable():
    def run():
        torch.manual_seed(11)
        model = mlp()
        opt = bp.IVON(model.parameters(), **HP)
        drop_in_loop(model, opt, 5)
        return opt.posterior_mean()

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_evaluation_samples_do_not_shift_training_noise():
    def run(evaluate):
        model = mlp()
        opt = bp.IVON(model.parameters(), generator=torch.Generator().manual_seed(2), **HP)
        for t in range(6):
            drop_in_loop(model, opt, t + 1, start=t)
            if evaluate:
                with torch.no_grad(), opt.sampled_params():
                    loss_at(model, 0)
        return opt.posterior_mean()

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_state_dict_inside_a_context_saves_where_training_rests(llama_lora):
    """A checkpoint taken at the mean (as the HF Trainer takes it) must still resume at the training sample."""
    import bayes_peft as bp

    model = llama_lora
    opt = bp.IVON(model.parameters(), lr=0.05, ess=1e3, hess_init=0.01, generator=torch.Generator().manual_seed(0))
    outside = opt.state_dict()["bayes_peft"]["noise"]
    with opt.mean_params():
        inside = opt.state_dict()["bayes_peft"]["noise"]
    with opt.sampled_params(tau=0.5, generator=torch.Generator().manual_seed(1)):
        in_eval = opt.state_dict()["bayes_peft"]["noise"]
    assert outside is not None
    assert all(torch.equal(a, b) for a, b in zip(outside, inside))
    assert all(torch.equal(a, b) for a, b in zip(outside, in_eval))


def _optimizer_tensors(opt):
    state = opt.state_dict()
    extra = state["bayes_peft"]
    groups = [(g["momentum"].clone(), g["hess"].clone()) for g in opt.param_groups]
    return extra["current_step"], [m.clone() for m in extra["mean"]], groups, extra["generators"]["cpu"].clone()


def _same(a, b):
    step_a, mean_a, groups_a, gen_a = a
    step_b, mean_b, groups_b, gen_b = b
    return (step_a == step_b and torch.equal(gen_a, gen_b) and all(torch.equal(x, y) for x, y in zip(mean_a, mean_b))
            and all(torch.equal(x, y) for ga, gb in zip(groups_a, groups_b) for x, y in zip(ga, gb)))


def _after_one_step(model, **options):
    """An IVON over ``model`` after one ordinary step, and the batch it trained on."""
    opt = bp.IVON(model.parameters(), lr=0.05, ess=1e3, hess_init=0.01, generator=torch.Generator().manual_seed(0),
                  **options)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return opt, ids


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_nonfinite_gradient_raises_with_state_unchanged_and_weights_at_mean(llama_lora, poison):
    model = llama_lora
    opt, ids = _after_one_step(model, nonfinite_check_every=1)
    before = _optimizer_tensors(opt)
    loss = model(input_ids=ids, labels=ids).loss
    (loss * float("nan") if poison == "loss" else loss).backward()
    if poison == "grad":
        next(p for p in model.parameters() if p.requires_grad).grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"NaN or inf in 1 step\(s\) up to step 2"):
        opt.step()
    assert _same(_optimizer_tensors(opt), before)
    with opt.mean_params():
        mean = [p.detach().clone() for p in opt.trainable_parameters()]
    assert all(torch.equal(p, m) for p, m in zip(opt.trainable_parameters(), mean))
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="call opt.resample"):
        opt.step()  # a gradient taken at the mean is no IVON sample
    opt.zero_grad()
    opt.resample()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.current_step == 2 and opt.skipped_steps == 1


def _posterior_state(opt):
    return [t.clone() for t in opt._weights.means] + [g[k].clone() for g in opt.param_groups for k in ("momentum", "hess")]


def test_nonfinite_raise_reads_the_device_flag_only_every_few_steps(llama_lora):
    """The NaN step is skipped on the device at once; the error comes at the next check, not before."""
    model = llama_lora
    opt, ids = _after_one_step(model, nonfinite_check_every=3)
    before = _posterior_state(opt)
    (model(input_ids=ids, labels=ids).loss * float("nan")).backward()
    opt.step()  # step 2: skipped, no error yet
    assert all(torch.equal(a, b) for a, b in zip(_posterior_state(opt), before))
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(FloatingPointError, match=r"in 1 step\(s\) up to step 3"):
        opt.step()  # step 3 updates, then the check finds step 2's NaN
    state = _posterior_state(opt)
    assert all(bool(torch.isfinite(t).all()) for t in state)
    assert not all(torch.equal(a, b) for a, b in zip(state, before))  # step 3 did update
    assert opt.current_step == 2 and opt.skipped_steps == 1


def test_nonfinite_reported_by_posterior_mean_when_training_ends_before_a_check(llama_lora):
    import bayes_peft as bp

    model = llama_lora
    opt = bp.IVON(model.parameters(), lr=0.05, ess=1e3, hess_init=0.01, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    (model(input_ids=ids, labels=ids).loss * float("nan")).backward()
    opt.step()
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        opt.posterior_mean()
    assert all(bool(torch.isfinite(m).all()) for m in opt.posterior_mean())  # reported once


def test_nonfinite_skip_keeps_the_posterior(llama_lora):
    import bayes_peft as bp

    model = llama_lora
    opt = bp.IVON(model.parameters(), lr=0.05, ess=1e3, hess_init=0.01, nonfinite="skip",
                  generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    before = _posterior_state(opt)
    (model(input_ids=ids, labels=ids).loss * float("nan")).backward()
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(_posterior_state(opt), before))
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.posterior_mean()  # "skip" never raises
    assert opt.current_step == 2  # the skipped step counts, so that nothing is read from the device
    assert all(bool(torch.isfinite(t).all()) for t in _posterior_state(opt))


def _loaded_weights(model, value):
    return {n: torch.full_like(p, value) for n, p in model.state_dict().items()}


@pytest.mark.parametrize("write", ["load_state_dict", "copy_"])
def test_weights_written_into_a_sample_are_refused_not_lost(write):
    """A write after the optimizer was built used to be overwritten by the stored mean at the next step,
    and posterior_mean() returned the stale mean. Now every path that would lose it raises."""
    model = mlp()
    opt = bp.IVON(model.parameters(), **HP, generator=torch.Generator().manual_seed(0))
    if write == "load_state_dict":
        model.load_state_dict(_loaded_weights(model, 5.0))
    else:
        with torch.no_grad():
            model[0].weight.copy_(torch.full_like(model[0].weight, 5.0))
    loss_at(model, 0).backward()
    for touch in (opt.step, opt.posterior_mean, opt.state_dict, lambda: opt.mean_params().__enter__()):
        with pytest.raises(RuntimeError, match=r"written after IVON put a posterior sample.*mean_params"):
            touch()
    assert (model[0].weight == 5.0).all()  # and nothing was overwritten on the way


def test_weights_written_at_the_mean_become_the_mean():
    model = mlp()
    opt = bp.IVON(model.parameters(), **HP, generator=torch.Generator().manual_seed(0))
    with opt.mean_params():
        model.load_state_dict(_loaded_weights(model, 5.0))
    assert all((m == 5.0).all() for m in opt.posterior_mean())
    assert all(torch.equal(m, w) for m, w in zip(opt.posterior_mean(), _loaded_weights(model, 5.0).values()))
    drop_in_loop(model, opt, 3)
    moved = [(m - 5.0).abs().max().item() for m in opt.posterior_mean()]
    assert 0 < max(moved) <= 3 * HP["lr"] * HP["clip_radius"] + 1e-5  # three clipped steps from the loaded mean


def test_rewriting_the_same_values_is_not_an_edit():
    """A write of equal values (a DDP broadcast, a posterior's mean() context that restores the sample)."""
    model = mlp()
    opt = bp.IVON(model.parameters(), **HP, generator=torch.Generator().manual_seed(0))
    reference = mlp()
    ref_opt = bp.IVON(reference.parameters(), **HP, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.clone())
    drop_in_loop(model, opt, 3)
    drop_in_loop(reference, ref_opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(opt.posterior_mean(), ref_opt.posterior_mean()))


# ---------------------------------------------------------------- cost per step, seen from the CPU


def _lora_shaped_step(n_tensors: int, **options):
    """An IVON with ``n_tensors`` LoRA-shaped parameters (8×24 and 24×8) and gradients set: the next step."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn((8, 24) if i % 2 else (24, 8))) for i in range(n_tensors)]
    opt = bp.IVON(params, lr=0.03, ess=1e4, hess_init=0.1, generator=torch.Generator().manual_seed(0), **options)

    def step():
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()

    step()  # the first step past construction, so that the counted one is an ordinary step
    return step


@pytest.mark.parametrize("options", [{}, {"nonfinite": "skip"}, {"hess_schedule": "averaged"}],
                         ids=["raise", "skip", "averaged"])
def test_a_step_dispatches_the_same_ops_for_16_and_128_tensors_and_never_reads_the_device(options):
    """On a GPU every dispatched op that computes is a kernel launch: a step that loops over tensors in
    Python launches hundreds. The count must not grow with the tensors, and no op may read a value back
    to the host (``_local_scalar_dense``, i.e. ``.item()``), which would stall the GPU's queue."""
    from bayes_peft.profiling import dispatched_ops

    step_16, step_128 = _lora_shaped_step(16, **options), _lora_shaped_step(128, **options)
    ops_16 = dispatched_ops(step_16)
    ops_128 = dispatched_ops(step_128)
    ops_16.subtract({"randn_like": 16})  # the test's own gradients
    ops_128.subtract({"randn_like": 128})
    assert +ops_16 == +ops_128, (ops_16, ops_128)
    assert ops_16["_local_scalar_dense"] == 0 and ops_16["item"] == 0
    assert sum(ops_16.values()) < 45, ops_16


def test_the_raise_check_reads_the_device_once_when_due():
    from bayes_peft.profiling import dispatched_ops

    step = _lora_shaped_step(16, nonfinite_check_every=2)  # step 1 done: step 2 checks
    assert dispatched_ops(step)["_local_scalar_dense"] == 1
    assert dispatched_ops(step)["_local_scalar_dense"] == 0
