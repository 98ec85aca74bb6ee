"""The collapse monitor: the teacher's mean per-row entropy and the entropy of its batch-mean output, per
branch, equal in both losses and to a float64 loop, carried by every step, and read into warnings."""

import math

import pytest
import torch
from engine_utils import SETTINGS, batch, tiny_config

from adclr import train_step
from adclr.fused_loss import FusedADCLRLoss
from adclr.heads import HeadFeatures
from adclr.loss import ADCLRLoss, collapse_warnings, teacher_entropy

K = 16


def _entropies_float64(probs: torch.Tensor) -> tuple[float, float]:
    """Mean row entropy and the entropy of the mean row, by a plain loop in float64."""
    rows = probs.reshape(-1, probs.shape[-1]).double().tolist()
    row_entropy = [-sum(p * math.log(p) for p in row if p > 0) for row in rows]
    mean_row = [sum(column) / len(rows) for column in zip(*rows)]
    return sum(row_entropy) / len(rows), -sum(p * math.log(p) for p in mean_row if p > 0)


def test_entropies_of_known_distributions():
    uniform = teacher_entropy(torch.full((5, K), 1 / K))
    assert uniform.mean.item() == pytest.approx(math.log(K)) and uniform.of_mean.item() == pytest.approx(math.log(K))
    same_one_hot = teacher_entropy(torch.eye(K)[[3] * 6])  # every row picks dimension 3: one-hot collapse
    assert same_one_hot.mean.item() == 0 and same_one_hot.of_mean.item() == 0
    spread_one_hot = teacher_entropy(torch.eye(K)[:8])  # confident and diverse: healthy
    assert spread_one_hot.mean.item() == 0 and spread_one_hot.of_mean.item() == pytest.approx(math.log(8))


def test_entropies_match_a_float64_loop_on_random_rows():
    probs = torch.softmax(torch.randn(2, 7, K) * 3, dim=-1)
    result = teacher_entropy(probs)
    mean, of_mean = _entropies_float64(probs)
    assert result.mean.item() == pytest.approx(mean, rel=1e-5) and result.of_mean.item() == pytest.approx(
        of_mean, rel=1e-5
    )


@pytest.mark.parametrize("chunk_rows", [None, 3])  # one chunk, or many: the fused loss accumulates over chunks
def test_fused_and_unfused_losses_report_the_teachers_entropies(chunk_rows):
    """Both losses report the entropies of the teacher's centred, sharpened outputs (checked against a float64
    loop over the softmax of the centred logits), with non-zero centres and a temperature other than 1."""
    B, Q, D, crops, temp = 5, 3, 8, 3, 0.07
    weight = torch.nn.functional.normalize(torch.randn(K, D), dim=-1)
    features = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, D), dim=-1)  # noqa: E731
    student = HeadFeatures(features(crops * B), features(2, B, Q), weight, weight)
    teacher = HeadFeatures(features(2 * B), features(2, B, Q), weight, weight)
    centre, query_centre = torch.randn(1, K) * 0.1, torch.randn(1, K) * 0.1
    expected = {
        "cls": _entropies_float64(torch.softmax((teacher.cls @ weight.T - centre) / temp, -1)),
        "query": _entropies_float64(torch.softmax((teacher.queries @ weight.T - query_centre) / temp, -1)),
    }
    unfused = ADCLRLoss(K, crops)
    fused = FusedADCLRLoss(K, crops, chunk_rows=chunk_rows)
    for loss in (unfused, fused):
        loss.center.copy_(centre)
        loss.query_center.copy_(query_centre)
    terms = {
        "unfused": unfused(
            student.cls @ weight.T, teacher.cls @ weight.T, student.queries @ weight.T, teacher.queries @ weight.T, temp
        ),
        "fused": fused(student, teacher, temp),
    }
    for name, t in terms.items():
        for branch, entropy in (("cls", t.cls_entropy), ("query", t.query_entropy)):
            got = (entropy.mean.item(), entropy.of_mean.item())
            assert got == pytest.approx(expected[branch], rel=1e-5), (name, branch, got, expected[branch])


@pytest.mark.parametrize("num_query", [0, 3])
def test_every_step_carries_the_entropies(num_query):
    config = tiny_config(num_query=num_query)
    state = train_step.build_train_state(config, torch.device("cpu"))
    crops, query_crops = batch(config)
    losses = train_step.training_step(state, crops, query_crops if num_query else None, SETTINGS)
    ln_k = math.log(config.model.out_dim)
    assert 0 < losses.cls_entropy <= ln_k + 1e-5 and 0 < losses.cls_batch_entropy <= ln_k + 1e-5
    if num_query:
        assert 0 < losses.query_entropy <= ln_k + 1e-5 and 0 < losses.query_batch_entropy <= ln_k + 1e-5
    else:
        assert math.isnan(losses.query_entropy) and math.isnan(losses.query_batch_entropy)


def test_collapse_warnings_name_the_kind_and_the_branch():
    ln_k = math.log(256)
    healthy = {"cls_entropy": 0.3 * ln_k, "cls_batch_entropy": 0.9 * ln_k}
    assert collapse_warnings(healthy, 256) == []
    # a short built-in run's early epochs: confident rows, a small batch using few dimensions (0.38 ln K)
    assert collapse_warnings({"cls_entropy": 0.81, "cls_batch_entropy": 2.1}, 256) == []
    [drifting] = collapse_warnings({"cls_entropy": 4.5, "cls_batch_entropy": 5.0}, 256)  # the former preset
    assert "uniform" in drifting
    [uniform] = collapse_warnings({**healthy, "query_entropy": 0.95 * ln_k, "query_batch_entropy": ln_k}, 256)
    assert "query" in uniform and "uniform" in uniform and "--teacher_temp" in uniform
    [one_hot] = collapse_warnings({"cls_entropy": 0.01, "cls_batch_entropy": 0.2 * ln_k}, 256)
    assert "cls" in one_hot and "one dimension" in one_hot
    assert collapse_warnings({"cls": 5.0}, 256) == []  # a record without entropies (an old log) says nothing
