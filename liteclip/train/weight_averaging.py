"""Fine-tuning without forgetting, in weight space: WiSE-FT and model soups.

WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models") interpolates the weights of the model a
fine-tuning started from and of the fine-tuned model: alpha 0 is the start, 1 the fine-tuned model, and the
alphas between often keep most of the fine-tuning's gain while recovering what it cost elsewhere. A model soup
(Wortsman et al. 2022, "Model soups") averages several models fine-tuned from one start: uniformly, or greedily,
adding a model only if the validation score of the average does not drop.

What is averaged: every floating-point weight and buffer, by name. A projection head the start lacks (new heads on
towers that had none) keeps the fine-tuned value whatever alpha is, and is named; integer buffers (position ids,
counters) are the fine-tuned model's. Anything else the start lacks, or holds in another shape, means the two are
not one model before and after fine-tuning: an error naming it.

`liteclip wise-ft` and `liteclip average` run these from the command line; `score_models` is what they rank by.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from liteclip.config import Config, parse_retention_set
from liteclip.errors import ConfigError
from liteclip.model import CLIP

logger = logging.getLogger(__name__)


NEW_HEADS = ("image_projection.", "text_projection.", "logit_bias")  # what a fine-tuning may add to its start


def weights_without_counterpart(start: CLIP, finetuned: CLIP) -> list[str]:
    """The fine-tuned model's floating-point weights that are new projection heads (absent from `start`); a
    ConfigError if any other weight is absent from it or shaped otherwise."""
    start_state = start.state_dict()
    kept, foreign = [], []
    for name, tensor in finetuned.state_dict().items():
        if not tensor.is_floating_point():
            continue
        theirs = start_state.get(name)
        if theirs is not None and theirs.shape == tensor.shape:
            continue
        (kept if theirs is None and name.startswith(NEW_HEADS) else foreign).append(
            name if theirs is None else f"{name} ({tuple(theirs.shape)} in the start, {tuple(tensor.shape)} here)")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"the fine-tuned model does not start from this model: {len(foreign)} of its weights have "
                          f"no counterpart of the same name and shape there ({shown}); give the model the "
                          f"fine-tuning started from (its model.init_from)")
    return kept


@torch.no_grad()
def interpolate(start: CLIP, finetuned: CLIP, alpha: float) -> tuple[CLIP, list[str]]:
    """A copy of `finetuned` whose weights are (1 - alpha) * start + alpha * finetuned, and the names of the new
    projection heads that kept their fine-tuned values (weights_without_counterpart)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha {alpha}: must be between 0 (the start) and 1 (the fine-tuned model)")
    kept = weights_without_counterpart(start, finetuned)
    merged = copy.deepcopy(finetuned)
    start_state = start.state_dict()
    for name, tensor in merged.state_dict().items():  # tensors sharing the copy's storage
        if not tensor.is_floating_point() or name in kept:
            continue
        theirs = start_state[name]
        # torch.lerp is exact at both ends: alpha 0 gives the start's values, 1 the fine-tuned ones
        tensor.copy_(torch.lerp(theirs.to(tensor.device, tensor.dtype), tensor, alpha))
    return merged, kept


@torch.no_grad()
def average(models: Sequence[CLIP]) -> CLIP:
    """The uniform soup: a copy of the first model holding the mean of every floating-point weight. The models
    must have the same weights by name and shape (fine-tuned from one start); else a ConfigError naming one."""
    if not models:
        raise ConfigError("nothing to average: give at least one model")
    soup = copy.deepcopy(models[0])
    states = [model.state_dict() for model in models]
    for index, state in enumerate(states[1:], start=2):
        if state.keys() != states[0].keys():
            name = sorted(state.keys() ^ states[0].keys())[0]
            raise ConfigError(f"model {index} and model 1 do not have the same weights ({name} is in one only): "
                              f"a soup averages models fine-tuned from one start")
        for name, tensor in state.items():
            if tensor.shape != states[0][name].shape:
                raise ConfigError(f"model {index} holds {name} in the shape {tuple(tensor.shape)}, model 1 in "
                                  f"{tuple(states[0][name].shape)}: a soup averages models of one architecture")
    for name, tensor in soup.state_dict().items():
        if tensor.is_floating_point():
            total = torch.stack([state[name].to(torch.float64) for state in states]).mean(dim=0)
            tensor.copy_(total.to(tensor.dtype))
    return soup


