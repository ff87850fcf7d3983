"""Tensors for training: a Dataset of encoded documents, a length-bucketed batch sampler, and
the collate that builds a `Batch`.

Bucketing: each epoch the examples are shuffled (seeded by seed and epoch), cut into pools of
`pool_batches · batch_size`, each pool sorted by length and cut into batches, and the batches
shuffled. Similar lengths share a batch, so padding shrinks (measure it with
`compare_padding`), while batch composition and order still change every epoch.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..config import MARNConfig
from .caml import Document
from .ccs import CCSMapper
from .labels import LabelSpace
from .vocab import PAD_ID, Vocabulary

DEFAULT_MAX_LENGTH = next(f.default for f in dataclasses.fields(MARNConfig) if f.name == "max_length")
DEFAULT_POOL_BATCHES = 100


@dataclasses.dataclass
class Batch:
    """A collated batch. tokens [B, n] int64 right-padded with PAD = 0 (n = the longest
    length in the batch); lengths [B] int64; icd_targets [B, num_icd] float32 multi-hot;
    ccs_targets [B, num_ccs] float32 or None; ids: the documents' HADM_IDs."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    icd_targets: torch.Tensor
    ccs_targets: torch.Tensor | None
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.tokens), move(self.lengths), move(self.icd_targets), move(self.ccs_targets), self.ids)

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True)."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.tokens), pin(self.lengths), pin(self.icd_targets), pin(self.ccs_targets), self.ids)


class Example(NamedTuple):
    id: str
    token_ids: np.ndarray  # int32 [length]
    icd: np.ndarray  # int64 label indices
    ccs: np.ndarray | None  # int64 label indices


