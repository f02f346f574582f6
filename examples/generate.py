"""Generate images: sample code sequences from a trained prior with `generate()`, decode them with the tokenizer.

    python examples/generate.py --tokenizer outputs/daps-mnist-5k --prior outputs/prior --labels 0 1 2 3 4 5 6 7 8 9
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel, LogitsProcessorList

from tokenizer import DapsImageProcessor, DapsModel
from tokenizer.prior_utils import CodeOnlyLogitsProcessor, generation_prefix, prior_output_to_codes
from training.plots import save_image_grid


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--prior", required=True)
    parser.add_argument("--labels", type=int, nargs="*", default=None, help="Class of each image (conditional prior).")
    parser.add_argument("--num-images", type=int, default=16, help="Images to generate (unconditional prior).")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="generated.png")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    model = DapsModel.from_pretrained(args.tokenizer).eval()
    processor = DapsImageProcessor.from_pretrained(args.tokenizer)
    prior = GPT2LMHeadModel.from_pretrained(args.prior).eval()
    info = json.loads((Path(args.prior) / "prior_info.json").read_text())
    config = model.config
    labels = None
    if info["num_classes"]:
        labels = torch.tensor(args.labels if args.labels else [i % info["num_classes"] for i in range(args.num_images)])
    batch = len(labels) if labels is not None else args.num_images
    prefix = generation_prefix(batch, config.codebook_size, labels)
    with torch.no_grad():
        sequences = prior.generate(
            input_ids=prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=config.num_tokens,
            min_new_tokens=config.num_tokens, do_sample=True, temperature=args.temperature, top_k=args.top_k or None,
            logits_processor=LogitsProcessorList([CodeOnlyLogitsProcessor(config.codebook_size)]),
            pad_token_id=config.codebook_size,
        )
        codes = prior_output_to_codes(sequences, config.num_tokens, config.codebook_size)
        images = model.decode(codes).pixel_values
    pictures = processor.postprocess(images, output_type="pt")
    save_image_grid(pictures, args.output, columns=8, title="samples from the prior, decoded")
    result = {"output": args.output, "num_images": batch, "codes": codes.tolist()}
    print(json.dumps({"output": args.output, "num_images": batch}))
    return result


if __name__ == "__main__":
    main()
