"""marn_fast.data: corpora, labels, vocabulary, embeddings and batches for MARN.

Sources (all produce the same CAML-format folder, read by `load_caml_splits`):
    write_synthetic_corpus(out_dir, num_docs, seed)      the embedded default (no MIMIC needed)
    prepare_mimic3(mimic_dir, out_dir, splits_dir=None)  MIMIC-III v1.4 tables
    prepare_mimic4(mimic_dir, out_dir, icd_version=10)   MIMIC-IV (+ MIMIC-IV-Note)

Then (marn_fast.training.experiment does this for the trainer):
    corpus = load_caml_splits(folder, setting="full")                  # or "50"
    icd = build_icd_label_space(corpus.train)                          # (+ dev, test for the union)
    mapper = CCSMapper("merged", procedure_table=".../prref2015.csv")  # or CCSMapper.from_hcup_dir
    ccs = build_ccs_label_space(corpus.train, mapper)
    vocab = Vocabulary.build(d.tokens for d in corpus.train)           # min_doc_freq=3
    emb = train_word2vec([d.text for d in corpus.train], vocab, cache_dir=...)
    ds = CodingDataset(corpus.train, vocab, icd, ccs_space=ccs, ccs_mapper=mapper, max_length=4000)
    sampler = BucketBatchSampler(ds.lengths, batch_size=16, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)   # yields Batch
"""
from .batching import (
                       DEFAULT_MAX_LENGTH,
                       Batch,
                       BucketBatchSampler,
                       CodingDataset,
                       Example,
                       collate,
                       compare_padding,
                       padding_fraction,
)
from .caml import (
                       CAML_COLUMNS,
                       CamlCorpus,
                       Document,
                       load_caml_splits,
                       parse_labels,
                       read_caml_csv,
                       tokenize,
                       write_caml_csv,
)
from .ccs import CCS_MODES, CCSMapper, build_ccs_label_space, read_hcup_table
from .codes import (
                       format_icd9_diagnosis,
                       format_icd9_procedure,
                       format_icd10_diagnosis,
                       format_icd10_procedure,
                       icd9_code_type,
)
from .embeddings import embedding_matrix, train_word2vec
from .labels import DEFAULT_TOP_K, LabelSpace, build_icd_label_space, restrict_to_codes, top_k_codes
from .mimic import prepare_mimic3, prepare_mimic4
from .splits import patient_split, read_hadm_ids
from .synthetic import SYNTHETIC_PRESETS, write_synthetic_corpus
from .vocab import MIN_DOC_FREQ, PAD_ID, UNK_ID, Vocabulary

__all__ = [
    "Batch", "BucketBatchSampler", "CAML_COLUMNS", "CCSMapper", "CCS_MODES", "CamlCorpus", "CodingDataset",
    "DEFAULT_MAX_LENGTH", "DEFAULT_TOP_K", "Document", "Example", "LabelSpace", "MIN_DOC_FREQ", "PAD_ID",
    "SYNTHETIC_PRESETS", "UNK_ID", "Vocabulary", "build_ccs_label_space", "build_icd_label_space", "collate",
    "compare_padding", "embedding_matrix", "format_icd10_diagnosis", "format_icd10_procedure",
    "format_icd9_diagnosis", "format_icd9_procedure", "icd9_code_type", "load_caml_splits", "padding_fraction",
    "parse_labels", "patient_split", "prepare_mimic3", "prepare_mimic4", "read_caml_csv", "read_hadm_ids",
    "read_hcup_table", "restrict_to_codes", "tokenize", "top_k_codes", "train_word2vec", "write_caml_csv",
    "write_synthetic_corpus",
]
