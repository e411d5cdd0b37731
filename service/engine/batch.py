"""The running batch of the local engine: one left-padded KV cache shared by every sequence being decoded.

Continuous batching needs three operations between decode steps, none of which ``generate`` offers: *join*
(append rows prefilled on their own, padding the shorter side on the left), *leave* (drop finished rows) and
*trim* (drop leading columns that are padding in every remaining row). Positions come from the attention mask,
so a row's padding never shifts its positions.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class KVBatch:
    """The cache and attention mask of the rows currently decoding, in row order."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 for real tokens

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append rows that were prefilled together (their cache and mask) below the current ones."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, length, 2), _pad_left(theirs.keys, length, 2)])
            mine.values = torch.cat([_pad_left(mine.values, length, 2), _pad_left(theirs.values, length, 2)])
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(mask, length, 1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); then drop columns no remaining row uses."""
        if not rows:
            self.cache = self.mask = None
            return
        if len(rows) != self.rows:
            index = torch.tensor(rows, device=self.mask.device)
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            self.mask = self.mask[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend the mask by one real column for the tokens fed this step; return (mask, position_ids)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask, self.mask.sum(dim=1, keepdim=True) - 1


def prefill_inputs(prompts: list[list[int]], pad_id: int, device: torch.device):
    """Left-padded ids, mask and positions for prompts prefilled together."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)
