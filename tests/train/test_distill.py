"""Distillation from a frozen teacher: the KL term against a written-out reference, its neutral cases, the teacher
cache, and a student trained from a demo-trained teacher."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from liteclip.train import distill as distill_module
from liteclip.train.distill import DistillTerm, distillation_loss
from liteclip.precision import Precision
from liteclip.train.loop import contrastive_step, fit
from tests.train.test_loop import fixed_batches, read_rows, tiny_config, train_tiny_model

REPO = str(Path(__file__).resolve().parents[2])


def naive_kl(student, teacher, temperature):
    """sum_j p_t(j) (log p_t(j) - log p_s(j)) per row and per column, averaged, written out."""
    def kl_rows(s, t):
        p_t, log_p_t, log_p_s = (t / temperature).softmax(1), (t / temperature).log_softmax(1), \
            (s / temperature).log_softmax(1)
        return sum(float((p_t[i] * (log_p_t[i] - log_p_s[i])).sum()) for i in range(len(s))) / len(s)
    return (kl_rows(student, teacher) + kl_rows(student.t(), teacher.t())) / 2


def test_the_kl_term_matches_a_written_out_reference_and_is_zero_for_the_teacher_itself():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 6, dtype=torch.float64) * 3, torch.randn(6, 6, dtype=torch.float64) * 3
    for temperature in (1.0, 2.5):
        assert distillation_loss(student, teacher, temperature).item() == pytest.approx(
            naive_kl(student, teacher, temperature), abs=1e-6)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-12)


def test_a_teacher_equal_to_the_student_adds_nothing_to_the_step(tmp_path):
    model, (batch,) = fixed_batches(tiny_config(tmp_path), 1, 8)
    model.eval()  # no dropout: the student's embeddings are exactly the teacher's
    with torch.no_grad():
        out = model(**batch)
    with_teacher = {**batch, "teacher_image_embeds": out.image_embeds, "teacher_text_embeds": out.text_embeds}
    plain = contrastive_step(model, [batch], Precision(None, "cpu"), None)
    model.zero_grad()
    term = DistillTerm(weight=5.0, temperature=1.0, teacher_scale=model.scale().item())
    distilled = contrastive_step(model, [with_teacher], Precision(None, "cpu"), None, "clip", term)
    torch.testing.assert_close(distilled, plain, atol=1e-6, rtol=0)
    student_logits = model.scale().item() * out.image_embeds @ out.text_embeds.t()
    assert term(student_logits, F.normalize(torch.randn_like(out.image_embeds), dim=-1),
                out.text_embeds).item() > 1e-3  # a different teacher does add a term


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return train_tiny_model(tmp_path_factory.mktemp("teacher"), "train.max_steps=4")


def test_a_student_trains_from_a_demo_trained_teacher_whose_cache_is_built_once(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    extra = (f"distill.teacher={teacher_dir}", "distill.weight=2.0", "train.epochs=1", "train.max_steps=4")
    fit(tiny_config(tmp_path / "a", *extra), show_progress=False)
    caches = list((tmp_path / "a" / "demo" / ".liteclip_cache").glob("teacher_*.safetensors"))
    assert len(caches) == 1

    def teacher_must_not_run(*args, **kwargs):
        raise AssertionError("the teacher ran although its embeddings were cached")

    monkeypatch.setattr(distill_module, "encode_image_files", teacher_must_not_run)
    monkeypatch.setattr(distill_module, "encode_texts", teacher_must_not_run)
    fit(tiny_config(tmp_path / "a", *extra, f"train.output_dir={tmp_path / 'again'}"), show_progress=False)
    losses = [[r["loss"] for r in read_rows(d / "metrics.csv")] for d in (tmp_path / "a" / "run", tmp_path / "again")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_with_weight_zero_distillation_is_plain_training_step_for_step(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    steps = ("train.epochs=1", "train.max_steps=4")
    fit(tiny_config(tmp_path / "plain", *steps), show_progress=False)
    fit(tiny_config(tmp_path / "zero", *steps, f"distill.teacher={teacher_dir}", "distill.weight=0"),
        show_progress=False)
    fit(tiny_config(tmp_path / "two", *steps, f"distill.teacher={teacher_dir}", "distill.weight=2"),
        show_progress=False)
    losses = {name: [r["loss"] for r in read_rows(tmp_path / name / "run" / "metrics.csv")]
              for name in ("plain", "zero", "two")}
    assert losses["zero"] == losses["plain"] and losses["two"] != losses["plain"]


def test_distillation_with_gradient_caching_matches_one_big_batch(tmp_path):
    model, (half_a, half_b) = fixed_batches(tiny_config(tmp_path), 2, 4)
    model.eval()
    torch.manual_seed(1)
    for half in (half_a, half_b):  # a teacher of another width (24), as a bigger CLIP would be
        half["teacher_image_embeds"] = F.normalize(torch.randn(4, 24), dim=-1)
        half["teacher_text_embeds"] = F.normalize(torch.randn(4, 24), dim=-1)
    length = max(half_a["input_ids"].shape[1], half_b["input_ids"].shape[1])
    pad = lambda t: F.pad(t, (0, length - t.shape[1]))  # noqa: E731
    full = {k: torch.cat([pad(half_a[k]), pad(half_b[k])]) if k in ("input_ids", "attention_mask")
            else torch.cat([half_a[k], half_b[k]]) for k in half_a}
    term = DistillTerm(weight=1.5, temperature=2.0, teacher_scale=20.0)
    fp32 = Precision(None, "cpu")
    big = contrastive_step(model, [full], fp32, None, "clip", term)
    big_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    cached = contrastive_step(model, [half_a, half_b], fp32, None, "clip", term)
    torch.testing.assert_close(cached, big, atol=1e-5, rtol=1e-5)
    for name, grad in big_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=2e-5, rtol=1e-3, msg=name)
