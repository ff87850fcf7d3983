"""Measuring the dispatch before epoch 1: every key a run's data will hit, one batch each.

The measured dispatcher (`marn_fast.ops.dispatch`) decides once per key (op, device, compute
dtype, train or infer, and each size rounded up to a power of two) and measures a new key on its
first call: at full codes on the CPU that is minutes for one training step. With length-bucketed
batches (`BucketBatchSampler`) a batch's key depends only on its size and its longest document,
so the keys of a run follow from its data:
  - the batches of this rank's current epoch (the dev loader, unshuffled, has only these);
  - for a shuffled loader, also a full batch ending at the longest document of every
    power-of-two length bucket that holds a document (in length order, the batch a sorted pool
    gives it): any later epoch's full batch has one of these keys. A short last batch that lands
    in another bucket in a later epoch is measured then (and says so in one line).
`key_batches` gives one batch of dataset indices per key (the longest, then the largest);
`tune_buckets` runs a step on each — `step(batch, train)`, the trainer's own (a training step's
forward and backward under the training's autocast, or an evaluation forward) — so that each key
is measured, or read from the cache, before the first epoch. On a terminal a progress bar shows
the batches and the dispatcher's one-line announcements print above it; elsewhere (a redirected
log) each batch gets a line before it runs, then the announcements of the keys it measured.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..ops import dispatch


def _batches(loader: Any, epoch: Optional[int]) -> tuple[Any, Optional[list[np.ndarray]]]:
    """(the loader's BucketBatchSampler-like sampler, this rank's batches of `epoch` (None: its
    current one)), or (None, None) for a loader without one."""
    sampler = getattr(loader, "batch_sampler", None)
    if sampler is None or not all(hasattr(sampler, a) for a in ("all_batches", "lengths", "batch_size")):
        return None, None
    return sampler, sampler.all_batches(epoch)[sampler.rank::sampler.num_replicas]


def key_batches(loader: Any, epoch: Optional[int] = None) -> list[np.ndarray]:
    """One batch of dataset indices per (bucket(batch size), bucket(longest length)) the loader's
    epochs can produce (module docstring; `epoch`: the one about to run), shortest bucket first;
    [] for a loader without a length-bucketed batch sampler."""
    sampler, batches = _batches(loader, epoch)
    if sampler is None or batches is None:
        return []
    lengths = np.asarray(sampler.lengths)
    candidates = list(batches)
    if sampler.shuffle:
        order = np.argsort(lengths, kind="stable")
        sorted_lengths = lengths[order]
        for top in sorted({dispatch.bucket(int(n)) for n in lengths}):
            last = int(np.searchsorted(sorted_lengths, top, side="right")) - 1  # the bucket's longest
            candidates.append(order[max(0, last - sampler.batch_size + 1): last + 1])
    best: dict = {}
    for batch in candidates:
        longest = int(lengths[batch].max())
        key = (dispatch.bucket(longest), dispatch.bucket(len(batch)))
        if key not in best or (longest, len(batch)) > (int(lengths[best[key]].max()), len(best[key])):
            best[key] = np.asarray(batch)
    return [best[key] for key in sorted(best)]


def tune_buckets(plan: Sequence[tuple[Any, np.ndarray, bool]], step: Callable[[Any, bool], None],
                 log: Callable[[str], None], progress: bool) -> dict:
    """Run step(batch, train) on each (loader, indices, train) of the plan, the batch collated
    from the loader's dataset; progress: a bar (announcements above it) instead of one log line
    per batch. Returns {"batches", "measured" (keys measured), "seconds"}."""
    start = time.perf_counter()
    seen = {row["key"] for row in dispatch.choices()}
    bar = tqdm(total=len(plan), desc="measuring the dispatch", leave=False, disable=not progress)
    sink = (lambda line: tqdm.write(line, file=sys.stderr)) if progress else log  # above the bar (stderr)
    try:
        with dispatch.announcements(sink):
            for i, (loader, indices, train) in enumerate(plan, 1):
                batch = loader.collate_fn([loader.dataset[int(j)] for j in indices])
                longest = int(batch.lengths.max())
                text = (f"dispatch {i}/{len(plan)}: {'training step' if train else 'evaluation'} at B={len(indices)}, "
                        f"n={longest} (buckets B={dispatch.bucket(len(indices))}, n={dispatch.bucket(longest)})")
                if progress:
                    bar.set_postfix_str(text.split(": ", 1)[1])
                else:
                    log(text)
                step(batch, train)
                bar.update(1)
    finally:
        bar.close()
    measured = sum(1 for row in dispatch.choices() if row["key"] not in seen and row["source"] == "measured")
    return {"batches": len(plan), "measured": measured, "seconds": time.perf_counter() - start}


def plan_for(loaders: Iterable[tuple[Any, bool]], epoch: Optional[int] = None) -> list[tuple[Any, np.ndarray, bool]]:
    """The plan of `tune_buckets` for (loader, train) pairs: each loader's `key_batches`."""
    return [(loader, indices, train) for loader, train in loaders if loader is not None
            for indices in key_batches(loader, epoch)]
