"""The joint inversion of fields and notes: exact on a toy fusion model at batch 1, sensitive to
each modality's part of the update, lengths from the position gradient, refusals."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gradaudit.attacks import ATTACKS, build_attack
from gradaudit.attacks.inversion.multimodal import (
    MultimodalInversionAttack,
    MultimodalInversionParams,
    joined,
    matching_blocks,
    sequence_lengths,
)
from gradaudit.attacks.labels import dummy_inputs
from gradaudit.models import build_model
from gradaudit.threat import observe_batch
from gradaudit.types import ClientUpdate, TabularSchema, TaskInfo, TextSchema

TABULAR = TabularSchema(("age",), ("sex", "kind"), (3, 4), (("f", "m", "u"), ("a", "b", "c", "d")))
TEXT = TextSchema(("<pad>", "<unk>", *(f"w{i}" for i in range(28))), max_length=8)
TASK = TaskInfo(
    "toy-notes", "multimodal", (11,), 3, None, ("x", "y", "z"), tabular=TABULAR, text=TEXT
)
SMALL = {"dim": 16, "heads": 2, "text_features": 8, "tabular_features": 8, "hidden": [16]}
FAST = {"iterations": 200}


def fusion() -> nn.Module:
    return build_model("fusion", SMALL, TASK, generator=torch.Generator().manual_seed(0))


def records(n: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` records with distinct tokens per note, notes of 6, 8, 4, ... tokens."""
    g = torch.Generator().manual_seed(seed)
    numeric = torch.randn(n, 1, generator=g)
    codes = torch.stack([torch.randint(c, (n,), generator=g) for c in (3, 4)], dim=1).float()
    tokens = torch.zeros(n, 8)
    for i in range(n):
        length = (6, 8, 4, 7)[i % 4]
        tokens[i, :length] = (2 + torch.randperm(28, generator=g)[:length]).float()
    return torch.cat([numeric, codes, tokens], dim=1), torch.randint(3, (n,), generator=g)


def attack(**params: object) -> MultimodalInversionAttack:
    return MultimodalInversionAttack(MultimodalInversionParams(**{**FAST, **params}))


def test_registered_with_its_papers() -> None:
    assert "multimodal_inversion" in ATTACKS.names()
    summary = ATTACKS.entry("multimodal_inversion").summary
    assert "TabLeak" in summary and "LAMP" in summary
    assert isinstance(build_attack("multimodal_inversion", {}), MultimodalInversionAttack)


def test_batch_one_recovers_the_fields_and_the_note_exactly() -> None:
    model = fusion()
    x, y = records(1)
    obs = observe_batch(model, x, y, TASK, knows=("architecture", "labels"))
    # a random start: the joint optimisation itself must find the word order
    result = attack(init="random").run(obs, model, rng=torch.Generator().manual_seed(0))
    assert result.status == "ok", result.reason
    rec = result.reconstruction
    assert rec.rows is not None and rec.tokens is not None
    assert rec.rows.shape == (1, 3) and rec.tokens.shape == (1, 8)
    assert rec.tokens.dtype == torch.int64
    assert torch.equal(rec.tokens, x[:, 3:].long())  # the note, word order and length included
    assert torch.equal(rec.rows[:, 1:], x[:, 1:3])  # the codes
    assert float((rec.rows[0, 0] - x[0, 0]).abs()) < 0.05  # the numeric field
    assert torch.equal(rec.labels, y)
    details = result.details
    assert details["note"]["lengths"] == [6]
    assert details["note"]["init"] == "random"
    assert details["fields"]["codes_present"] == {
        "sex": [TABULAR.categories[0][int(x[0, 1])]],
        "kind": [TABULAR.categories[1][int(x[0, 2])]],
    }
    assert details["objective"] < 1e-4


def test_the_distance_sees_each_modality_on_its_own() -> None:
    """Every modality's evidence enters the matching: at the true batch the distance is ~0, and
    changing only the numeric field, only a code or only one token raises it clearly. A matching
    that ignored the note's (or the fields') part of the update would leave one of them near 0."""
    model = fusion()
    x, y = records(2)
    obs = observe_batch(model, x, y, TASK, knows=("architecture", "labels"))
    grads = dict(obs.updates[0].tensors)
    split = ["text.token_embedding.weight", "text.position_embedding.weight"]
    blocks = matching_blocks(model, grads, split)
    assert "tabular.embeddings.0.weight" in blocks.names
    assert "text.blocks.0.qkv.weight" in blocks.names
    present = set(x[:, 3:].long().flatten().tolist()) - {0}
    assert set(blocks.rows["text.token_embedding.weight"].tolist()) == present

    def distance(batch: torch.Tensor) -> float:
        params = dict(model.named_parameters())
        loss = nn.functional.cross_entropy(model(batch), y)
        values = torch.autograd.grad(loss, [params[n] for n in blocks.names])
        return float(blocks.distance(dict(zip(blocks.names, values, strict=True))))

    assert distance(x) < 1e-6
    numeric, code, token = x.clone(), x.clone(), x.clone()
    numeric[0, 0] += 0.5
    code[1, 2] = (code[1, 2] + 1) % 4
    token[0, 3], token[0, 4] = x[0, 4], x[0, 3]  # two words of the first note swapped
    for changed in (numeric, code, token):
        assert distance(changed) > 1e-3


