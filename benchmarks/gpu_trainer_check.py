"""On a GPU: bp.IVON through the Hugging Face Trainer with fp16 mixed precision and gradient accumulation.

With fp16 the GradScaler multiplies the loss by 2^16; IVON must read unscaled gradients, or its Hessian
estimate (built from the gradients) would be off by that factor. This trains a small random Llama twice,
in fp32 and in fp16 with accumulation 2, and prints IVON's Hessian and the mean's movement for both.

    python benchmarks/gpu_trainer_check.py
"""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import bayes_peft as bp
from bayes_peft.integrations import Trainer


def run(fp16: bool, accumulation: int):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model = model.cuda()  # IVON keeps its state beside the parameters: build it where training runs
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = bp.IVON(model.parameters(), lr=0.03, ess=1e4, hess_init=3e-4, clip_radius=1e-2,
                  generator=torch.Generator(device="cuda").manual_seed(0))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 512, (64, 32), generator=g)]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=20, per_device_train_batch_size=8 // accumulation,
                                 gradient_accumulation_steps=accumulation, fp16=fp16, max_grad_norm=0.0,
                                 learning_rate=0.03, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                                 logging_steps=5, disable_tqdm=True, seed=0)
        Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    hess = torch.cat([g["hess"] for g in opt.param_groups])
    with opt.mean_params():
        moved = sum((p - start[n]).norm() ** 2 for n, p in model.named_parameters() if n in start) ** 0.5
    return hess.mean().item(), hess.max().item(), moved.item(), opt.current_step


if __name__ == "__main__":
    print(f"# {torch.cuda.get_device_name()}")
    for fp16, acc in ((False, 1), (True, 2)):
        mean_h, max_h, moved, steps = run(fp16, acc)
        print(f"fp16={fp16!s:<5} accumulation={acc}: IVON steps {steps}, hess mean {mean_h:.3e} max {max_h:.3e}, "
              f"‖mean − start‖ {moved:.4f}")
