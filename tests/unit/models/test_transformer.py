"""Tests of the small transformer: padding is invisible, the embedding gradient names the ids,
and torch.func computes per-example gradients through it."""

from __future__ import annotations

import pytest
import torch

from gradaudit.defenses.dp import per_example_gradients
from gradaudit.errors import ConfigError
from gradaudit.models import build_model
from gradaudit.types import TaskInfo, TextSchema

SCHEMA = TextSchema(("<pad>", "<unk>", *(f"w{i}" for i in range(30))), max_length=10)
TASK = TaskInfo("toy-text", "text", (10,), 3, None, ("a", "b", "c"), text=SCHEMA)


def model(**params: int) -> torch.nn.Module:
    return build_model("transformer", params, TASK, generator=torch.Generator().manual_seed(0))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(2, 32, (4, 10), generator=torch.Generator().manual_seed(1)).float()
    x[0, 6:] = 0
    x[2, 3:] = 0
    return x, torch.tensor([0, 1, 2, 1])


def test_padding_changes_nothing() -> None:
    net = model()
    x, _ = batch()
    assert net(x).shape == (4, 3)
    # row 0 holds 6 tokens: cutting the padding off gives the same logits
    assert torch.allclose(net(x[:1, :6]), net(x)[:1], atol=1e-6)
    # a token where row 0 had padding is no longer padding, and the logits move
    changed = x.clone()
    changed[0, 7] = 5
    assert not torch.allclose(net(changed)[0], net(x)[0])


def test_embedding_gradient_rows_are_exactly_the_ids_in_the_batch() -> None:
    net = model()
    x, y = batch()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    rows = torch.nonzero(net.token_embedding.weight.grad.abs().sum(dim=1)).flatten()
    present = set(x.long().flatten().tolist()) - {SCHEMA.pad_id}
    assert set(rows.tolist()) == present


def test_per_example_gradients_sum_to_the_batch_gradient() -> None:
    net = model(dim=16, heads=2, layers=3, ff=32)
    x, y = batch()
    per = per_example_gradients(net, x, y)
    torch.nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
    for name, p in net.named_parameters():
        assert torch.allclose(per[name].sum(dim=0), p.grad, atol=1e-5), name


def test_refuses_heads_that_do_not_divide_the_width_and_non_text_tasks() -> None:
    with pytest.raises(ConfigError, match="does not divide"):
        model(dim=10, heads=4)
    image = TaskInfo("digits", "image", (1, 8, 8), 10, None, tuple("0123456789"))
    with pytest.raises(ConfigError, match="needs token sequences"):
        build_model("transformer", {}, image, generator=torch.Generator())
