"""The `marn-fast` command line. Nothing imports this module.

Every sub-command turns bad input into a one-line error and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
import time

EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- bench-step
def _bench_step(args) -> int:
    import torch

    from . import MARN, MARNConfig, reference

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
          f"tokens, {torch.get_num_threads()} CPU threads")
    for name, model in models.items():
        model.train()
        torch.manual_seed(args.seed)  # the same dropout masks for every model
        start = time.perf_counter()
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
    p.set_defaults(func=_bench_step)


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marn-fast", description="Fast, exact MARN for automated ICD coding.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench_step(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError, UnicodeDecodeError) as exc:
        print(f"marn-fast {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"marn-fast {args.command}: interrupted", file=sys.stderr)
        return 130
