"""The datasets as in-memory tensors behind a LightningDataModule."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler,
                              TensorDataset)

from src.data.datasets import REGRESSION, in_kind, load_arrays


class ArrayDataModule(L.LightningDataModule):
    """A dataset of src.data.datasets as tensors: shuffled training batches (seeded; in order with
    shuffle=False, so that two runs can be given the same batches), whole-set validation."""

    def __init__(self, name: str, batch_size: int, seed: int = 0, shuffle: bool = True, **opts):
        super().__init__()
        self.shuffle = bool(shuffle)
        if int(batch_size) <= 0:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}")
        self.batch_size = int(batch_size)
        x_tr, y_tr, x_va, y_va = load_arrays(name, seed, **opts)
        self.train_set = TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr))
        self.val_set = TensorDataset(torch.from_numpy(x_va), torch.from_numpy(y_va))
        self.in_kind = in_kind(name)
        # what the net's first layer takes: the number of tokens, features per step, or features
        self.in_dim = (int(opts["vocab"]) if self.in_kind == "tokens" else
                       x_tr.shape[2] if self.in_kind == "sequence" else x_tr.shape[1])
        self.task = "regression" if name in REGRESSION else "classification"
        # outputs of the net: one per class, or one per target column for regression
        self.n_classes = y_tr.shape[1] if self.task == "regression" else int(max(y_tr.max(), y_va.max())) + 1
        self.seed = seed
        self.constant_loss = constant_loss(y_tr, self.task)

    # In-memory tensors, so no worker processes (they would cost more than they save), and whole batches
    # are fetched with one index op per tensor: the default loader fetches sample by sample and stacks
    # them, a cost per batch comparable to a small net's step. Same sampler, same generator: the same
    # batches in the same order as DataLoader(shuffle=True, generator=g).
    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        if self.trainer is not None and self.trainer.world_size > 1:
            # several processes: rank r of W takes samples r, r + W, ... of the (per epoch, seeded) order, so a
            # step's global batch is W x data.batch_size consecutive samples. Our own DistributedSampler, as
            # Lightning's would shuffle whatever data.shuffle says.
            part = DistributedSampler(self.train_set, num_replicas=self.trainer.world_size,
                                      rank=self.trainer.global_rank, shuffle=self.shuffle, seed=self.seed)
            return DataLoader(self.train_set, batch_size=self.batch_size, sampler=part)
        order = RandomSampler(self.train_set, generator=g) if self.shuffle else SequentialSampler(self.train_set)
        return _batched(self.train_set, order, self.batch_size, g)

    def val_dataloader(self):
        return _batched(self.val_set, SequentialSampler(self.val_set), 1024)


def constant_loss(y, task: str) -> float:
    """The training loss of the best constant prediction: the targets' variance (MSE of their mean), or the
    labels' entropy (cross-entropy of their frequencies)."""
    if task == "regression":
        return float(((y - y.mean(axis=0)) ** 2).mean())
    p = np.bincount(y) / len(y)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _batched(data: TensorDataset, order, batch_size: int, generator=None) -> DataLoader:
    # the loader draws its base seed from the generator before the sampler's permutation, as it did before
    return DataLoader(data, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None,
                      generator=generator)
