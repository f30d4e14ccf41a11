"""The bag of words of a client's text batch, read off the token-embedding gradient.

An ``nn.Embedding`` row receives a gradient only when the batch looked its id up, so the
non-zero rows of the token-embedding gradient are exactly the distinct tokens of the batch
(Melis, Song, De Cristofaro & Shmatikov, "Exploiting Unintended Feature Leakage in
Collaborative Learning", IEEE S&P 2019). Text inversion attacks start from this bag: LAMP
(Balunović et al., NeurIPS 2022) and TAG (Deng et al., EMNLP Findings 2021) search for the
sentence among these tokens.

Counts, and the order, follow exactly when one sequence is behind the update and the model
adds a learned position embedding to the token embedding (``h = tok[x_l] + pos[l]``, as
BERT and `models.transformer` do). Then the gradient of ``pos[l]`` is the gradient reaching
position ``l``, and the gradient of ``tok[v]`` is the sum of those of the positions that hold
``v``; with at most as many positions as embedding dimensions the position rows are linearly
independent, so least squares names each position's token (`position_assignment`). Decepticons
(Fowl et al., ICLR 2023) also orders tokens with the position embedding, from embeddings a
malicious server breaches; here the honest gradient suffices. Both relations are linear, so
they also hold for a FedAvg change after any number of plain local SGD steps on one sequence.
On a noised update the least-squares solution is only near 0/1; `count_tol` says how near it
must be for the rounded counts to be reported (then an estimate, not exact).
"""

from __future__ import annotations

import math
import time
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.attacks.base import (
    ProgressFn,
    Reconstructs,
    checked_update,
    gradient_estimate,
    not_applicable,
)
from gradaudit.attacks.inversion.embedding import looked_up_rows
from gradaudit.types import AttackResult, ClientUpdate, Observation, Reconstruction, TextSchema

COUNT_TOL = 0.01
"""Default `count_tol`: on a noise-free update every least-squares assignment entry lies within
about 1e-6 of 0 or 1 (float32 gradients); a FedAvg change over several steps, within 1e-4."""

MAX_RESIDUAL = 0.5
"""A rounded assignment is refused when it leaves more than this share of the token rows'
norm unexplained (the token rows are then not sums of position rows at all)."""

RANK_TOL = 1e-6
"""Position rows whose smallest singular value is below this share of the largest are treated
as linearly dependent (no unique assignment)."""

MAX_WORDS_IN_DETAILS = 256
"""The most recovered words the report lists (a noisy update can light up the vocabulary)."""

CountMethod = Literal["auto", "distinct"]


class TextTokensParams(BaseModel):
    """Parameters of `text_tokens`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rtol: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="a row counts as looked up when its norm exceeds rtol times the largest row "
        "norm; 0 is the exact test (any non-zero row), a positive value tolerates defense noise",
    )
    counts: CountMethod = Field(
        "auto",
        description="auto: counts and order from the position-embedding gradient when one "
        "sequence is behind the update and its assignment rounds within count_tol (exact on a "
        "noise-free update), else each id once; distinct: always each recovered id once",
    )
    count_tol: float = Field(
        COUNT_TOL,
        ge=0.0,
        lt=0.5,
        description="largest distance of a least-squares position-assignment entry from 0 or 1 "
        "at which counts and order are accepted; the default keeps them exact (noise-free "
        "updates), up to 0.4 accepts them on lightly noised updates, where they are estimates",
    )


def _single(found: list[tuple[str, nn.Embedding]], preferred: str) -> str | None:
    if len(found) == 1:
        return found[0][0]
    named = [name for name, _ in found if name.rsplit(".", 1)[-1] == preferred]
    return named[0] if len(named) == 1 else None


def token_embedding_key(model: nn.Module, schema: TextSchema) -> str | None:
    """The state-dict key of the model's token embedding weight, or None.

    The token embedding is the one ``nn.Embedding`` with ``vocab_size`` rows; among several,
    the one named ``token_embedding``.

    Example:
        >>> net = nn.Module(); net.token_embedding = nn.Embedding(5, 3)
        >>> token_embedding_key(net, TextSchema(("<pad>", "<unk>", "a", "b", "c"), 4))
        'token_embedding.weight'
    """
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and m.num_embeddings == schema.vocab_size
    ]
    name = _single(found, "token_embedding")
    return None if name is None else f"{name}.weight"


def position_embedding_key(model: nn.Module, schema: TextSchema, token_key: str) -> str | None:
    """The state-dict key of the learned position embedding (``max_length`` rows), or None."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding)
        and m.num_embeddings == schema.max_length
        and f"{name}.weight" != token_key
    ]
    name = _single(found, "position_embedding")
    return None if name is None else f"{name}.weight"


