"""Train an autoregressive prior over a tokenizer's codes: a small GPT-2 (`transformers`) on [BOS, class, z_1 … z_L].

    python examples/train_prior.py --tokenizer outputs/daps-mnist-5k --dataset mnist-5k --output-dir outputs/prior
    python examples/generate.py --tokenizer outputs/daps-mnist-5k --prior outputs/prior --labels 0 1 2 3

The dataset is tokenized once with `tokenize_dataset` (cached by `datasets`), then the prior is trained with a plain
PyTorch loop. Any causal LM works: swap GPT2Config/GPT2LMHeadModel for LlamaConfig/LlamaForCausalLM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from tokenizer import DapsImageProcessor, DapsModel, tokenize_dataset
from tokenizer.prior_utils import codes_to_prior_input_ids, prior_vocab_size

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenize_dataset import builtin_as_dataset  # noqa: E402  (the example beside this one)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="A saved tokenizer folder.")
    parser.add_argument("--dataset", default="mnist-5k", help="A built-in dataset (mnist-5k, digits, faces, photo-crops).")
    parser.add_argument("--tokenized", default=None, help="A dataset saved by `daps tokenize` (skips tokenizing).")
    parser.add_argument("--output-dir", default="outputs/prior")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--no-labels", action="store_true", help="Unconditional prior.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    model = DapsModel.from_pretrained(args.tokenizer).eval()
    processor = DapsImageProcessor.from_pretrained(args.tokenizer)
    config = model.config
    if args.tokenized:
        tokenized = datasets.load_from_disk(args.tokenized)
    else:
        tokenized = tokenize_dataset(builtin_as_dataset(args.dataset, config.image_size, config.num_channels),
                                     model, processor)
    use_labels = not args.no_labels and "label" in tokenized.column_names
    num_classes = int(max(tokenized["label"])) + 1 if use_labels else 0
    codes = torch.tensor(np.asarray(tokenized["codes"], dtype=np.int64))
    labels = torch.tensor(tokenized["label"]) if use_labels else None
    input_ids = codes_to_prior_input_ids(codes, config.codebook_size, labels)

    prior_config = GPT2Config(
        vocab_size=prior_vocab_size(config.codebook_size, num_classes), n_positions=input_ids.shape[1],
        n_embd=args.width, n_layer=args.layers, n_head=4, bos_token_id=config.codebook_size,
        eos_token_id=config.codebook_size,
    )
    prior = GPT2LMHeadModel(prior_config)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=args.learning_rate, weight_decay=0.01)
    prefix = input_ids.shape[1] - config.num_tokens
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    prior.train()
    for step in tqdm(range(args.max_steps), desc="prior"):
        batch = input_ids[torch.randint(0, len(input_ids), (args.batch_size,), generator=generator)]
        targets = batch.clone()
        targets[:, :prefix] = -100  # the prefix is given, not predicted
        loss = prior(input_ids=batch, labels=targets).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())

    output_dir = Path(args.output_dir)
    prior.save_pretrained(output_dir)
    summary = {
        "tokenizer": args.tokenizer, "num_classes": num_classes, "num_sequences": len(input_ids),
        "steps": args.max_steps, "first_loss": losses[0], "final_loss": float(np.mean(losses[-20:])),
        "final_bits_per_image": float(np.mean(losses[-20:])) * config.num_tokens / np.log(2),
        "uniform_bits_per_image": config.bits_per_image,
    }
    (output_dir / "prior_info.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
