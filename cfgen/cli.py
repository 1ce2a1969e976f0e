"""The ``cfgen`` command: ``cfgen demo`` and ``cfgen run``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

__all__ = ["main"]


def _chat(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _load_intervention(spec: str, model):
    """A catalogue name or a folder written by cfgen.save, loaded around ``model``; bad names exit in one line."""
    import cfgen
    from cfgen import catalogue

    try:
        folder = catalogue.resolve(spec)
    except catalogue.UnknownEntry as err:
        raise SystemExit(f"cfgen: {err}. Pass a catalogue name or a folder written by cfgen.save.") from None
    return cfgen.load(folder, model)


def demo(args: argparse.Namespace) -> int:
    import torch

    from cfgen import catalogue
    from cfgen import demo as show

    try:
        catalogue.resolve(args.intervention)  # a bad name fails before the model loads
    except catalogue.UnknownEntry as err:
        raise SystemExit(f"cfgen demo: {err}. Pass a catalogue name or a folder written by cfgen.save.") from None
    torch.set_num_threads(max(1, torch.get_num_threads()))
    show.run(seed=args.seed, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
             max_new_tokens=args.max_new_tokens, num_samples=args.num_samples, prompt=args.prompt,
             observed=args.observed, steering=args.intervention, steering_scale=args.steering_scale, out=args.out)
    return 0


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise SystemExit("cfgen run: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    import cfgen

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
        tok.padding_side = "left"
    else:
        model, tok = cfgen.load_default_model()
    intervenable = _load_intervention(args.intervention, model)
    prompts = _read_prompts(args)
    observed = list(args.observed or [])
    if observed and len(observed) not in (1, len(prompts)):
        raise SystemExit(f"cfgen run: {len(observed)} --observed for {len(prompts)} prompts; give one or one each")
    if len(observed) == 1:
        observed = observed * len(prompts)
    encoded = [_chat(tok, p) if args.chat else p for p in prompts]
    sampler = cfgen.Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    kwargs = dict(sampler=sampler, seed=args.seed, num_samples=args.num_samples, interventional=args.interventional,
                  intervene_on=args.intervene_on)
    if args.source:
        kwargs["sources"] = args.source if len(args.source) > 1 else args.source[0]
    if args.unit_locations:
        kwargs["unit_locations"] = json.loads(args.unit_locations)
        for key, value in kwargs["unit_locations"].items():
            if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, list)) for v in value):
                kwargs["unit_locations"][key] = tuple(value)
    results = []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="prompts", unit="batch",
                      disable=len(prompts) <= args.batch_size):
        chunk = slice(start, start + args.batch_size)
        if observed:
            r = cfgen.counterfactual(intervenable, tok, encoded[chunk], observed[chunk],
                                     max_new_tokens=args.max_new_tokens, **kwargs)
        else:
            r = cfgen.generate(intervenable, tok, encoded[chunk], max_new_tokens=args.max_new_tokens or 64,
                               **kwargs)
        results.append(r)
        if not args.quiet:
            print(r)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for start, r in zip(range(0, len(prompts), args.batch_size), results):
                for rec in r.to_records():
                    rec["prompt"] = prompts[start + rec["prompt_index"]]
                    rec["prompt_index"] += start
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"wrote {sum(len(r) for r in results)} records to {args.out}")
    return 0


def _sampler_flags(p: argparse.ArgumentParser, temperature: float = 1.0) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfgen", description="Noise-matched counterfactual text for LM interventions")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="factual vs counterfactual text on the embedded model")
    from .demo import add_arguments as demo_arguments  # cheap: cfgen.demo imports no model libraries at import

    demo_arguments(d)
    d.set_defaults(func=demo)

    r = sub.add_parser("run", help="counterfactual text for any saved intervention directory")
    r.add_argument("--intervention", required=True,
                   help="a catalogue name (cfgen.catalogue.names()) or a folder written by cfgen.save")
    r.add_argument("--model", default=None, help="a local Hugging Face model directory (default: embedded model)")
    r.add_argument("--prompt", action="append", help="repeatable")
    r.add_argument("--prompts-file", help="one prompt per line")
    r.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    r.add_argument("--observed", action="append", help="hindsight: an observed continuation (one, or one per prompt)")
    _sampler_flags(r)
    r.add_argument("--num-samples", type=int, default=1)
    r.add_argument("--max-new-tokens", type=int, default=None, help="default 64, or the observed length")
    r.add_argument("--source", action="append", help="interchange source prompt (one, or one per prompt)")
    r.add_argument("--unit-locations", help='pyvene unit_locations as JSON, e.g. \'{"sources->base": [3, 3]}\'')
    r.add_argument("--intervene-on", default=None, help="prompt | generation | all")
    r.add_argument("--interventional", action="store_true", help="also sample with fresh noise")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--out", help="write results as JSON lines")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"cfgen {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