def greedy_soup(models: Sequence[CLIP], scores: Sequence[float],
                score: Callable[[CLIP], float]) -> tuple[CLIP, list[int]]:
    """The greedy soup: models in order of their own `scores`, each added to the average only if `score` of the
    average with it is at least that without it. Returns the soup and the positions of the models in it."""
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    soup = models[order[0]]
    for index in order[1:]:
        candidate = average([models[i] for i in [*chosen, index]])
        value = score(candidate)
        logger.info("greedy soup: with model %d, %.2f (without, %.2f)", index + 1, value, best)
        if value >= best:
            chosen, best, soup = [*chosen, index], value, candidate
    return soup, chosen


@dataclass
class Scores:
    """What a model is ranked by: its validation figure and each retention set's."""

    val: float | None
    retention: dict[str, float] = field(default_factory=dict)

    @property
    def retention_mean(self) -> float | None:
        return sum(self.retention.values()) / len(self.retention) if self.retention else None

    def by(self, rule: str) -> float:
        """val: the validation figure; retention: the retention sets' mean; balanced: the mean of the two."""
        figures = {"val": self.val, "retention": self.retention_mean}
        if rule == "balanced":
            present = [value for value in figures.values() if value is not None]
            return sum(present) / len(present)
        value = figures[rule]
        if value is None:
            raise ConfigError(f"--pick {rule}: the config gives no {'val split' if rule == 'val' else 'train.retention'}"
                              f" to score by")
        return value


class ModelScorer:
    """Scores models on a config's val split (mean recall) and its train.retention sets, each read once."""

    def __init__(self, config: Config, device: torch.device | str = "cpu", batch_size: int = 64):
        from liteclip.data import load_splits
        from liteclip.evaluation import retention_task

        self.config, self.device, self.batch_size = config, device, batch_size
        self.val = load_splits(config.data, generate=False)["val"] if config.data.dataset != "webdataset" else []
        self.retention = {spec: retention_task(spec) for spec in map(parse_retention_set, config.train.retention)}
        if not self.val and not self.retention:
            raise ConfigError("the config has no val split and no train.retention sets to score models on")

    def check_rule(self, rule: str) -> None:
        """Before any model is scored: the figures `rule` ranks by are there."""
        if rule == "val" and not self.val:
            raise ConfigError("--pick val: the config's data has no val split to score by")
        if rule == "retention" and not self.retention:
            raise ConfigError("--pick retention: the config has no train.retention sets to score by")

    def __call__(self, model: CLIP) -> Scores:
        from liteclip.evaluation import evaluate_retention, evaluate_retrieval

        model = model.to(self.device)
        val = None
        if self.val:
            val = evaluate_retrieval(model, self.val, self.batch_size, self.device, show_progress=False,
                                     loss_name=self.config.loss.name)["mean_recall"]
        return Scores(val, evaluate_retention(model, self.retention, self.batch_size, self.device))


def plot_alphas(rows: list[tuple[float, Scores]], path: Path) -> Path | None:
    """In-domain (val) against retention by alpha, as a PNG; None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no plot: pip install matplotlib")
        return None
    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    alphas = [alpha for alpha, _ in rows]
    in_domain = [scores.val for _, scores in rows]
    retention = [scores.retention_mean for _, scores in rows]
    if None in in_domain or None in retention:  # only one of the two: it against alpha
        shown, label = (in_domain, "val mean recall") if None not in in_domain else (retention, "retention (mean)")
        axes.plot(alphas, shown, "o-")
        axes.set_xlabel("alpha (0: the start, 1: the fine-tuned model)")
        axes.set_ylabel(label)
    else:
        axes.plot(retention, in_domain, "o-")
        for alpha, x, y in zip(alphas, retention, in_domain):
            axes.annotate(f"alpha {alpha:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.set_xlabel("retention: mean of the train.retention figures")
        axes.set_ylabel("in-domain: val mean recall")
    axes.set_title("WiSE-FT: weights (1 - alpha) * start + alpha * fine-tuned")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def describe_kept(kept: list[str]) -> str:
    if not kept:
        return "every weight has a counterpart in the start"
    shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
    return f"{len(kept)} weights the start lacks keep their fine-tuned values ({shown})"


def summary_rows(rows: list[tuple[float, Scores]]) -> tuple[list[str], list[list[Any]]]:
    names = sorted({name for _, scores in rows for name in scores.retention})
    header = ["alpha", "val mean recall", *names]
    table = [[f"{alpha:g}", "" if scores.val is None else f"{scores.val:.2f}",
              *[f"{scores.retention[name]:.2f}" for name in names]] for alpha, scores in rows]
    return header, table
