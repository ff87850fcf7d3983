"""Dataset encoding and truncation, collate, and the length-bucketed batch sampler."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from marn_fast.config import MARNConfig
from marn_fast.data import (
    DEFAULT_MAX_LENGTH,
    BucketBatchSampler,
    CCSMapper,
    CodingDataset,
    Document,
    LabelSpace,
    Vocabulary,
    build_ccs_label_space,
    compare_padding,
    padding_fraction,
)


def _lengths(n=203, seed=0):
    return np.maximum(np.exp(np.random.default_rng(seed).normal(np.log(300), 0.7, n)).astype(int), 1)


def test_default_max_length_comes_from_config():
    assert DEFAULT_MAX_LENGTH == MARNConfig(vocab_size=2, num_icd=1).max_length


def test_dataset_collate_and_truncation():
    docs = [Document("10", "1", "fever cough rash fever cough rash", ["401.9", "96.04"]),
            Document("11", "2", "pain", ["427.31", "999.99"]), Document("12", "3", "rash pain", ["401.9"])]
    vocab = Vocabulary(["cough", "fever", "rash"])
    icd = LabelSpace(["401.9", "427.31", "96.04"])
    mapper = CCSMapper("prefixed")
    with pytest.warns(UserWarning, match=r"2 code occurrences .* 96\.04 \(1\), 999\.99 \(1\)"):
        ccs = build_ccs_label_space([docs[0], docs[1]], mapper)
    assert ccs.codes == ["D:98", "D:106"]
    with pytest.warns(UserWarning) as record:
        ds = CodingDataset(docs, vocab, icd, ccs_space=ccs, ccs_mapper=mapper, max_length=4)
    messages = " ".join(str(w.message) for w in record)
    assert "1 of 3 documents truncated to max_length=4 (2 tokens dropped)" in messages
    assert "1 label occurrences (1 codes) have no column" in messages
    assert ds.stats["truncated"] == 1 and ds.stats["tokens_dropped"] == 2 and ds.stats["labels_outside_space"] == 1
    assert ds.lengths.tolist() == [4, 1, 2]
    batch = ds.collate([ds[0], ds[1], ds[2]])
    assert batch.tokens.dtype == torch.int64 and batch.lengths.dtype == torch.int64
    assert batch.tokens.tolist() == [[3, 2, 4, 3], [1, 0, 0, 0], [4, 1, 0, 0]]  # UNK = 1, right-padded with 0
    assert batch.lengths.tolist() == [4, 1, 2]
    assert batch.icd_targets.dtype == torch.float32
    assert batch.icd_targets.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 0]]  # 96.04 kept though unmapped in CCS
    assert batch.ccs_targets.tolist() == [[1, 0], [0, 1], [1, 0]]
    assert batch.ids == ["10", "11", "12"] and len(batch) == 3
    moved = batch.to("cpu")
    assert torch.equal(moved.tokens, batch.tokens)
    plain = CodingDataset(docs[:1], vocab, icd)
    assert plain.collate([plain[0]]).ccs_targets is None and plain.num_ccs == 0
    with pytest.raises(ValueError, match="ccs_space and ccs_mapper"):
        CodingDataset(docs, vocab, icd, ccs_space=ccs)
    with pytest.raises(ValueError, match="max_length"):
        CodingDataset(docs, vocab, icd, max_length=0)


def test_dataloader_yields_batches():
    docs = [Document(str(i), str(i), " ".join(["fever"] * (1 + i % 7)), ["401.9"]) for i in range(20)]
    ds = CodingDataset(docs, Vocabulary(["fever"]), LabelSpace(["401.9"]))
    sampler = BucketBatchSampler(ds.lengths, 4, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)
    batches = list(loader)
    assert sorted(i for b in batches for i in b.ids) == sorted(d.id for d in docs)
    assert all(b.tokens.shape[1] == int(b.lengths.max()) for b in batches)


@pytest.mark.parametrize("n, batch_size, replicas, drop_last", [(203, 16, 1, False), (203, 16, 3, False),
                                                              (100, 16, 2, False), (203, 16, 2, True),
                                                              (7, 3, 4, False)])
def test_sampler_covers_each_example_once(n, batch_size, replicas, drop_last):
    lengths = _lengths(n)
    seen = []
    per_rank = []
    for rank in range(replicas):
        sampler = BucketBatchSampler(lengths, batch_size, seed=5, num_replicas=replicas, rank=rank,
                                     drop_last=drop_last, pool_batches=3)
        sampler.set_epoch(2)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(1 <= len(b) <= batch_size for b in batches)
        if drop_last:
            assert all(len(b) == batch_size for b in batches)
        per_rank.append(len(batches))
        seen.extend(i for b in batches for i in b)
    assert len(set(per_rank)) == 1  # every rank gets the same number of batches (DDP needs it)
    assert len(seen) == len(set(seen))  # no example twice, within or across ranks
    if drop_last:
        assert len(seen) == (n // batch_size) // replicas * replicas * batch_size
    else:
        assert sorted(seen) == list(range(n))


def test_sampler_deterministic_and_reshuffles_per_epoch():
    lengths = _lengths()
    a, b = BucketBatchSampler(lengths, 8, seed=3), BucketBatchSampler(lengths, 8, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(a) == list(a)  # iterating again without set_epoch repeats the epoch
    assert list(BucketBatchSampler(lengths, 8, seed=4)) != list(b)
    ordered = list(BucketBatchSampler(lengths, 8, shuffle=False))
    flat = [i for batch in ordered for i in batch]
    assert np.all(np.diff(lengths[flat]) >= 0)  # evaluation order: sorted by length


def test_sampler_resumes_bit_exactly():
    lengths = _lengths()
    full = BucketBatchSampler(lengths, 8, seed=9)
    full.set_epoch(4)
    expected = list(full)
    interrupted = BucketBatchSampler(lengths, 8, seed=9)
    interrupted.set_epoch(4)
    it = iter(interrupted)
    head = [next(it) for _ in range(5)]
    state = interrupted.state_dict()
    assert state["epoch"] == 4 and state["batches_done"] == 5
    resumed = BucketBatchSampler(lengths, 8, seed=9)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # the trainer's usual call keeps the position
    assert head + list(resumed) == expected
    resumed.load_state_dict(interrupted.state_dict(batches_done=3))  # trainer consumed fewer (prefetch)
    assert list(resumed) == expected[3:]
    resumed.set_epoch(5)
    assert len(list(resumed)) == len(expected)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(lengths, 4, seed=9).load_state_dict(state)


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler([3, 4], 0)
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler([3, 4], 1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="cannot fill 4 replicas"):
        BucketBatchSampler([3, 4, 5], 2, num_replicas=4, rank=0)


def test_bucketing_pads_less_than_random_batching():
    lengths = _lengths(1000)
    result = compare_padding(lengths, 16, seed=0, epochs=3)
    assert result["bucketed"] < 0.5 * result["random"]
    assert 0.0 <= result["bucketed"] and result["random"] < 1.0
    assert padding_fraction([2, 4], [[0, 1]]) == pytest.approx(0.25)
    assert padding_fraction([5, 5, 1], [[0, 1], [2]]) == 0.0
