"""The `marn-fast` command line. Nothing imports this module.

Every sub-command turns bad input into a one-line error and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .config_files import RECIPES, apply_config

if TYPE_CHECKING:
    from .training import DataSettings, TrainConfig

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- bench-step
def _bench_step(args) -> int:
    import torch

    from . import MARN, MARNConfig, reference
    from .training.precision import autocast, resolve_precision

    precision = resolve_precision(args.precision, "cpu")
    torch.manual_seed(args.seed)
    cfg = MARNConfig(vocab_size=args.vocab, num_icd=args.icd, num_ccs=args.ccs, hidden_size=args.hidden,
                     max_length=max(args.length, MARNConfig.__dataclass_fields__["max_length"].default))
    tokens = torch.randint(2, args.vocab, (args.batch, args.length))
    lengths = torch.randint(args.length // 2, args.length + 1, (args.batch,))
    lengths[0] = args.length
    for b, length in enumerate(lengths.tolist()):
        tokens[b, length:] = 0
    y_icd = (torch.rand(args.batch, args.icd) < 0.01).float()
    y_ccs = (torch.rand(args.batch, args.ccs) < 0.05).float() if args.ccs else None
    models = {"reference": reference.MARN(cfg)}
    fast = MARN(cfg, backend=args.backend)
    fast.load_state_dict(models["reference"].state_dict())
    models[f"marn_fast.MARN ({fast.backend})"] = fast
    print(f"MARN at C={cfg.feature_size}, L_icd={args.icd}, L_ccs={args.ccs}, batch {args.batch} x {args.length} "
          f"tokens, {torch.get_num_threads()} CPU threads, {precision}")
    for name, model in models.items():
        model.train()
        torch.manual_seed(args.seed)  # the same dropout masks for every model
        start = time.perf_counter()
        with autocast("cpu", precision):
            out = model(tokens, lengths)
            loss = model.compute_loss(out, y_icd, y_ccs)
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        ccs_shape = tuple(out.ccs_logits.shape) if out.ccs_logits is not None else None
        print(f"  {name:32s} icd_logits {tuple(out.icd_logits.shape)} ccs_logits {ccs_shape} "
              f"loss {loss.item():.6f}  forward {args.batch / (mid - start):7.2f} docs/s  "
              f"forward+backward {args.batch / (end - start):7.2f} docs/s")
    return 0


def _add_precision(p: argparse.ArgumentParser) -> None:
    from .training.precision import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="fp32 (the exact model), bf16 (torch.autocast on the CPU or CUDA: bf16 GEMMs and "
                        "convolutions, fp32 statistics; see `marn-fast info` for this CPU's bf16 units) or auto "
                        "(bf16 on CUDA, fp32 on the CPU)")


def _add_bench_step(sub) -> None:
    p = sub.add_parser("bench-step", help="time one training step of MARN at the official sizes on random tokens")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1000)
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--icd", type=int, default=8921)
    p.add_argument("--ccs", type=int, default=295)
    p.add_argument("--hidden", type=int, default=300)
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    _add_precision(p)
    p.set_defaults(func=_bench_step)


# ----------------------------------------------------------------------------- data
def _synth(args) -> int:
    from .data import SYNTHETIC_PRESETS, write_synthetic_corpus

    params = dict(SYNTHETIC_PRESETS[args.preset])
    if args.docs is not None:
        params["num_docs"] = args.docs
    summary = write_synthetic_corpus(args.out, seed=args.seed, **params)
    print(f"wrote {summary['files']} to {summary['out_dir']} ({summary['codes_used']} codes, "
          f"median {summary['tokens']['median']:.0f} tokens per note)")
    return 0


def _prepare_mimic3(args) -> int:
    from .data import prepare_mimic3
    from .data.caml_top50 import CAML_TOP50_CODES

    top_codes = CAML_TOP50_CODES if args.top50 == "caml" else None
    summary = prepare_mimic3(args.mimic_dir, args.out, splits_dir=args.splits, seed=args.seed, top_codes=top_codes)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _prepare_mimic4(args) -> int:
    from .data import prepare_mimic4

    summary = prepare_mimic4(args.mimic_dir, args.out, splits_dir=args.splits, icd_version=args.icd_version,
                             seed=args.seed)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _add_data_commands(sub) -> None:
    from .data import SYNTHETIC_PRESETS

    p = sub.add_parser("synth", help="write the embedded synthetic corpus (CAML-format CSVs)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--docs", type=int, default=None, help="number of notes (default: the preset's)")
    p.add_argument("--preset", choices=sorted(SYNTHETIC_PRESETS), default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)
    for name, func, help_text in (("prepare-mimic3", _prepare_mimic3, "CAML-format splits from MIMIC-III v1.4 tables"),
                                  ("prepare-mimic4", _prepare_mimic4,
                                   "CAML-format splits from MIMIC-IV (+ MIMIC-IV-Note)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--mimic-dir", required=True, help="folder with the MIMIC tables (.csv or .csv.gz)")
        p.add_argument("--out", required=True, help="output folder for {train,dev,test}_{full,50}.csv")
        p.add_argument("--splits", default=None, help="folder with *_hadm_ids.csv split files (default: patient split)")
        p.add_argument("--seed", type=int, default=0)
        if name == "prepare-mimic4":
            p.add_argument("--icd-version", type=int, choices=(9, 10), default=10)
        else:
            p.add_argument("--top50", choices=("caml", "frequency"), default="caml",
                           help="codes of the *_50.csv files: CAML's published 50, or the 50 most frequent")
        p.set_defaults(func=func)


# ----------------------------------------------------------------------------- train / demo
MODEL_FLAGS = ("hidden_size", "embed_dim", "dropout", "loss", "focal_alpha", "focal_gamma", "focal_balanced",
               "lambda_icd", "lambda_ccs", "encoder", "num_filter_maps", "filter_size")
# --model laat: LAATConfig's options; the MARN-only ones must stay at their defaults.
LAAT_FLAGS = ("hidden_size", "embed_dim", "dropout", "loss", "focal_alpha", "focal_gamma", "focal_balanced", "d_a")
MARN_ONLY_FLAGS = ("lambda_icd", "lambda_ccs", "encoder", "num_filter_maps", "filter_size", "no_ram", "no_mtl")
# Flags whose default depends on --model (their parser default is None): `model_dependent_default`.
MODEL_DEPENDENT_FLAGS = ("hidden_size", "dropout", "loss", "batch_size", "patience")


def model_dependent_default(model: str, name: str) -> Any:
    """The default of a MODEL_DEPENDENT_FLAGS flag: for --model laat LAAT_TRAINING's or LAATConfig's,
    for marn MARNConfig's, DataSettings' or TrainConfig's."""
    from .config import LAAT_TRAINING, LAATConfig, MARNConfig
    from .training import DataSettings, TrainConfig

    if model == "laat":
        return LAAT_TRAINING[name] if name in LAAT_TRAINING else _default(LAATConfig, name)
    owner = next(cls for cls in (MARNConfig, DataSettings, TrainConfig)
                 if name in {f.name for f in dataclasses.fields(cls)})
    return _default(owner, name)


