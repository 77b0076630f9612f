"""A ``transformers.Trainer`` with ``DSDTrainerCallback`` over several gloo processes on the CPU, for
``test_huggingface.py``: ``python -m torch.distributed.run --nproc_per_node 2 hf_worker.py --out DIR --mode ddp``
(or ``--mode fsdp2``; ``--mode single`` runs one process). Each rank saves ``rank<r>.pt``: its masks (its shard's
part under FSDP2), whether every pruned weight was zero in every training forward of the sparse phase, and the
full masks of the checkpoint DSD wrote in the sparse phase."""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from lightning_dsd.doors.transformers import DSDTrainerCallback
from lightning_dsd.doors.transformers.checkpoints import STATE_FILE
from lightning_dsd.rules.masks import unpack_mask
from lightning_dsd.rules.sharding import local_part


class Tokens(Dataset):
    def __init__(self, n: int = 32, length: int = 8, vocab: int = 48) -> None:
        self.x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Watch(TrainerCallback):
    """After every optimizer step of the sparse phase: this rank's masks, and whether pruned entries are zero."""

    def __init__(self, dsd: DSDTrainerCallback) -> None:
        self.dsd, self.masks, self.zeros = dsd, {}, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.dsd.phase.value == "sparse":
            self.masks = {name: mask.clone() for name, mask in self.dsd.masks.items()}
            params = dict(model.named_parameters())
            self.zeros.append(all(bool((local_part(params[n].data)[~m] == 0).all()) for n, m in self.masks.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("ddp", "fsdp2", "single"), required=True)
    options = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=48, n_positions=8, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    dense = 0 if options.mode != "ddp" else 2  # FSDP2 and one device compare masks decided on the same weights
    dsd = DSDTrainerCallback(0.5, dense, 3, 1, interval="step", log_histograms=False, figure_layers=0)
    watch = Watch(dsd)
    cuda = options.mode == "fsdp2" and torch.cuda.is_available()  # accelerate runs FSDP on accelerators only
    extra = {"fsdp": "full_shard", "fsdp_config": {"version": 2}} if options.mode == "fsdp2" else {}
    args = TrainingArguments(
        output_dir=os.path.join(options.out, "run"), max_steps=dense + 4, per_device_train_batch_size=4,
        learning_rate=1e-2, use_cpu=not cuda, ddp_backend=None if options.mode == "single" or cuda else "gloo",
        report_to="none", save_strategy="steps", save_steps=dense + 2, disable_tqdm=True, seed=0, **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[dsd, watch])
    trainer.train()
    saved = torch.load(os.path.join(args.output_dir, f"checkpoint-{dense + 2}", STATE_FILE), weights_only=True)
    full = {name: unpack_mask(entry["bits"], entry["shape"]) for name, entry in saved["dsd"]["masks"].items()}
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"masks": watch.masks, "zeros": watch.zeros, "saved_masks": full, "targets": dsd.target_names,
                "tied": trainer.model.lm_head.weight is trainer.model.transformer.wte.weight,
                "fsdp": trainer.is_fsdp_enabled, "sharded": type(trainer.model.lm_head.weight).__name__ == "DTensor"},
               os.path.join(options.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
