"""What an embedding layer's gradient gives away: which of its rows a batch looked up."""

from __future__ import annotations

import torch
from torch import Tensor


def looked_up_rows(grad: Tensor, *, rtol: float = 0.0) -> Tensor:
    """Ids of the rows of an embedding-weight gradient that are non-zero, ascending.

    An ``nn.Embedding`` row receives a gradient only when the batch looked it up (the row of a
    token, of a diagnosis code), so on an exact gradient the non-zero rows are exactly the ids
    present (Melis et al., "Exploiting Unintended Feature Leakage in Collaborative Learning",
    S&P 2019, section on the bag of words). A row counts as non-zero when its L2 norm exceeds
    `rtol` times the largest row norm; ``rtol = 0`` is the exact test, a positive `rtol`
    tolerates noise added by a defense (at the price of false ids).

    Args:
        grad: (num_ids, dim) the gradient (or negated model change) of the embedding weight.
        rtol: the relative norm below which a row counts as untouched.

    Example:
        >>> g = torch.zeros(5, 2); g[1] = 1.0; g[3, 0] = -0.5
        >>> looked_up_rows(g).tolist()
        [1, 3]
        >>> looked_up_rows(g, rtol=0.6).tolist()
        [1]
    """
    if grad.dim() != 2:
        raise ValueError(f"an embedding gradient is (num_ids, dim); got {tuple(grad.shape)}")
    norms = grad.detach().to(torch.float64).norm(dim=1)
    top = float(norms.max()) if norms.numel() else 0.0
    if top == 0.0:
        return torch.zeros(0, dtype=torch.long)
    return torch.nonzero(norms > rtol * top).flatten()
