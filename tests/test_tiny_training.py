"""A real optimisation: the engine's training step, 30 times on one fixed batch, lowers the total loss."""

import torch

from adclr import engine
from adclr.config import make_config


def test_thirty_steps_lower_the_total_loss():
    config = make_config(
        "builtin",
        out_dim=64,
        head_hidden_dim=64,
        head_bottleneck_dim=16,
        local_crops_number=2,
        num_query=4,
        attn_backend="sdpa",
        precision="fp32",
    )
    state = engine.build_train_state(config, torch.device("cpu"))
    settings = engine.StepSettings(lr=1e-3, weight_decay=0.01, teacher_temp=0.04, momentum=0.9, freeze_last_layer=False)
    crops = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    query_crops = torch.randn(8, 4, 3, 8, 8)

    losses = [engine.training_step(state, crops, query_crops, settings).loss for _ in range(30)]
    assert all(isinstance(loss, float) and torch.isfinite(torch.tensor(loss)) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