class CodingDataset(Dataset):
    """Documents encoded once: token ids (truncated to max_length), ICD and CCS label indices.

    documents: from `load_caml_splits`. vocab: a `Vocabulary`. icd_space: the ICD `LabelSpace`.
    ccs_space and ccs_mapper: both or neither (None: no CCS targets). max_length: tokens kept
    per document (default MARNConfig's).

    `stats`: documents, truncated (documents longer than max_length), tokens_dropped,
    labels_outside_space (code occurrences with no column in icd_space, e.g. a test code unseen
    in training) and codes_outside_space (Counter). Truncation and outside-space labels are
    reported by one warning each.
    """

    def __init__(self, documents: Sequence[Document], vocab: Vocabulary, icd_space: LabelSpace, *,
                 ccs_space: LabelSpace | None = None, ccs_mapper: CCSMapper | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH):
        if (ccs_space is None) != (ccs_mapper is None):
            raise ValueError("ccs_space and ccs_mapper must be given together (or neither), got "
                             f"ccs_space={ccs_space!r}, ccs_mapper={ccs_mapper!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
        self.vocab, self.icd_space, self.ccs_space, self.max_length = vocab, icd_space, ccs_space, max_length
        self.ids: list[str] = []
        self._tokens: list[np.ndarray] = []
        self._icd: list[np.ndarray] = []
        self._ccs: list[np.ndarray] | None = [] if ccs_space is not None else None
        outside: Counter = Counter()
        truncated = dropped = 0
        for doc in documents:
            tokens = doc.tokens
            if not tokens:
                raise ValueError(f"documents: document {doc.id} has no tokens")
            if len(tokens) > max_length:
                truncated += 1
                dropped += len(tokens) - max_length
                tokens = tokens[:max_length]
            self.ids.append(doc.id)
            self._tokens.append(vocab.encode(tokens).astype(np.int32))
            found, missing = icd_space.indices(doc.labels)
            outside.update(missing)
            self._icd.append(np.asarray(found, dtype=np.int64))
            if self._ccs is not None:
                ccs_found, _ = ccs_space.indices(ccs_mapper.map_codes(doc.labels))
                self._ccs.append(np.asarray(ccs_found, dtype=np.int64))
        if ccs_mapper is not None:
            ccs_mapper.warn_unmapped()
        self.lengths = np.fromiter((len(t) for t in self._tokens), dtype=np.int64, count=len(self._tokens))
        self.stats = {"documents": len(self.ids), "truncated": truncated, "tokens_dropped": dropped,
                      "labels_outside_space": sum(outside.values()), "codes_outside_space": outside}
        if truncated:
            warnings.warn(f"CodingDataset: {truncated} of {len(self.ids)} documents truncated to max_length="
                          f"{max_length} ({dropped} tokens dropped)", stacklevel=2)
        if outside:
            warnings.warn(f"CodingDataset: {sum(outside.values())} label occurrences ({len(outside)} codes) have no "
                          f"column in the {icd_space.name} label space, e.g. {sorted(outside)[:5]}", stacklevel=2)

    @property
    def num_icd(self) -> int:
        return len(self.icd_space)

    @property
    def num_ccs(self) -> int:
        return 0 if self.ccs_space is None else len(self.ccs_space)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Example:
        return Example(self.ids[i], self._tokens[i], self._icd[i], None if self._ccs is None else self._ccs[i])

    def collate(self, examples: Sequence[Example]) -> Batch:
        """DataLoader collate_fn for this dataset."""
        return collate(examples, self.num_icd, self.num_ccs if self._ccs is not None else None)


def collate(examples: Sequence[Example], num_icd: int, num_ccs: int | None) -> Batch:
    """Pad token ids to the longest example (right-padded with PAD) and build multi-hot targets.
    num_ccs None: ccs_targets is None."""
    if not examples:
        raise ValueError("examples: empty batch")
    lengths = torch.tensor([len(e.token_ids) for e in examples], dtype=torch.int64)
    tokens = torch.full((len(examples), int(lengths.max())), PAD_ID, dtype=torch.int64)
    icd = torch.zeros(len(examples), num_icd, dtype=torch.float32)
    ccs = None if num_ccs is None else torch.zeros(len(examples), num_ccs, dtype=torch.float32)
    for row, example in enumerate(examples):
        tokens[row, : len(example.token_ids)] = torch.from_numpy(example.token_ids.astype(np.int64))
        icd[row, torch.from_numpy(example.icd)] = 1.0
        if ccs is not None:
            ccs[row, torch.from_numpy(example.ccs)] = 1.0
    return Batch(tokens, lengths, icd, ccs, [e.id for e in examples])


def _distributed_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if initialised else 1)
        rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"num_replicas must be >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
    return num_replicas, rank


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches of dataset indices, DistributedSampler-compatible.

    lengths: each example's (truncated) length, e.g. `CodingDataset.lengths`. Each epoch has
    ceil(N / batch_size) batches rounded up to a multiple of num_replicas (drop_last: floor,
    rounded down, and every batch full); batches hold at most batch_size examples, and every
    example is in exactly one batch of one rank (drop_last: at most one). Rank r gets the
    shuffled batches r, r + num_replicas, ..., so all ranks get the same number.

    shuffle=False: one pool sorted by length, batches in order (evaluation).
    pool_batches: batches per sorting pool (None: the whole dataset in one pool).
    Deterministic given seed and epoch; call set_epoch(e) each epoch as with DistributedSampler.
    state_dict()/load_state_dict() resume mid-epoch bit-exactly.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, drop_last: bool = False,
                 pool_batches: int | None = DEFAULT_POOL_BATCHES):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {self.lengths.shape}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if pool_batches is not None and pool_batches < 1:
            raise ValueError(f"pool_batches must be >= 1 or None, got {pool_batches!r}")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.pool_batches = pool_batches
        self.num_replicas, self.rank = _distributed_defaults(num_replicas, rank)
        n, r = len(self.lengths), self.num_replicas
        if drop_last:
            self.num_batches = (n // batch_size) // r * r
        else:
            self.num_batches = math.ceil(math.ceil(n / batch_size) / r) * r
        if self.num_batches == 0 or self.num_batches > n:
            raise ValueError(f"lengths: {n} examples cannot fill {r} replicas with batch_size={batch_size}, "
                             f"drop_last={drop_last}")
        self.epoch = 0
        self._position = 0  # batches of the current epoch already yielded on this rank

    def __len__(self) -> int:
        return self.num_batches // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._position = epoch, 0

    def all_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """Every rank's batches of an epoch (before sharding), in order."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.drop_last:
            order = order[: self.num_batches * self.batch_size]
        pool = len(order) if self.pool_batches is None or not self.shuffle else self.pool_batches * self.batch_size
        chunks = [order[i: i + pool] for i in range(0, len(order), pool)]
        ordered = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
        sizes, remaining = [], len(ordered)
        for i in range(self.num_batches):
            size = min(self.batch_size, remaining - (self.num_batches - i - 1))
            sizes.append(size)
            remaining -= size
        batches = np.split(ordered, np.cumsum(sizes)[:-1])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.all_batches()[self.rank:: self.num_replicas]
        if self._position >= len(batches):
            self._position = 0
        while self._position < len(batches):
            batch = batches[self._position]
            self._position += 1
            yield batch.tolist()

    def state_dict(self, batches_done: int | None = None) -> dict:
        """The position to resume from. batches_done: batches of this epoch the trainer has
        consumed (pass it when a DataLoader prefetches ahead of the training loop); default:
        the batches this sampler has yielded."""
        return {"epoch": self.epoch, "batches_done": self._position if batches_done is None else batches_done,
                "seed": self.seed, "num_examples": len(self.lengths), "batch_size": self.batch_size,
                "num_replicas": self.num_replicas, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_examples", "batch_size", "num_replicas", "rank"):
            mine = len(self.lengths) if key == "num_examples" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(f"state: {key} is {state[key]} but this sampler has {mine}")
        if not 0 <= state["batches_done"] <= len(self):
            raise ValueError(f"state: batches_done must be in [0, {len(self)}], got {state['batches_done']}")
        self.epoch, self._position = state["epoch"], state["batches_done"]


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Fraction of the padded token grid that is padding: 1 - Σ lengths / Σ_b |b| · max_{i∈b} len_i."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = grid = 0
    for batch in batches:
        batch_lengths = lengths[np.asarray(batch, dtype=np.int64)]
        real += int(batch_lengths.sum())
        grid += len(batch_lengths) * int(batch_lengths.max())
    if grid == 0:
        raise ValueError("batches: no tokens")
    return 1.0 - real / grid


def compare_padding(lengths: Sequence[int], batch_size: int, *, max_length: int = DEFAULT_MAX_LENGTH,
                    seed: int = 0, epochs: int = 1, pool_batches: int | None = DEFAULT_POOL_BATCHES) -> dict:
    """Padding fraction of length-bucketed vs random batches (lengths truncated to max_length),
    averaged over `epochs` epochs: {"bucketed", "random", "batch_size", "max_length", ...}."""
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), max_length)
    sampler = BucketBatchSampler(lengths, batch_size, seed=seed, num_replicas=1, rank=0, pool_batches=pool_batches)
    bucketed = [padding_fraction(lengths, sampler.all_batches(e)) for e in range(epochs)]
    rand = []
    for e in range(epochs):
        order = np.random.default_rng([seed, e, 1]).permutation(len(lengths))
        rand.append(padding_fraction(lengths, [order[i: i + batch_size] for i in range(0, len(order), batch_size)]))
    return {"bucketed": float(np.mean(bucketed)), "random": float(np.mean(rand)), "batch_size": batch_size,
            "max_length": max_length, "pool_batches": pool_batches, "num_examples": len(lengths), "epochs": epochs}
