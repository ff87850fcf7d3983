"""DistributedDataParallel on the CPU (gloo, 2 processes): evaluation gathered over ranks equals
one process, and a training epoch leaves every rank with the same weights."""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from marn_fast import MARN, MARNConfig
from marn_fast.data import SYNTHETIC_PRESETS, write_synthetic_corpus
from marn_fast.metrics import evaluate
from marn_fast.training import DataSettings, Experiment, TrainConfig, Trainer, predict_loader

WORLD = 2


def _model(exp):
    torch.manual_seed(0)
    cfg = MARNConfig(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space), num_ccs=exp.num_ccs, hidden_size=8)
    return MARN(cfg)


def _worker(rank, folder, init_file, out_dir, results):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        exp = Experiment(DataSettings(folder, batch_size=4))
        model = _model(exp)
        result = predict_loader(model, exp.loader("dev"), torch.device("cpu"))
        trainer = Trainer(model, TrainConfig(max_epochs=1, progress=False), out_dir, exp.metadata())
        trainer.train_epoch(exp.loader("train"), 0)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        results[rank] = (result.ids, evaluate(result.icd_scores, result.icd_targets), flat)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    folder = tmp_path / "data"
    write_synthetic_corpus(folder, seed=4, **SYNTHETIC_PRESETS["test"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = Experiment(DataSettings(str(folder), batch_size=4))
    single = predict_loader(_model(exp), exp.loader("dev"), torch.device("cpu"))
    manager = mp.Manager()
    results = manager.dict()
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(str(folder), str(tmp_path / "init"), str(tmp_path / "out"), results), nprocs=WORLD)
    want = evaluate(single.icd_scores, single.icd_targets)
    for rank in range(WORLD):
        ids, got, _ = results[rank]
        assert sorted(ids) == sorted(single.ids) and len(ids) == len(set(ids))
        for key in ("auc_micro", "f1_micro", "p@5", "map"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    torch.testing.assert_close(results[0][2], results[1][2], atol=0, rtol=0)