def test_note_lengths_from_the_position_gradient() -> None:
    model = fusion()
    x, y = records(3)
    obs = observe_batch(model, x, y, TASK, knows=("architecture",))
    position = obs.updates[0].tensors["text.position_embedding.weight"]
    assert int(sequence_lengths(position, 3).max()) == 8  # the longest note is exact
    assert sequence_lengths(position[:, :0].new_zeros(8, 4), 2).tolist() == [0, 0]
    one = observe_batch(model, x[:1], y[:1], TASK, knows=("architecture",))
    assert sequence_lengths(
        one.updates[0].tensors["text.position_embedding.weight"], 1
    ).tolist() == [6]


def test_batch_two_without_labels_recovers_the_labels_and_most_of_the_records() -> None:
    model = fusion()
    x, y = records(2, seed=5)
    obs = observe_batch(model, x, y, TASK, knows=("architecture",))
    quick = attack(polish_rounds=4, candidates=40)
    result = quick.run(obs, model, rng=torch.Generator().manual_seed(1))
    assert result.status == "ok", result.reason
    assert result.details["labels"] == "recovered (bias)"
    assert sorted(result.reconstruction.labels.tolist()) == sorted(y.tolist())
    rec = result.reconstruction
    true_bag = sorted(t for t in x[:, 3:].long().flatten().tolist() if t)
    got_bag = sorted(t for t in rec.tokens.flatten().tolist() if t)
    assert set(got_bag) <= set(true_bag)  # only tokens the update shows present


def test_dummy_inputs_are_valid_records() -> None:
    x = dummy_inputs(TASK, 64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 11)
    tokens = x[:, 3:].long()
    assert int(tokens.min()) >= 0 and int(tokens.max()) < TEXT.vocab_size
    assert bool((tokens[:, 0] != 0).all())  # no empty note
    padded = tokens == 0
    assert bool((padded[:, :-1] <= padded[:, 1:]).all())  # right-padded
    assert fusion()(x).shape == (64, 3)
    assert torch.equal(joined(x[:, :3], tokens), x)


def test_refusals() -> None:
    model = fusion()
    x, y = records(3)
    obs = observe_batch(model, x, y, TASK, knows=("architecture", "labels"))
    assert "max_examples=2" in attack(max_examples=2).applicable(obs)
    update = obs.updates[0]
    withheld = ClientUpdate(
        update.client_id,
        update.round,
        update.kind,
        update.tensors,
        update.num_examples,
        withheld=frozenset({"text.token_embedding.weight"}),
    )
    hidden = dataclasses.replace(obs, updates=(withheld,))
    result = attack().run(hidden, model, rng=torch.Generator())
    assert result.status == "not_applicable"
    assert "withheld the gradient of text.token_embedding.weight" in result.reason
    tabular = TaskInfo("t", "tabular", (3,), 3, None, ("x", "y", "z"), tabular=TABULAR)
    assert "reconstructs records with fields and a note" in attack().applicable(
        dataclasses.replace(obs, task=tabular)
    )
    other = build_model("transformer", {"dim": 16, "heads": 2}, TASK, generator=torch.Generator())
    assert attack().run(obs, other, rng=torch.Generator()).reason == (
        "multimodal_inversion inverts a fusion model"
    )
    blind = observe_batch(model, x, y, TASK, knows=())
    assert attack().applicable(blind) == "the adversary does not know the model architecture"


def test_batch_one_with_one_hot_fields_from_the_position_start_with_a_prior() -> None:
    model = build_model(
        "fusion", {**SMALL, "encoding": "onehot"}, TASK, generator=torch.Generator().manual_seed(0)
    )
    x, y = records(1, seed=7)
    public = records(16, seed=8)
    knows = ("architecture", "labels", "public_data")
    obs = observe_batch(model, x, y, TASK, knows=knows, public_data=public)
    # with LAMP's language prior of the public notes: its weight follows the distance, so the
    # exact note is kept however unlikely the prior finds it
    result = attack(prior_weight=0.5).run(obs, model, rng=torch.Generator().manual_seed(0))
    assert result.details["note"]["init"].startswith("positions")
    assert result.details["note"]["prior"].startswith("3-gram Kneser-Ney model of 16 public")
    rec = result.reconstruction
    assert torch.equal(rec.rows[:, 1:], x[:, 1:3])
    assert torch.equal(rec.tokens, x[:, 3:].long())
    assert float((rec.rows[0, 0] - x[0, 0]).abs()) < 0.05
