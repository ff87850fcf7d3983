"""End to end: synthetic corpus → reader → labels, vocabulary, word2vec → batches → a MARN step."""
import pytest
import torch
from torch.utils.data import DataLoader

from marn_fast import MARN, MARNConfig
from marn_fast.data import (
    BucketBatchSampler,
    CCSMapper,
    CodingDataset,
    Vocabulary,
    build_ccs_label_space,
    build_icd_label_space,
    load_caml_splits,
    train_word2vec,
    write_synthetic_corpus,
)


@pytest.mark.filterwarnings("ignore:CodingDataset")
def test_synthetic_corpus_feeds_marn(tmp_path):
    write_synthetic_corpus(tmp_path, num_docs=40, seed=2, median_tokens=40, num_codes=30)
    corpus = load_caml_splits(tmp_path, "full")
    icd = build_icd_label_space(corpus.train, corpus.dev, corpus.test)
    mapper = CCSMapper("merged")
    ccs = build_ccs_label_space(corpus.train, mapper, corpus.dev, corpus.test)
    vocab = Vocabulary.build(d.tokens for d in corpus.train)
    embeddings = train_word2vec([d.text for d in corpus.train], vocab, dim=16, epochs=1, seed=0)
    data = CodingDataset(corpus.train, vocab, icd, ccs_space=ccs, ccs_mapper=mapper, max_length=64)
    loader = DataLoader(data, batch_sampler=BucketBatchSampler(data.lengths, 4, seed=0), collate_fn=data.collate)
    batch = next(iter(loader))
    config = MARNConfig(vocab_size=len(vocab), num_icd=len(icd), num_ccs=len(ccs), embed_dim=16, hidden_size=8)
    model = MARN.from_pretrained(config, embeddings, backend="reference")
    out = model(batch.tokens, batch.lengths)
    assert out.icd_logits.shape == batch.icd_targets.shape and out.ccs_logits.shape == batch.ccs_targets.shape
    loss = model.compute_loss(out, batch.icd_targets, batch.ccs_targets)
    loss.backward()
    assert torch.isfinite(loss)