class Assignment(NamedTuple):
    """The outcome of `position_assignment`.

    Attributes:
        owner: the index (into the token rows) of the token at each position, (L,); None when
            the assignment was refused or not tried.
        deviation: the largest distance of a least-squares entry from its rounded 0/1 value
            (inf when no assignment was tried).
        residual: ``|G_tok - A G_pos| / |G_tok|`` of the rounded assignment (inf when none).
    """

    owner: Tensor | None
    deviation: float
    residual: float


def position_assignment(
    token_rows: Tensor, position_rows: Tensor, *, tol: float = COUNT_TOL
) -> Assignment:
    """Which token row each position's row belongs to, when each token row is the sum of the
    rows of its positions (one sequence: ``G_tok[v] = sum of G_pos[l] over l with x_l = v``).

    Solves ``G_tok = W G_pos`` by least squares; the solution is unique when the position rows
    are linearly independent (at most as many positions as embedding dimensions), and on a
    noise-free gradient it is the 0/1 assignment itself. Each position goes to its largest
    entry; the assignment is accepted when no entry of ``W`` lies farther than `tol` from the
    rounded 0/1 matrix, every token owns a position, and the rounded assignment explains the
    token rows up to `MAX_RESIDUAL`.

    Args:
        token_rows: (k, D) the non-zero rows of the token-embedding gradient.
        position_rows: (L, D) the rows of the positions in use, in position order.
        tol: the largest accepted distance of an entry of ``W`` from 0 or 1 (below 0.5).

    Example:
        >>> p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        >>> t = torch.stack([p[1], p[0] + p[2]])  # token 0 at position 1, token 1 at 0 and 2
        >>> position_assignment(t, p).owner.tolist()
        [1, 0, 1]
    """
    tok, pos = token_rows.detach().double(), position_rows.detach().double()
    k, length = tok.shape[0], pos.shape[0]
    if k == 0 or length == 0 or length > pos.shape[1] or k > length:
        return Assignment(None, math.inf, math.inf)
    singular = torch.linalg.svdvals(pos)
    if float(singular[-1]) <= RANK_TOL * float(singular[0]):
        return Assignment(None, math.inf, math.inf)
    weights = torch.linalg.lstsq(pos.T, tok.T).solution.T  # (k, L)
    owner = weights.argmax(dim=0)
    rounded = nn.functional.one_hot(owner, k).T.double()
    deviation = float((weights - rounded).abs().max())
    residual = float((tok - rounded @ pos).norm() / tok.norm().clamp_min(1e-300))
    accepted = deviation <= tol and residual <= MAX_RESIDUAL and owner.unique().numel() == k
    return Assignment(owner if accepted else None, deviation, residual)


