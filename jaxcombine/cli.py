"""The ``jaxcombine`` command.

    jaxcombine generate --model DIR [--model DIR ...] (--prompt TEXT | --prompt-ids 1,2,3)
            [--max-new-tokens N] [--greedy | --temperature T --top-k K --top-p P --seed S]
            [--num-beams B]
            [--combine linear|loglinear|logits|contrastive --weights 0.7,0.3 --alpha A] [--json]
    jaxcombine score --model DIR [--model DIR ...] --text-file F
            [--combine ... --weights ... --alpha A] [--window W] [--json]
    jaxcombine merge CONFIG.yml OUT_DIR [--random-seed N] [--out-shard-size 5B]
            [--dry-run] [--overwrite] [--quiet] [--json]
    jaxcombine extract-lora --model DIR --base DIR --out DIR --max-rank R [--overwrite]
    jaxcombine moe CONFIG.yml OUT_DIR [--random-seed N] [--out-shard-size 5B]
            [--dry-run] [--overwrite] [--quiet] [--json]

``--prompt`` and ``--prompt-ids`` may be repeated: the prompts are decoded as
one left-padded batch. Errors print one message (what, where, how to fix) and
exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxcombine import __version__
from jaxcombine.errors import InputError, JaxcombineError

_DTYPES = ("float32", "bfloat16", "float16")


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(
            f"cannot parse token ids {text!r}",
            where="--prompt-ids",
            fix="write comma-separated integers, e.g. --prompt-ids 1,15,27",
        ) from None


def _load(args, model_dir=None):
    import jax.numpy as jnp

    from jaxcombine.hf import load_model

    dtype = None if args.dtype is None else getattr(jnp, args.dtype)
    return load_model(model_dir or _single_model(args), dtype=dtype)


def _single_model(args) -> str:
    if len(args.model) > 1:
        raise InputError(
            f"{args.command} takes one --model for now, got {len(args.model)}",
            where="--model",
            fix="pass one model (ensembles: jaxcombine generate with several --model)",
        )
    return args.model[0]


def _combination(args, configs):
    """The ensemble's rule, checked against the members' configs before any weight is read."""
    from jaxcombine.ensemble import Combination

    weights = None
    if args.weights is not None:
        try:
            weights = tuple(float(w) for w in args.weights.split(",") if w.strip())
        except ValueError:
            raise InputError(
                f"cannot parse weights {args.weights!r}",
                where="--weights",
                fix="write comma-separated numbers, one per --model, e.g. --weights 0.7,0.3",
            ) from None
    combination = Combination(args.combine, weights, args.alpha)
    combination.check_members(len(configs))
    return combination


def _vocabularies(args, configs):
    """Members' token string -> id maps when their vocabularies differ (None when
    they are the same), checked for overlap before any weight is read."""
    from jaxcombine.ensemble import shared_vocabulary

    tokenizers = [_tokenizer_or_none(d) for d in args.model]
    vocabs = [None if t is None else t.get_vocab() for t in tokenizers]
    sizes = [c.vocab_size for c in configs]
    if len(set(sizes)) == 1 and all(v == vocabs[0] for v in vocabs):
        return None
    if any(v is None for v in vocabs):
        missing = args.model[[v is None for v in vocabs].index(True)]
        raise InputError(
            "members' vocabularies differ and this member has no tokenizer.json to map by",
            where=str(missing),
            fix="add the model's tokenizer.json, or ensemble models of one tokenizer",
        )
    shared_vocabulary(vocabs, sizes, min_shared=0.5)
    return vocabs


def _ensemble(args, configs, combination):
    """The --model directories as one Decodable: one model, stacked members of one
    architecture and vocabulary, or a general ensemble."""
    from jaxcombine.decoding import Decodable
    from jaxcombine.ensemble import ensemble, stacked

    if len(args.model) == 1:
        return lambda: Decodable.of(_load(args))
    vocabularies = _vocabularies(args, configs)
    first = configs[0]
    same = vocabularies is None and all(
        c.replace(dropout_rate=first.dropout_rate) == first for c in configs
    )

    def load():
        members = [_load(args, d) for d in args.model]
        if same:
            return stacked(members, combination)
        return ensemble(members, combination, vocabularies=vocabularies)

    return load


def _tokenizer_or_none(model_dir):
    from jaxcombine.hf import load_tokenizer

    if not (Path(model_dir) / "tokenizer.json").exists():
        return None
    return load_tokenizer(model_dir)


def cmd_generate(args) -> dict:
    """``jaxcombine generate``: continue ``--prompt`` texts (or ``--prompt-ids``) with one
    model or an ensemble of ``--model`` directories; ``{"tokens", "text"}`` per prompt."""
    from jaxcombine.decoding import Sampling, check_beams, generate, validate_prompts
    from jaxcombine.hf import load_config, load_tokenizer

    if args.greedy and args.temperature:
        raise InputError(
            "--greedy and --temperature > 0 contradict each other",
            where="--greedy/--temperature",
            fix="pass one of them",
        )
    sampling = Sampling(
        temperature=args.temperature or 0.0,
        top_k=args.top_k or 0,
        top_p=args.top_p if args.top_p is not None else 1.0,
    )
    if sampling.greedy and (args.top_k or args.top_p is not None):
        raise InputError(
            "--top-k/--top-p need sampling",
            where="--top-k/--top-p",
            fix="add --temperature T (T > 0), or drop them for greedy decoding",
        )
    check_beams(args.num_beams, sampling, where="--num-beams")
    configs = [load_config(d) for d in args.model]  # cheap: check before loading weights
    config, first = configs[0], args.model[0]
    combination = _combination(args, configs)
    if args.prompt:
        tokenizer = load_tokenizer(first)
        prompts = [tokenizer.encode(text).ids for text in args.prompt]
    else:
        tokenizer = _tokenizer_or_none(first)
        prompts = [_token_ids(text) for text in args.prompt_ids]
    validate_prompts(prompts, config.vocab_size, config.max_position_embeddings)
    if args.max_new_tokens < 1:
        raise InputError(
            f"max_new_tokens must be >= 1, got {args.max_new_tokens}", where="--max-new-tokens"
        )
    load = _ensemble(args, configs, combination)
    tokens = generate(
        load(), prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
        num_beams=args.num_beams,
    )  # fmt: skip
    texts = [
        tokenizer.decode(row, skip_special_tokens=True) if tokenizer else None for row in tokens
    ]
    return {"tokens": tokens, "text": texts}


def cmd_score(args) -> dict:
    """``jaxcombine score``: negative log-likelihood of a text file under one model or
    an ensemble, in windows of the context length; ``{"tokens", "nll", "ppl"}``."""
    from jaxcombine.decoding import score_with
    from jaxcombine.hf import load_config, load_tokenizer

    path = Path(args.text_file)
    if not path.is_file():
        raise InputError(
            "text file does not exist", where=str(path), fix="pass the path of a UTF-8 text file"
        )
    configs = [load_config(d) for d in args.model]  # cheap: check before loading weights
    combination = _combination(args, configs)
    ids = load_tokenizer(args.model[0]).encode(path.read_text(encoding="utf-8")).ids
    if len(ids) < 2:
        raise InputError(
            f"need at least 2 tokens to score, got {len(ids)}",
            where=str(path),
            fix="score a longer text",
        )
    load = _ensemble(args, configs, combination)
    model = load()
    model.check_readable(ids, where=str(path))
    result = score_with(
        model.forward, model.params, model.config, ids, window=args.window,
        batch_size=args.batch_size,
    )  # fmt: skip
    return {
        "tokens": len(ids),
        "predicted_tokens": result.count,
        "nll": result.nll,
        "ppl": result.ppl,
    }


def cmd_merge(args) -> dict:
    """``jaxcombine merge``: a mergekit YAML config, checked and planned before any
    tensor is read (``--dry-run`` prints the plan), then streamed into ``out_dir``."""
    from jaxcombine.merging.mergekit import load_merge_config, plan_merge, run_merge

    config = load_merge_config(args.config)
    plan = plan_merge(config)
    if args.dry_run:
        return {"plan": plan.describe(), "dry_run": True}
    summary = run_merge(
        plan,
        args.out_dir,
        seed=args.random_seed,
        out_shard_size=args.out_shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    return summary


def cmd_moe(args) -> dict:
    """``jaxcombine moe``: a mergekit-moe YAML config (dense models as experts plus
    router prompts) into an HF Mixtral directory; ``--dry-run`` prints the plan."""
    from jaxcombine.moe.mergekit import load_moe_config, plan_moe, run_moe

    config = load_moe_config(args.config)
    plan = plan_moe(config, allow_all_same=args.i_understand_this_is_not_useful_without_training)
    if args.dry_run:
        text = plan.describe()
        plan.close()
        return {"plan": text, "dry_run": True, "message": text}
    return run_moe(
        plan,
        args.out_dir,
        seed=args.random_seed,
        out_shard_size=args.out_shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )


def cmd_extract_lora(args) -> dict:
    """``jaxcombine extract-lora``: the truncated SVD of ``model - base`` per linear
    layer, written as a PEFT LoRA adapter of rank at most ``--max-rank``."""
    from jaxcombine.lora import extract_lora

    return extract_lora(
        args.model,
        args.base,
        args.out,
        max_rank=args.max_rank,
        overwrite=args.overwrite,
    )


def cmd_tour(args) -> dict:
    """``jaxcombine tour``: :func:`jaxcombine.tour.run.run_tour`; with ``--check``, a
    :class:`~jaxcombine.tour.report.ClaimNotHeldError` names every required claim that
    did not hold (exit code 2)."""
    from jaxcombine.tour.report import ClaimNotHeldError
    from jaxcombine.tour.run import run_tour

    sections = None
    if args.sections:
        try:
            sections = [int(n) for n in args.sections.split(",")]
        except ValueError:
            raise InputError(f"--sections {args.sections!r} is not a list of numbers",
                             where="--sections", fix="e.g. --sections 1,6") from None  # fmt: skip
    echo = (lambda _: None) if args.json else print
    done = run_tour(args.out, quick=args.quick, data=args.data, sections=sections, echo=echo)
    claims = [
        {"section": s.number, "statement": c.statement, "held": c.held}
        for s in done
        for c in s.claims
    ]
    held = sum(c["held"] for c in claims)
    failed = [f"section {s.number}: {c.statement}" for s in done for c in s.claims
              if c.required and not c.held]  # fmt: skip
    if args.check and failed:
        raise ClaimNotHeldError(
            f"{len(failed)} required claim(s) did not hold: " + "; ".join(failed),
            where=f"{args.out}/results.json",
            fix="read the measured numbers in report.md; a full run (without --quick) is "
            "the scale the claims are made for",
        )
    message = f"claims held: {held} of {len(claims)}; report: {args.out}/report.md"
    return {"out": args.out, "claims": claims, "message": message}


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxcombine`` argument parser: one sub-command per task, each with its
    handler in ``args.run``."""
    parser = argparse.ArgumentParser(prog="jaxcombine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"jaxcombine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument(
            "--model", required=True, action="append", help="HF model directory (generate: "
            "repeat for an ensemble of members of one architecture)",
        )  # fmt: skip
        p.add_argument("--dtype", choices=_DTYPES, help="compute dtype (default: checkpoint's)")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    def ensemble_args(p):  # generate and score: several --model combined per token
        p.add_argument(
            "--combine", choices=("linear", "loglinear", "logits", "contrastive"),
            default="linear", help="how several --model are combined per token (default: linear)",
        )  # fmt: skip
        p.add_argument("--weights", help="one weight per --model, comma-separated (default: equal)")
        p.add_argument("--alpha", type=float, default=0.1, help="contrastive plausibility cut-off")

    gen = sub.add_parser("generate", help="continue prompts with a model")
    model_args(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    prompt.add_argument("--prompt-ids", action="append", help="comma-separated token ids")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--num-beams", type=int, default=1, help="beam search with B beams (default 1: no beams)"
    )
    ensemble_args(gen)
    gen.set_defaults(run=cmd_generate)

    sc = sub.add_parser("score", help="NLL and perplexity of a text file")
    model_args(sc)
    sc.add_argument("--text-file", required=True)
    sc.add_argument(
        "--window",
        type=int,
        default=None,
        help="tokens per window (default: the model's context length)",
    )
    sc.add_argument("--batch-size", type=int, default=8)
    ensemble_args(sc)
    sc.set_defaults(run=cmd_score)

    def writer_args(p):  # merge and moe: write a model directory from a YAML plan
        p.add_argument("--out-shard-size", default="5B", help="max shard size (5B = 5e9 bytes)")
        p.add_argument("--dry-run", action="store_true", help="validate and print the plan")
        p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    mg = sub.add_parser("merge", help="merge checkpoints from a mergekit YAML config")
    mg.add_argument("config", help="mergekit YAML config")
    mg.add_argument("out_dir", help="output model directory")
    mg.add_argument("--random-seed", type=int, default=0, help="seed for random methods")
    writer_args(mg)
    mg.set_defaults(run=cmd_merge)

    moe = sub.add_parser("moe", help="a Mixtral MoE from dense models (mergekit-moe YAML)")
    moe.add_argument("config", help="mergekit-moe YAML config")
    moe.add_argument("out_dir", help="output model directory")
    moe.add_argument("--random-seed", type=int, default=0, help="seed for random gates, noise")
    writer_args(moe)
    moe.add_argument(
        "--i-understand-this-is-not-useful-without-training",
        action="store_true",
        help="allow prompt-initialised routers over copies of one model",
    )
    moe.set_defaults(run=cmd_moe)

    lo = sub.add_parser("extract-lora", help="a PEFT LoRA adapter from model - base")
    lo.add_argument("--model", required=True, help="fine-tuned HF model directory")
    lo.add_argument("--base", required=True, help="base HF model directory")
    lo.add_argument("--out", required=True, help="output adapter directory")
    lo.add_argument("--max-rank", type=int, required=True, help="LoRA rank")
    lo.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    lo.add_argument("--json", action="store_true", help="print one JSON object")
    lo.set_defaults(run=cmd_extract_lora)

    tour = sub.add_parser(
        "tour", help="train small models on embedded data and compare every way of combining them"
    )
    tour.add_argument(
        "--out", default="jaxcombine-tour", help="report directory (default: %(default)s)"
    )
    tour.add_argument(
        "--quick", action="store_true", help="small sizes (about 3 minutes on 2 cores)"
    )
    tour.add_argument(
        "--data",
        action="append",
        help="local text files or directories instead of the stdlib corpus (repeatable)",
    )
    tour.add_argument("--sections", help="comma-separated section numbers (default: all)")
    tour.add_argument("--json", action="store_true", help="print results.json's claims as JSON")
    tour.add_argument(
        "--check",
        action="store_true",
        help="exit with an error if a required claim did not hold (as CI does)",
    )
    tour.set_defaults(run=cmd_tour)
    return parser


def _print_human(command: str, result: dict) -> None:
    if command == "generate":
        for tokens, text in zip(result["tokens"], result["text"], strict=True):
            print(text if text is not None else ",".join(map(str, tokens)))
    elif command == "score":
        print(f"tokens {result['tokens']}  nll {result['nll']:.6f}  ppl {result['ppl']:.4f}")
    elif command == "merge" and result.get("dry_run"):
        print(result["plan"])
    else:
        print(result.get("message", json.dumps(result)))


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 (with the error on stderr) for a
    :class:`~jaxcombine.errors.JaxcombineError`, which names the file or option and
    the fix.

    >>> import contextlib, io
    >>> stderr = io.StringIO()
    >>> with contextlib.redirect_stderr(stderr):
    ...     code = main(["tour", "--sections", "9", "--out", "unused"])
    >>> code, "no tour section [9]" in stderr.getvalue()
    (2, True)
    """
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except JaxcombineError as e:
        print(f"jaxcombine {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(args.command, result)
    return 0


# Commands that never run multi-process: after them the interpreter is not torn
# down (module teardown and XLA's client take about 0.35 s on 2 cores after a
# merge). Every output file is closed and renamed before ``main`` returns.
_FAST_EXIT = ("merge", "extract-lora", "moe")


def entry() -> None:
    """The ``jaxcombine`` console script: :func:`main`, then exit."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if len(sys.argv) > 1 and sys.argv[1] in _FAST_EXIT:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