def resolve_model_options(args: argparse.Namespace) -> None:
    """Fill the MODEL_DEPENDENT_FLAGS left unset from --model's defaults; a ValueError for options
    that do not apply to the model (MARN-only ones changed with --model laat, --d-a with marn)."""
    model = getattr(args, "model", "marn")
    for name in MODEL_DEPENDENT_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, model_dependent_default(model, name))
    if model == "laat":
        changed = [name for name in MARN_ONLY_FLAGS
                   if getattr(args, name) != (False if name.startswith("no_") else model_default(name))]
        if changed:
            raise ValueError(f"--model laat: {', '.join('--' + n.replace('_', '-') for n in changed)} "
                             "apply to --model marn only (LAAT has no RAM, no CCS head and a BiLSTM encoder)")
    elif getattr(args, "d_a", None) is not None or getattr(args, "no_attention_mask", False):
        raise ValueError("--d-a and --no-attention-mask apply to --model laat only")


def _train_settings(args: argparse.Namespace) -> tuple["DataSettings", "TrainConfig", dict[str, Any]]:
    """(DataSettings, TrainConfig, model options) of a train/demo run; writes the synthetic corpus
    first when --data synth has none yet."""
    if args.data == "synth":
        data_dir = Path(args.data_dir or Path(args.out) / "data")
        if not (data_dir / "train_full.csv").exists():
            from .data import SYNTHETIC_PRESETS, write_synthetic_corpus

            write_synthetic_corpus(data_dir, seed=args.seed, **SYNTHETIC_PRESETS[args.synth_preset])
    else:
        if not args.data_dir:
            raise CLIError(f"--data-dir is required with --data {args.data}")
        data_dir = Path(args.data_dir)
    return settings_from_args(args, data_dir)


