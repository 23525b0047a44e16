"""liteclip models in LAION's CLIP_benchmark, the harness the field compares CLIP models with.

Importing this module registers model type `liteclip`, so CLIP_benchmark's own loader takes a liteclip model
directory as `pretrained` (`model_name` is only a label in its result files):

    import liteclip.integrations.clip_benchmark
    from clip_benchmark.models import load_clip
    model, transform, tokenizer = load_clip("liteclip", model_name="liteclip", pretrained="model", cache_dir=None,
                                            device="cpu")

Its command line, with the type registered first:

    python -m liteclip.integrations.clip_benchmark eval --dataset flickr8k --pretrained model \\
        --dataset_root data/flickr8k --task zeroshot_retrieval --recall_k 1 5 10 --no_amp

Names: CLIP_benchmark's `image_retrieval_recall@k` is liteclip's `text_to_image_R@k` (a caption retrieves its
image) and `text_retrieval_recall@k` is `image_to_text_R@k` (docs/inference.md says how the two count).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from liteclip.errors import InputError, LiteclipError
from liteclip.pipeline import ZeroShotPipeline

MODEL_TYPE = "liteclip"


class BenchmarkTokenizer:
    """CLIP_benchmark calls `tokenizer(texts)` and passes the one tensor it gets to `encode_text`: token ids and
    attention mask travel stacked, (B, 2, L), because a pad token can equal a real one (CLIP's end-of-text)."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return torch.stack([tokens["input_ids"], tokens["attention_mask"]], dim=1)


class BenchmarkModel(nn.Module):
    """A liteclip CLIP with the two methods CLIP_benchmark calls; both return L2-normalised embeddings."""

    def __init__(self, pipeline: ZeroShotPipeline):
        super().__init__()
        self.model = pipeline.model

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens[:, 0], tokens[:, 1])


def load_liteclip(model_name: str = MODEL_TYPE, pretrained: str = "model", cache_dir: str | None = None,
                  device: str | torch.device = "cpu") -> tuple[BenchmarkModel, Callable, BenchmarkTokenizer]:
    """CLIP_benchmark's loader contract: (model, transform of a PIL image, tokenizer) for the model directory
    `pretrained`; `model_name` and `cache_dir` are not needed (a liteclip directory holds everything)."""
    if not Path(pretrained).is_dir():
        raise InputError(f"--pretrained {pretrained!r} is not a liteclip model directory; pass the folder that "
                         f"train.py or save_pretrained wrote (./model by default)")
    pipeline = ZeroShotPipeline(pretrained, device=device)
    model = pipeline.model
    return BenchmarkModel(pipeline), pipeline.preprocess, BenchmarkTokenizer(model.tokenizer,
                                                                             model.config.text.max_length)


def register() -> None:
    """Adds model type `liteclip` to CLIP_benchmark's loaders and to its command line's choices."""
    try:
        import clip_benchmark.models as models
    except ImportError:
        raise InputError('CLIP_benchmark is not installed: pip install -e ".[clip-benchmark]"') \
            from None
    models.TYPE2FUNC[MODEL_TYPE] = load_liteclip
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the same list object CLIP_benchmark's command line offers


def main(argv: list[str] | None = None) -> None:
    """CLIP_benchmark's own command line, with `--model_type liteclip` registered and made the default. A problem
    liteclip can name (a folder that is no model, a missing file) is one line and exit status 2, as in `liteclip`."""
    try:
        run_cli(argv)
    except (LiteclipError, OSError) as error:
        print(f"liteclip clip_benchmark: error: {error}", file=sys.stderr)
        sys.exit(2)


def run_cli(argv: list[str] | None) -> None:
    register()
    from clip_benchmark import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"] and not any(arg.startswith("--model_type") for arg in argv):
        argv += ["--model_type", MODEL_TYPE]
    if argv[:1] == ["eval"] and not any(arg == "--model" or arg.startswith("--model=") for arg in argv):
        argv += ["--model", MODEL_TYPE]
    sys.argv = ["clip_benchmark", *argv]
    cli.main()


register()

if __name__ == "__main__":
    main()