class TextTokensAttack(Reconstructs):
    """Recover the bag of words of the target's text batch from its token-embedding gradient.

    The ids of the rows with a non-zero gradient are the distinct tokens of the batch: exact
    on a FedSGD gradient; on a FedAvg model change, the union of the client's local batches
    (plain local SGD: weight decay would move every row); on the aggregate, the union of every
    included client's tokens. Counts (and the order) are exact when one sequence is behind a
    noise-free update (`position_assignment`; on a noised one, estimates accepted within
    `count_tol`); otherwise each recovered id appears once. Padding never
    appears: the padding row has no gradient. With ``rtol > 0`` rows below ``rtol`` times the
    largest row norm are dropped, which trades recall for precision under noise (DP).

    Melis et al., IEEE S&P 2019 (bag of words from embedding gradients); LAMP, Balunović et
    al., NeurIPS 2022, and TAG, Deng et al., EMNLP Findings 2021, start from this bag.
    Threat model: an honest-but-curious server that sees the update and knows the
    architecture (which tensor is the token embedding) and the public vocabulary.
    """

    name: ClassVar[str] = "text_tokens"

    def __init__(self, params: TextTokensParams) -> None:
        self.params = params

    def _update(self, obs: Observation) -> tuple[ClientUpdate | None, str | None]:
        """The target's update when the task is text and the shared preconditions hold."""
        if obs.task.text is None:
            return None, (
                f"{self.name} reads a token embedding; {obs.task.dataset} is "
                f"{obs.task.modality}, with no token sequences"
            )
        return checked_update(obs, attack=self.name)

    def _target(self, obs: Observation, model: nn.Module) -> tuple[ClientUpdate, str] | str:
        """The update and the token embedding's key, or the reason the attack cannot run: it
        needs a text task, the target's update, the architecture and the token embedding's
        part of the update."""
        update, reason = self._update(obs)
        if update is None:
            return str(reason)
        assert obs.task.text is not None
        key = token_embedding_key(model, obs.task.text)
        if key is None:
            return (
                f"the model has no single token embedding (an nn.Embedding with "
                f"{obs.task.text.vocab_size} rows, the vocabulary size)"
            )
        if key in update.withheld or key not in update.tensors:
            return f"the client withheld the token embedding's gradient ({key})"
        return update, key

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Read the bag of words (and, for one sequence, its counts and order) off the update."""
        target = self._target(obs, model)
        if isinstance(target, str):
            return not_applicable(self.name, obs, target)
        update, found = target
        started = time.perf_counter()
        schema = obs.task.text
        assert schema is not None
        grads, how = gradient_estimate(update, obs)
        ids = looked_up_rows(grads[found], rtol=self.params.rtol)
        ids = ids[ids != schema.pad_id]
        details: dict[str, object] = {
            "embedding": found,
            "gradient": how,
            "rtol": self.params.rtol,
            "distinct_tokens": int(ids.numel()),
        }
        if update.kind == "delta":
            details["note"] = (
                "a FedAvg model change: the union of the tokens of every local batch (exact "
                "for plain local SGD; weight decay would move every row)"
            )
        order = self._order(obs, model, update, grads, found, ids, details)
        if order is None:
            bag, tokens = ids, None
        else:
            bag = torch.sort(order).values
            tokens = torch.full((1, schema.max_length), schema.pad_id, dtype=torch.long)
            tokens[0, : order.numel()] = order
            details["sequence"] = schema.decode(tokens[0])
        words = [schema.vocab[int(i)] for i in ids]
        details["words"] = words[:MAX_WORDS_IN_DETAILS]
        if len(words) > MAX_WORDS_IN_DETAILS:
            details["words_not_listed"] = len(words) - MAX_WORDS_IN_DETAILS
        if progress is not None:
            progress(1, 1)
        return AttackResult(
            self.name,
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(bag=bag, tokens=tokens),
            seconds=time.perf_counter() - started,
            details=details,
        )

    def _order(
        self,
        obs: Observation,
        model: nn.Module,
        update: ClientUpdate,
        grads: dict[str, Tensor],
        token_key: str,
        ids: Tensor,
        details: dict[str, object],
    ) -> Tensor | None:
        """The sequence's token ids in order when counts are recoverable, else None; records
        the count method (and why) in `details`."""
        schema = obs.task.text
        assert schema is not None
        position_key = position_embedding_key(model, schema, token_key)
        used: Tensor | None = None
        if position_key is not None and position_key in grads:
            used = looked_up_rows(grads[position_key], rtol=self.params.rtol)
            details["longest_sequence"] = int(used.numel())
        why = self._no_counts(update, position_key, used)
        if why is None:
            assert position_key is not None and used is not None
            found = position_assignment(
                grads[token_key][ids], grads[position_key][used], tol=self.params.count_tol
            )
            details["assignment_deviation"] = found.deviation
            details["assignment_residual"] = found.residual
            if found.owner is not None:
                details["count_method"] = "positions"
                details["count_note"] = (
                    "one sequence: each token's gradient row is the sum of the position-"
                    "embedding rows of its positions (least squares, rounded); exact when the "
                    "update is noise-free"
                    + ("" if found.deviation <= COUNT_TOL else ", an estimate on this noisy one")
                )
                details["total_tokens"] = int(found.owner.numel())
                return ids[found.owner]
            why = (
                "the least-squares position assignment was refused (largest deviation from 0/1 "
                f"{found.deviation:.3g}, count_tol {self.params.count_tol}; relative residual "
                f"{found.residual:.3g})"
            )
        details["count_method"] = "distinct"
        details["count_note"] = f"each recovered id once: {why}"
        return None

    def _no_counts(
        self, update: ClientUpdate, position_key: str | None, used: Tensor | None
    ) -> str | None:
        """Why counts are not attempted, or None."""
        if self.params.counts == "distinct":
            return "counts: distinct was asked for"
        if update.num_examples != 1:
            return (
                f"{update.num_examples} sequences are behind the update; the gradient gives "
                "which ids occur, not how often"
            )
        if position_key is None or used is None:
            return "no learned position embedding in the update"
        if used.numel() == 0 or int(used[-1]) != used.numel() - 1:
            return "the position rows in use are not a prefix (not a right-padded sequence)"
        return None