def settings_from_args(args: argparse.Namespace,
                       data_dir: str | Path) -> tuple["DataSettings", "TrainConfig", dict[str, Any]]:
    """The options of a train/demo run as (DataSettings, TrainConfig, model options); each checks
    its values (ValueError naming the option)."""
    from .training import DataSettings, TrainConfig

    resolve_model_options(args)
    laat = getattr(args, "model", "marn") == "laat"
    settings = DataSettings(data_dir=str(data_dir), setting=args.labels, top50=args.top50,
                            ccs="none" if args.no_mtl or laat else args.ccs,
                            hcup_dir=args.hcup_dir, label_union=args.label_union, max_length=args.max_length,
                            batch_size=args.batch_size, seed=args.seed,
                            source="codiesp" if args.data == "codiesp" else "caml", language=args.language,
                            codes=args.codes, aux=args.aux, procedure_aux=args.procedure_aux,
                            min_doc_freq=args.min_doc_freq, word2vec_epochs=args.word2vec_epochs)
    metric = args.metric or ("map" if args.data == "codiesp" else _default(TrainConfig, "metric"))
    train = TrainConfig(lr=args.lr, weight_decay=args.weight_decay, decay_matrices_only=args.decay_matrices_only,
                        grad_clip=args.grad_clip,
                        max_epochs=args.epochs, patience=args.patience, metric=metric, seed=args.seed,
                        max_minutes=args.max_minutes, progress=not args.no_progress,
                        precision=args.precision, bn_recalibrate=args.bn_recalibrate)
    if laat:
        model_options = {k: getattr(args, k) for k in LAAT_FLAGS if getattr(args, k) is not None}
        model_options.update(model="laat", attention_mask=not args.no_attention_mask)
    else:
        model_options = {k: getattr(args, k) for k in MODEL_FLAGS}
        model_options.update(use_ram=not args.no_ram, no_mtl=args.no_mtl)
    if args.train_embeddings:
        model_options["freeze_embeddings"] = False
    return settings, train, model_options


def _train(args) -> int:
    from .training.distributed import init_from_environment, worker_failures

    init_from_environment()
    with worker_failures():  # a lost DDP worker: one line, not a hang or a traceback
        return _train_in_process_group(args)


def _train_in_process_group(args) -> int:
    from .training.run import train_and_report

    settings, train, model_options = _train_settings(args)
    codiesp_options = {"baseline": not args.no_baseline, "evidence_k": args.evidence_k}
    if args.seeds:
        import functools

        from .training.seeds import SUMMARY_FILE, train_seeds

        run = functools.partial(train_and_report, codiesp_options=codiesp_options, config_file=args.applied_config)
        if train_seeds(settings, model_options, train, args.out, args.seeds, backend=args.backend, resume=args.resume,
                       run=run):
            print(f"\nruns in {args.out}/seed-<n>/; mean ± sample std in {Path(args.out) / SUMMARY_FILE}")
        return 0
    report = train_and_report(settings, model_options, train, args.out, backend=args.backend, resume=args.resume,
                              codiesp_options=codiesp_options, config_file=args.applied_config)
    if report:
        print(f"\nbest epoch {report['best_epoch']} of {report['epochs_run']}; "
              f"report, plots and checkpoint in {args.out}")
    return 0


DEMO_QUICK = {"synth_preset": "test", "hidden_size": 16, "epochs": 2, "max_minutes": 1.0}


