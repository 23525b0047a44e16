"""Checks liteclip against transformers on the real openai/clip-vit-base-patch32 checkpoint.

    python scripts/validate_openai_clip.py [--model openai/clip-vit-base-patch32]

Needs the Hugging Face hub (or its cache). Without it, it says that it skipped and exits 0; the offline test
(tests/weights/test_huggingface.py) makes the same comparison on a tiny random CLIP.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="openai/clip-vit-base-patch32")
    args = parser.parse_args()
    from transformers import AutoTokenizer, CLIPModel

    try:
        reference = CLIPModel.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except OSError as error:
        print(f"skipped: {args.model} could not be loaded from the hub or its cache ({str(error).splitlines()[0]})")
        return 0
    from liteclip import CLIP, clip_loss

    model = CLIP.from_pretrained(args.model).eval()
    texts = ["a photo of a cat", "a photo of a dog", "a diagram", "a boy jumping with skateboard"]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    pixels = torch.randn(len(texts), 3, 224, 224)
    with torch.no_grad():
        expected = reference(**tokens, pixel_values=pixels, return_loss=True)
        actual = model(pixels, tokens["input_ids"], tokens["attention_mask"])
    checks = {
        "image_embeds": (actual.image_embeds, F.normalize(expected.image_embeds, dim=-1)),
        "text_embeds": (actual.text_embeds, F.normalize(expected.text_embeds, dim=-1)),
        "logits_per_image": (actual.logits_per_image, expected.logits_per_image),
        "loss": (clip_loss(actual.logits_per_image), expected.loss),
    }
    worst = 0.0
    for name, (ours, theirs) in checks.items():
        difference = (ours - theirs).abs().max().item()
        worst = max(worst, difference)
        print(f"{name:18s} max |difference| = {difference:.2e}")
    ok = worst < 1e-4
    print("OK: liteclip matches transformers" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