def _demo(args) -> int:
    from .training.run import train_and_report

    if args.quick:
        for key, value in DEMO_QUICK.items():
            setattr(args, key, value)
    settings, train, model_options = _train_settings(args)
    print(f"marn-fast demo: synthetic MIMIC-shaped corpus → MARN (d_r={args.hidden_size}) → test metrics; "
          f"up to {args.epochs} epochs" + (f" or {args.max_minutes:g} min" if args.max_minutes else "") +
          f" of training on {torch_threads()} CPU threads")
    report = train_and_report(settings, model_options, train, args.out, backend=args.backend,
                              config_file=args.applied_config)
    t = report["test_at_tuned_threshold"]
    print(f"\ntest at the dev-tuned threshold {report['tuned_threshold']:.3f}: micro-F1 {t['f1_micro']:.3f}, "
          f"macro-F1 {t['f1_macro']:.3f}, P@5 {t['p@5']:.3f}, MAP {t['map']:.3f}")
    print(f"done in {report['seconds']:.0f} s; report (metrics.json, loss_curve.png, f1_by_frequency.png, "
          f"best.pt) in {args.out}")
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _default(cls: type, name: str) -> Any:
    """A dataclass field's default: flags take theirs from the one source of truth."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def model_default(name: str) -> Any:
    from .config import MARNConfig

    return _default(MARNConfig, name)


def _add_training_options(p, demo: bool) -> None:
    from .config import ENCODERS, MODELS, LAATConfig
    from .data import SYNTHETIC_PRESETS
    from .data.labels import TOP50_SOURCES
    from .training import DataSettings, TrainConfig

    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML (or JSON) file of options, or the name of a shipped one (marn-fast info lists them); "
                        "flags override it; replaces the default recipe")
    p.add_argument("--recipe", choices=RECIPES, default="auto",
                   help="auto: " + ("apply the shipped demo.yaml" if demo else
                                    "--data codiesp applies the shipped CodiEsp recipe codiesp-<language>-D.yaml") +
                        "; official: no shipped config, the package defaults (the official MARN recipe)")
    p.add_argument("--out", default="runs/demo" if demo else "runs/train", help="run folder (report, checkpoints)")
    p.add_argument("--data", choices=("synth", "caml", "codiesp"), default="synth",
                   help="synth: the embedded corpus; caml: a CAML-format folder (MIMIC prepared by prepare-mimic3/4); "
                        "codiesp: a CodiEsp release folder (train/, dev/, test/, background/)")
    p.add_argument("--data-dir", default=None, help="CAML-format folder (synth: where to write the corpus)")
    p.add_argument("--synth-preset", choices=sorted(SYNTHETIC_PRESETS), default="demo")
    p.add_argument("--labels", choices=("full", "50"), default="full", help="label setting: all codes or top 50")
    p.add_argument("--top50", choices=TOP50_SOURCES, default=_default(DataSettings, "top50"),
                   help="--labels 50: CAML's published MIMIC-III 50 codes, or the 50 most frequent training codes")
    p.add_argument("--ccs", choices=("merged", "prefixed"), default="merged", help="CCS label mode")
    p.add_argument("--hcup-dir", default=None, help="folder with HCUP's prref/dxref 2015 tables (procedure → CCS)")
    p.add_argument("--label-union", action="store_true", help="ICD label space from all splits (official code)")
    p.add_argument("--max-length", type=int, default=model_default("max_length"))
    p.add_argument("--language", choices=("en", "es"), default=_default(DataSettings, "language"),
                   help="codiesp: English translations (text_files_en) or the Spanish originals")
    p.add_argument("--codes", choices=("D", "P", "DP"), default=_default(DataSettings, "codes"),
                   help="codiesp: diagnoses, procedures, or both (labels prefixed D:/P:)")
    p.add_argument("--aux", choices=("ccsr", "chapter", "category", "none"), default=_default(DataSettings, "aux"),
                   help="codiesp: auxiliary labels of diagnoses (HCUP CCSR, ICD-10 chapter, 3-character category)")
    p.add_argument("--procedure-aux", choices=("prefix", "none"), default=_default(DataSettings, "procedure_aux"),
                   help="codiesp: auxiliary labels of procedures (3-character PCS prefix)")
    p.add_argument("--min-doc-freq", type=int, default=_default(DataSettings, "min_doc_freq"),
                   help="words in fewer notes than this become UNK")
    p.add_argument("--word2vec-epochs", type=int, default=_default(DataSettings, "word2vec_epochs"),
                   help="passes of CBOW word2vec over the training notes (codiesp: and the background cases)")
    p.add_argument("--no-baseline", action="store_true",
                   help="codiesp: skip the TF-IDF + logistic-regression baseline of the report")
    p.add_argument("--evidence-k", type=int, default=3,
                   help="codiesp --language es: attention tokens per code scored against the gold evidence")
    p.add_argument("--no-mtl", action="store_true", help="ablation: no CCS branch")
    p.add_argument("--no-ram", action="store_true", help="ablation: no RAM")
    p.add_argument("--loss", choices=("focal", "bce"), default=None,
                   help="default focal (MARN), bce (--model laat); --loss bce is MARN's ablation")
    p.add_argument("--focal-alpha", type=float, default=model_default("focal_alpha"))
    p.add_argument("--focal-gamma", type=float, default=model_default("focal_gamma"))
    p.add_argument("--focal-balanced", action="store_true", help="the paper's eq. 16 instead of the official form")
    p.add_argument("--lambda-icd", type=float, default=model_default("lambda_icd"))
    p.add_argument("--lambda-ccs", type=float, default=model_default("lambda_ccs"))
    p.add_argument("--hidden-size", type=int, default=None,
                   help=f"per direction of the encoder: MARN's d_r (default {model_default('hidden_size')}), "
                        f"LAAT's u (default {model_dependent_default('laat', 'hidden_size')})")
    p.add_argument("--embed-dim", type=int, default=model_default("embed_dim"))
    p.add_argument("--encoder", choices=ENCODERS, default=model_default("encoder"),
                   help="base model (paper Fig. 7): MARN's BiGRU, or CAML's CNN / MultiResCNN with MARN's "
                        "blocks on top")
    p.add_argument("--num-filter-maps", type=int, default=model_default("num_filter_maps"), help="CNN encoders")
    p.add_argument("--filter-size", type=int, default=model_default("filter_size"), help="CNN encoder kernel")
    p.add_argument("--dropout", type=float, default=None,
                   help=f"default {model_default('dropout')} (MARN), {model_dependent_default('laat', 'dropout')} "
                        "(--model laat)")
    p.add_argument("--train-embeddings", action="store_true",
                   help="fine-tune the word2vec embedding (default: frozen, as the official code)")
    p.add_argument("--bn-recalibrate", action="store_true",
                   help="after each epoch, recompute the RAM's BatchNorm running statistics over the training "
                        "data (exact averages, dropout off) before evaluating")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {_default(DataSettings, 'batch_size')} (MARN), "
                        f"{model_dependent_default('laat', 'batch_size')} (--model laat)")
    p.add_argument("--lr", type=float, default=_default(TrainConfig, "lr"))
    p.add_argument("--weight-decay", type=float, default=_default(TrainConfig, "weight_decay"))
    p.add_argument("--decay-matrices-only", action="store_true",
                   help="weight decay on weight matrices and conv kernels only, not on biases and BatchNorm "
                        "scales/shifts (default: on every parameter, as torch's AdamW)")
    p.add_argument("--grad-clip", type=float, default=_default(TrainConfig, "grad_clip"))
    p.add_argument("--epochs", type=int, default=_default(TrainConfig, "max_epochs"))
    p.add_argument("--patience", type=int, default=None,
                   help=f"epochs without a better dev metric before stopping: default "
                        f"{_default(TrainConfig, 'patience')} (MARN), {model_dependent_default('laat', 'patience')} "
                        "(--model laat)")
    p.add_argument("--metric", default=None, help="dev metric for early stopping (f1_micro, f1_macro, p@8, map, ...; "
                   f"default {_default(TrainConfig, 'metric')}, map with --data codiesp)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting epochs after this many minutes")
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    _add_precision(p)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal; one line per epoch always)")
    if demo:
        p.add_argument("--quick", action="store_true", help=f"a smoke run in well under a minute: {DEMO_QUICK}")
    else:
        p.add_argument("--model", choices=MODELS, default="marn",
                       help="marn: MARN (BiGRU, RAM, label attention, CCS head); laat: LAAT (BiLSTM and LAAT's "
                            "label attention, ICD only; its paper's settings: docs/model.md#laat)")
        p.add_argument("--d-a", type=int, default=None,
                       help=f"--model laat: d_a of the keys tanh(H W_a^T) (default {_default(LAATConfig, 'd_a')})")
        p.add_argument("--no-attention-mask", action="store_true",
                       help="--model laat: attend over padded tokens too, as the official LAAT code does")
        p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
        p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                       help="one run per seed in OUT/seed-<n>/ and mean ± sample std of every metric in "
                            "OUT/seeds_summary.json (instead of --seed)")


def _add_train_commands(sub) -> None:
    p = sub.add_parser("train", help="train MARN (or --model laat: LAAT) with early stopping on dev, evaluate the "
                                     "best checkpoint on test")
    _add_training_options(p, demo=False)
    p.set_defaults(func=_train)
    p = sub.add_parser("demo", help="the main job on the embedded corpus: synth → train → test metrics and report "
                                    "(settings from the shipped demo.yaml)")
    _add_training_options(p, demo=True)
    p.set_defaults(func=_demo)


# ----------------------------------------------------------------------------- evaluate / predict
def _evaluate(args) -> int:
    from .training.evaluation import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, split=args.split,
                                 threshold=args.threshold, backend=args.backend, out=args.out,
                                 precision=args.precision)
    print(report["table"])
    if args.out:
        print(f"metrics written to {args.out}, manifest to {report['manifest']}")
    return 0


def _read_notes(paths) -> list:
    texts = []
    sources = paths or ["-"]
    for path in sources:
        try:
            data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            name = "stdin" if path == "-" else path
            raise CLIError(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not any(t.strip() for t in texts):
        raise CLIError("no input text: give note files or text on stdin")
    return texts


def _predict(args) -> int:
    from .predict import Predictor

    # a bad checkpoint or option fails before stdin is read
    predictor = Predictor(args.checkpoint, backend=args.backend, precision=args.precision)
    texts = _read_notes(args.files)
    results = predictor.predict(texts, top=args.top, evidence=args.evidence, threshold=args.threshold)
    names = args.files or ["stdin"]
    if args.format == "json":
        out = [{"source": name, "tokens": r["tokens"], "truncated": r["truncated"],
                "codes": [{"code": c.code, "probability": c.probability, "description": c.description,
                           "evidence": [{"token": t, "weight": w} for t, w in c.evidence]} for c in r["codes"]]}
               for name, r in zip(names, results)]
        print(json.dumps(out, indent=2))
    else:
        for name, r in zip(names, results):
            print(f"== {name} ({r['tokens']} tokens{', truncated' if r['truncated'] else ''})")
            for c in r["codes"]:
                evidence = ", ".join(t for t, _ in c.evidence)
                print(f"  {c.code:<8} {c.probability:6.3f}  {c.description[:60]:<60}  [{evidence}]")
    return 0


def _import_official(args) -> int:
    from .convert import import_official
    from .training.checkpoint import save_checkpoint

    model, metadata, unused = import_official(args.checkpoint, args.vocab, args.labels, args.ccs_labels,
                                              backend="reference")
    path = save_checkpoint(Path(args.out) / "best.pt", {"config": model.config.to_dict(),
                                                        "model": model.state_dict(), **metadata})
    print(f"imported {args.checkpoint} → {path} (vocab {len(metadata['vocab'])}, ICD {len(metadata['icd_labels'])}, "
          f"CCS {len(metadata['ccs_labels'])}); unused official keys: {unused or 'none'}")
    return 0


def _add_eval_commands(sub) -> None:
    p = sub.add_parser("import-official", help="convert a checkpoint of the official MARN code to a marn_fast one")
    p.add_argument("checkpoint", help="state_dict saved by the official code (torch.save(model.state_dict()))")
    p.add_argument("--vocab", required=True, help="the official vocabulary file, one word per line, in id order")
    p.add_argument("--labels", required=True, help="ICD codes, one per line, in the model's column order")
    p.add_argument("--ccs-labels", default=None, help="CCS labels, one per line, in column order")
    p.add_argument("--out", required=True, help="folder for the marn_fast checkpoint (best.pt)")
    p.set_defaults(func=_import_official)
    p = sub.add_parser("evaluate", help="score a checkpoint on a split of a CAML-format folder")
    p.add_argument("checkpoint", help="best.pt or last.pt of a run")
    p.add_argument("--data-dir", default=None,
                   help="CAML-format folder (default: the one the checkpoint was trained on)")
    p.add_argument("--split", choices=("train", "dev", "test"), default="test")
    p.add_argument("--threshold", type=float, default=None, help="decision threshold (default: tuned on dev)")
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto")
    p.add_argument("--out", default=None, help="write metrics JSON here")
    _add_precision(p)
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("predict", help="code notes: top codes, probabilities, descriptions and evidence tokens")
    p.add_argument("checkpoint")
    p.add_argument("files", nargs="*", help="UTF-8 note files (default: stdin)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--evidence", type=int, default=5, help="evidence tokens per code")
    p.add_argument("--threshold", type=float, default=None, help="only codes above this probability")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--backend", choices=("auto", "fused", "reference"), default="auto")
    _add_precision(p)
    p.set_defaults(func=_predict)


def _codiesp_report(args) -> int:
    from .training.codiesp import collect_runs, summarize_runs
    from .training.report import write_json

    runs = collect_runs(args.runs)
    print(summarize_runs(runs))
    if args.out:
        write_json(Path(args.out), {"runs": [{"dir": r["dir"], "group": r["group"], "seconds": r["seconds"],
                                              "codiesp": r["report"]["codiesp"]} for r in runs]})
        print(f"written to {args.out}")
    return 0


def _add_codiesp_report(sub) -> None:
    p = sub.add_parser("codiesp-report", help="CodiEsp runs side by side: MAP (mean ± std over seeds), the "
                                              "TF-IDF baseline, evidence F1, CLEF 2020 results, run times")
    p.add_argument("runs", nargs="+", help="train run folders (--data codiesp), or folders of seed-<n>/ runs")
    p.add_argument("--out", default=None, help="also write the collected CodiEsp sections as JSON here")
    p.set_defaults(func=_codiesp_report)


# ----------------------------------------------------------------------------- info
def _info(args) -> int:
    from .info import main as info_main

    return info_main(["--json"] if args.json else [])


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, device, compiled extensions (and the fix when one did not "
                                    "load), the implementation of each op here, the shipped configs: paste it "
                                    "into bug reports")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_info)


# ----------------------------------------------------------------------------- tune
def _tune(args) -> int:
    import torch

    from .tune import TuneShape, format_table, tune, tune_data, write_rows

    if bool(args.shapes) == bool(args.data_dir):
        raise CLIError("give either --shapes (measure at those shapes) or --data-dir (measure what training on "
                       "that data will hit), not both")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.data_dir:
        settings, train, model_options = settings_from_args(args, args.data_dir)
        rows = tune_data(settings, model_options, train, device=device, fresh=args.fresh, rounds=args.rounds)
    else:
        shapes = [TuneShape.parse(text) for text in args.shapes]
        rows = tune(shapes, hidden_size=args.hidden_size, precision=args.precision, device=device, modes=modes,
                    fresh=args.fresh, rounds=args.rounds)
    print(format_table(rows))
    if args.write_table:
        written = write_rows(args.write_table, rows)
        print(f"{written} measured entries merged into {args.write_table}" if written else
              f"nothing measured, {args.write_table} left as it was (--fresh measures keys the cache holds)")
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="resolve the measured dispatch ahead of time (fills the cache), at given shapes "
                                    "or for training on a data set, and print each op's candidates in milliseconds "
                                    "and the one chosen")
    p.add_argument("--shapes", nargs="+", default=None, metavar="BxNxL_ICD[xL_CCS]",
                   help="batch x padded length x ICD codes [x CCS codes], e.g. 4x500x8921x295 16x4000x50x38")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible)")
    p.add_argument("--modes", default="train,infer", help="--shapes: comma-separated train, infer")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (part of the CPU key)")
    p.add_argument("--fresh", action="store_true", help="measure even where the cache or a shipped table has "
                                                        "the key (without reading either)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per key with --fresh (default 3)")
    p.add_argument("--write-table", type=Path, default=None, metavar="FILE",
                   help="also merge the measured entries into FILE (a table to ship in "
                        "marn_fast/ops/dispatch_tables/)")
    # --data-dir DIR and the options of `marn-fast train` (those that shape the model, the batches
    # and the precision enter the keys; the others are accepted and have no effect here). With
    # --shapes, --hidden-size and --precision apply (--precision auto: bf16 on CUDA, fp32 on the CPU,
    # as training).
    _add_training_options(p, demo=False)
    p.set_defaults(func=_tune)


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marn-fast", description="Fast, exact MARN for automated ICD coding.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_commands(sub)
    _add_eval_commands(sub)
    _add_data_commands(sub)
    _add_codiesp_report(sub)
    _add_bench_step(sub)
    _add_info(sub)
    _add_tune(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.applied_config = apply_config(parser, args, argv)
        if args.command in ("train", "demo"):
            resolve_model_options(args)
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, UnicodeDecodeError) as exc:
        print(f"marn-fast {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the machine, not the input: a full disk, a permission, a lost worker's socket
        print(f"marn-fast {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"marn-fast {args.command}: interrupted", file=sys.stderr)
        return 130
