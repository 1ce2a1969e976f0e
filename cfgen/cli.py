"""The ``cfgen`` command: ``cfgen demo`` and ``cfgen run``.

``cfgen run --out FILE`` appends each finished batch to FILE as JSON lines
(each record whole, flushed and synced), so an interrupted run keeps every
finished batch; ``--resume`` continues it. Ctrl-C stops after the current
batch (a second Ctrl-C stops at once) and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from . import distributed  # stdlib only at import: keeps `cfgen --help` fast

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


class _Usage(Exception):
    """A bad argument found before any model work: reported as one line by the subcommand's parser (exit 2)."""


# Test-only: seconds to sleep after each batch is written, so a test can interrupt a tiny model mid-run.
_DELAY_ENV = "_CFGEN_TEST_BATCH_DELAY"


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise _Usage(f"--prompts-file {args.prompts_file}: cannot read it ({type(err).__name__}: {err})") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise _Usage("give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def _check_text(values: list[str], flag: str) -> None:
    for i, text in enumerate(values):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # undecodable bytes in argv arrive as lone surrogates
            raise _Usage(f"{flag} number {i + 1} is not valid UTF-8 text (at character {err.start}); "
                         "pass text in UTF-8") from None


def _check_model_dir(path: str) -> None:
    folder = Path(path)
    if not folder.exists():
        raise _Usage(f"--model {path}: no such folder")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise _Usage(f"--model {path}: not a Hugging Face model folder (it has no config.json)")


def _run_settings(args) -> dict[str, Any]:
    """What a resumed run must share with the file it continues (the batch size and printing do not matter).

    Keys are the flags' names (``top_k`` for ``--top-k``), so a refusal can name the flag.
    """
    return {name: getattr(args, name) for name in (
        "model", "intervention", "chat", "temperature", "top_k", "top_p", "seed", "num_samples", "max_new_tokens",
        "source", "unit_locations", "intervene_on", "interventional")}


def _flag(name: str, value: Any) -> str:
    return f"--{name.replace('_', '-')} {json.dumps(value, ensure_ascii=False)}"


class _Existing:
    """The records already in an output file that ``--resume`` continues."""

    def __init__(self) -> None:
        self.records = 0
        self.done: set[int] = set()
        self.torn = 0  # bytes of an incomplete last line (a write cut short by a kill)


def _read_existing(path: Path, settings: dict, prompts: list[str], observed: list[str], num_samples: int,
                   seed: int) -> _Existing:
    """Check every record of ``path`` against this run (refusing other settings) and list the finished prompts."""
    found = _Existing()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    found.torn = len(data) - end
    samples: dict[int, set[int]] = {}
    for number, line in enumerate(data[:end].splitlines(), 1):
        where = f"--out {path} line {number}"
        try:
            rec = json.loads(line)
            index, sample, prompt = rec["prompt_index"], rec["sample_index"], rec["prompt"]
        except (ValueError, KeyError, TypeError) as err:
            raise _Usage(f"{where} is not a record of cfgen run ({type(err).__name__}: {err}); "
                         "not resuming it: give another --out") from None
        cli = rec.get("settings", {}).get("cli") if isinstance(rec.get("settings"), dict) else None
        if not isinstance(cli, dict):
            raise _Usage(f"{where} records no cfgen run settings (written by other code or an older cfgen), so "
                         "it cannot be resumed safely: give another --out")
        ours, theirs = settings, cli
        if theirs != ours:
            diff = "; ".join(f"{_flag(k, theirs.get(k))} there, {_flag(k, ours.get(k))} now"
                             for k in sorted(set(ours) | set(theirs)) if theirs.get(k) != ours.get(k))
            raise _Usage(f"--resume: {path} was written with other settings ({diff}); "
                         "rerun with the same settings or give another --out")
        if not (isinstance(index, int) and 0 <= index < len(prompts) and prompts[index] == prompt):
            raise _Usage(f"--resume: {where} is for prompt {index} {prompt!r}, which is not prompt {index} of this "
                         "run; rerun with the same prompts (new ones may be added at the end) or give another --out")
        if rec.get("observed") != (observed[index] if observed else None):
            raise _Usage(f"--resume: {where} has another --observed text for prompt {index}")
        if not (isinstance(sample, int) and 0 <= sample < num_samples) or rec.get("seed") != seed + sample:
            raise _Usage(f"--resume: {where} is sample {sample!r} with seed {rec.get('seed')!r}, not one of this "
                         f"run's {num_samples} samples (seeds {seed}..{seed + num_samples - 1})")
        if sample in samples.setdefault(index, set()):
            raise _Usage(f"--resume: {where} repeats sample {sample} of prompt {index}; the file was edited or "
                         "written twice; give another --out")
        samples[index].add(sample)
        found.records += 1
    partial = [i for i, s in samples.items() if len(s) != num_samples]
    if partial:
        raise _Usage(f"--resume: {path} holds only some samples of prompt(s) {sorted(partial)[:5]}; "
                     "give another --out")
    found.done = set(samples)
    return found


class _Out:
    """The --out file, open for appending and locked against a second ``cfgen run`` writing to it at once."""

    def __init__(self, path: Path, created: bool) -> None:
        self.path, self.created = path, created
        self.file = open(path, "ab")
        self.existing: Optional[_Existing] = None
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform (Windows)
            return
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.close()
            raise _Usage(f"--out {path}: another cfgen run is writing to it") from None

    def append(self, lines: list[str]) -> None:
        self.file.write("".join(lines).encode("utf-8"))  # one write per batch, then to the disk
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file.closed:
            return
        self.file.close()
        if self.created and self.path.exists() and self.path.stat().st_size == 0:
            self.path.unlink()  # a run that saved nothing leaves no new empty file behind


def _check_out(args, settings, prompts, observed) -> Optional[_Out]:
    """Everything about --out that can fail, checked before any model work; the file is then open and locked."""
    if args.resume and not args.out:
        raise _Usage("--resume continues an --out FILE; give --out")
    if not args.out:
        return None
    path = Path(args.out)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise _Usage(f"--out {args.out}: the folder {parent} does not exist")
    if path.is_dir():
        raise _Usage(f"--out {args.out} is a folder; give a file name")
    exists = path.exists()
    if exists:
        if not os.access(path, os.W_OK):
            raise _Usage(f"--out {args.out}: not writable")
        if path.stat().st_size and not (args.resume or args.overwrite):
            raise _Usage(f"--out {args.out} already exists; pass --resume to continue it or --overwrite to replace it")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise _Usage(f"--out {args.out}: the folder {parent} is not writable")
    out = _Out(path, created=not exists)
    try:
        if args.resume:  # read under the lock: nobody appends meanwhile
            out.existing = _read_existing(path, settings, prompts, observed, args.num_samples, args.seed)
        elif args.overwrite:
            out.file.truncate(0)
    except BaseException:
        out.close()
        raise
    return out


class _StopAfterBatch:
    """SIGINT handler for the batch loop: the first Ctrl-C asks to stop after the current batch, the second stops."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopAfterBatch:
        if threading.current_thread() is threading.main_thread():  # signals can only be handled there
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("cfgen run: stopping after the current batch (Ctrl-C again to stop now)", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import cfgen

    # Everything that can be wrong with the arguments is found here, before the model is loaded.
    prompts = _read_prompts(args)
    _check_text(list(args.prompt or []), "--prompt")
    _check_text(list(args.observed or []), "--observed")
    _check_text(list(args.source or []), "--source")
    observed = list(args.observed or [])
    if observed and len(observed) not in (1, len(prompts)):
        raise _Usage(f"{len(observed)} --observed for {len(prompts)} prompts; give one or one each")
    if len(observed) == 1:
        observed = observed * len(prompts)
    if args.seed + args.num_samples - 1 >= 2**63:
        raise _Usage(f"--seed {args.seed} with --num-samples {args.num_samples} reaches seed "
                     f"{args.seed + args.num_samples - 1}; seeds must be below 2**63")
    try:
        sampler = cfgen.Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as err:
        raise _Usage(str(err).replace("temperature", "--temperature", 1).replace("top_k", "--top-k", 1)
                     .replace("top_p", "--top-p", 1)) from None
    if args.model:
        _check_model_dir(args.model)
    from cfgen import catalogue

    try:  # a misspelt name or a missing folder is answered before the model loads
        catalogue.resolve(args.intervention)
    except catalogue.UnknownEntry as err:
        raise _Usage(f"--intervention: {err}") from None
    settings = _run_settings(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_ranks(args, prompts, observed, sampler, settings)
    out = _check_out(args, settings, prompts, observed)
    try:
        return _run(args, prompts, observed, sampler, settings, out)
    finally:
        if out is not None:
            out.close()


def _run(args, prompts: list[str], observed: list[str], sampler, settings: dict, out: Optional[_Out],
         batches: Optional[list[list[int]]] = None) -> int:
    """Run ``batches`` (lists of prompt indices; default: every prompt not yet in ``out``, in order)."""
    import cfgen

    existing = out.existing if out is not None else None
    if batches is None:
        todo = [i for i in range(len(prompts)) if existing is None or i not in existing.done]
        if existing is not None and not todo and not existing.torn:
            print(f"cfgen run: {args.out} already holds all {existing.records} records of this run; nothing to do")
            return 0
        batches = [[todo[i] for i in b] for b in distributed.batches_of(len(todo), args.batch_size)]

    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tok = AutoTokenizer.from_pretrained(args.model)
        tok.padding_side = "left"
    else:
        model, tok = cfgen.load_default_model()
    intervenable = _load_intervention(args.intervention, model)
    encoded = [_chat(tok, p) if args.chat else p for p in prompts]
    kwargs = dict(sampler=sampler, seed=args.seed, num_samples=args.num_samples, interventional=args.interventional,
                  intervene_on=args.intervene_on)
    if args.source:
        kwargs["sources"] = args.source if len(args.source) > 1 else args.source[0]
    if args.unit_locations is not None:
        kwargs["unit_locations"] = _pyvene_locations(args.unit_locations)

    safe = existing.records if existing else 0
    written = 0
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    if existing is not None and existing.torn:  # a write cut short by a kill: its records are recomputed
        out.file.truncate(out.path.stat().st_size - existing.torn)
        print(f"cfgen run: dropped an incomplete last line ({existing.torn} bytes) from {args.out}", file=sys.stderr)
    if existing is not None and existing.done:
        print(f"cfgen run: resuming {args.out}: {len(existing.done)} of {len(prompts)} prompts done, "
              f"{sum(map(len, batches))} to go", file=sys.stderr)
    interrupted = False
    with _StopAfterBatch() as stop:
        try:
            for batch in tqdm(batches, desc="batches", unit="batch", disable=len(batches) <= 1):
                if stop.requested:
                    break
                chunk = [encoded[i] for i in batch]
                if observed:
                    r = cfgen.counterfactual(intervenable, tok, chunk, [observed[i] for i in batch],
                                             max_new_tokens=args.max_new_tokens, **kwargs)
                else:
                    r = cfgen.generate(intervenable, tok, chunk, max_new_tokens=args.max_new_tokens or 64,
                                       **kwargs)
                if out is not None:
                    lines = []
                    for rec in r.to_records():
                        index = batch[rec["prompt_index"]]
                        rec["prompt"], rec["prompt_index"] = prompts[index], index
                        rec["settings"] = {**rec.get("settings", {}), "cli": settings}
                        if observed:  # per prompt, so outside the settings every record of a run shares
                            rec["observed"] = observed[index]
                        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                    out.append(lines)
                    safe += len(lines)
                written += len(r)
                if not args.quiet:
                    print(r)  # factual, counterfactual and (with --interventional) interventional
                if delay:
                    time.sleep(delay)
            interrupted = stop.requested
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            if safe:
                print(f"cfgen run: stopped by the error below; {safe} records are safe in {args.out} (rerun with "
                      "--resume once it is fixed)", file=sys.stderr, flush=True)
            raise
    if interrupted:
        where = f"{safe} records are safe in {args.out}; rerun with --resume to finish" if args.out else \
            f"{written} records were printed; none saved (no --out)"
        print(f"cfgen run: interrupted; {where}", file=sys.stderr, flush=True)
        return 130
    if args.out:
        more = f" ({safe} in all)" if existing is not None and existing.records else ""
        print(f"wrote {written} records to {args.out}{more}")
    return 0


def _part(out: str, rank: int) -> Path:
    return Path(f"{out}.rank{rank}.part")


def _run_ranks(args, prompts: list[str], observed: list[str], sampler, settings: dict) -> int:
    """``cfgen run`` under torchrun: the single-process batches spread over the ranks, one merged --out.

    Batch ``b`` (the same prompts the single-process run would batch together) runs on rank
    ``b % world_size``, which appends its records to ``OUT.rank<r>.part`` as it goes (so an interrupted
    run keeps them and ``--resume`` continues from every part). When all ranks have finished, rank 0
    writes every record in input order to a temporary file and renames it onto ``--out``: the file is
    byte for byte the single-process run's, and never exists half-written.
    """
    import copy

    import torch.distributed as dist

    if not args.out:
        raise _Usage("under torchrun, give --out FILE: the ranks' records are merged into it")
    final = Path(args.out)
    if final.exists() and final.stat().st_size and not (args.resume or args.overwrite):
        raise _Usage(f"--out {args.out} already exists; pass --resume to continue it or --overwrite to replace it")
    with distributed.ranks() as ctx:
        others = [p for p in final.parent.glob(final.name + ".rank*.part")]
        if args.overwrite and ctx.rank == 0:
            for path in others + [final]:
                path.unlink(missing_ok=True)
        dist.barrier()
        mine = copy.copy(args)
        mine.out, mine.resume, mine.overwrite = str(_part(args.out, ctx.rank)), True, False  # a part is continued
        out = _check_out(mine, settings, prompts, observed)
        status = "ok"
        try:
            done = set(out.existing.done)
            sources = [final] if args.resume and final.exists() else []
            sources += [p for p in final.parent.glob(final.name + ".rank*.part") if p != Path(mine.out)]
            for path in sources:
                done |= _read_existing(path, settings, prompts, observed, args.num_samples, args.seed).done
            dist.barrier()  # every rank has read the parts before any rank appends to its own
            todo = [i for i in range(len(prompts)) if i not in done]
            batches = [[todo[i] for i in b] for b in distributed.batches_of(len(todo), args.batch_size)]
            try:
                assigned = distributed.assign(len(batches), ctx.rank, ctx.world_size)
            except ValueError as err:
                raise _Usage(f"rank {ctx.rank}: {err}") from None
            code = _run(mine, prompts, observed, sampler, settings, out, [batches[b] for b in assigned])
            status = "ok" if code == 0 else f"rank {ctx.rank} stopped (exit code {code})"
        except BaseException as err:
            status = f"rank {ctx.rank} failed: {type(err).__name__}: {err}"
            raise
        finally:
            out.close()
            statuses = [None] * ctx.world_size
            dist.all_gather_object(statuses, status)
        failed = [s for s in statuses if s != "ok"]
        if failed:
            print(f"cfgen run: {'; '.join(failed)}. Finished batches are kept in {final}.rank*.part; rerun the "
                  "same command with --resume to finish", file=sys.stderr, flush=True)
            return 130 if all("exit code 130" in s for s in failed) else 1
        if ctx.rank == 0:
            _merge(final, args.resume)
        dist.barrier()
    return 0


def _merge(final: Path, resume: bool) -> None:
    """Every record of ``final`` (when resuming) and of its part files, in input order, renamed onto ``final``."""
    lines = []
    for path in ([final] if resume and final.exists() else []) + sorted(final.parent.glob(final.name + ".rank*.part")):
        for line in path.read_bytes().splitlines(keepends=True):
            if not line.endswith(b"\n"):  # the torn tail of a killed write: its prompt is in no record yet
                continue
            rec = json.loads(line)
            lines.append(((rec["prompt_index"], rec["sample_index"]), line))
    lines.sort(key=lambda item: item[0])
    tmp = final.with_name(final.name + ".merging")
    with open(tmp, "wb") as f:
        f.write(b"".join(line for _, line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    for path in final.parent.glob(final.name + ".rank*.part"):
        path.unlink()
    print(f"wrote {len(lines)} records to {final}")


# ---------------------------------------------------------------- argument types --
def _int_in(name: str, low: int, high: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{name} must be an integer {bound}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


_finite_float.__name__ = "float"
_UNIT_EXAMPLE = ('e.g. 3, [3, 5], {"base": [3, 5]}, {"sources->base": [2, 3]} (source position 2 into base '
                 'position 3) or {"sources->base": [[2, 4], [3, 5]]}')


def _depth(value, where: str) -> int:
    """Nesting depth of a list of non-negative ints, the same at every branch."""
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise argparse.ArgumentTypeError(f"{where}: {json.dumps(value)} is not a position (an int >= 0) or a list")
    if isinstance(value, int):
        if value < 0:
            raise argparse.ArgumentTypeError(f"{where}: position {value} is negative; positions count from 0 "
                                             "at each prompt's first token")
        return 0
    if not value:
        raise argparse.ArgumentTypeError(f"{where}: an empty list names no position")
    depths = {_depth(v, where) for v in value}
    if len(depths) != 1:
        raise argparse.ArgumentTypeError(f"{where}: {json.dumps(value)} mixes positions and lists of positions")
    return depths.pop() + 1


def _unit_locations(text: str) -> dict:
    """``--unit-locations`` JSON -> {"base": ...} or {"sources->base": ...} (a 2-list there: [source, base])."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({err}); {_UNIT_EXAMPLE}") from None
    if not isinstance(value, dict):
        value = {"base": value}  # a bare int or list: base positions, as pyvene reads them
    if len(value) != 1 or next(iter(value)) not in ("sources->base", "base"):
        raise argparse.ArgumentTypeError(f"{text!r}: a dict must have one key, \"sources->base\" or \"base\"; "
                                         f"{_UNIT_EXAMPLE}")
    (key, locs), = value.items()
    depth = _depth(locs, f"{key!r} in {text!r}")
    if depth > 3:
        raise argparse.ArgumentTypeError(f"{text!r} nests {depth} lists; pyvene reads at most 3 "
                                         "([intervention][prompt][positions])")
    return {key: locs}


def _pyvene_locations(locations: dict) -> dict:
    """JSON has no tuples: a two-element list under "sources->base" is pyvene's (source, base) pair."""
    (key, locs), = locations.items()
    if key == "sources->base" and isinstance(locs, list) and len(locs) == 2:
        return {key: tuple(locs)}
    return {key: locs}


def _intervene_on(text: str):
    if text in ("prompt", "generation", "all"):
        return text
    try:
        value = json.loads(text) if text.lstrip().startswith("[") else [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use prompt, generation, all, or positions such as 3,5,7 or [3, 5, 7]") from None
    if not value or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in value):
        raise argparse.ArgumentTypeError(f"{text!r}: positions must be a non-empty list of ints >= 0 "
                                         "(counting from each prompt's first token)")
    return value


_intervene_on.__name__ = "intervene-on"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag's default, where it has one (not for unset values, switches or required flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def _sampler_flags(p: argparse.ArgumentParser, temperature: float = 1.0) -> None:
    p.add_argument("--temperature", type=_finite_float, default=temperature, metavar="T",
                   help="sampling temperature (>= 0); 0 means greedy")
    p.add_argument("--top-k", type=_int_in("--top-k", 0), default=None, metavar="K",
                   help="sample among the k most likely tokens (0 or unset: no top-k)")
    p.add_argument("--top-p", type=_finite_float, default=None, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= p, in (0, 1]")
    p.add_argument("--seed", type=_int_in("--seed", 0, 2**63 - 1), default=0, metavar="N",
                   help="noise seed; sample j of each prompt uses seed + j; the same seed gives the same text")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = _Help
    parser = argparse.ArgumentParser(prog="cfgen", description="Noise-matched counterfactual text for LM interventions",
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"cfgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="factual vs counterfactual text on the embedded model", formatter_class=fmt,
                       description="An activation patch, a steering vector and hindsight on the embedded model: "
                                   "factual, counterfactual and interventional text, with an HTML report.")
    from . import demo as show  # the demo's defaults (cfgen.demo imports no model library at import)

    _sampler_flags(d, temperature=show.TEMPERATURE)
    d.set_defaults(seed=3)
    d.add_argument("--prompt", default=show.STORY,
                   help="the steering section's user message (wrapped in the chat template)")
    d.add_argument("--observed", default=show.OBSERVED,
                   help="a continuation of the landmark prompt to take hindsight counterfactuals of")
    d.add_argument("--intervention", default="steering_dark", metavar="NAME|DIR",
                   help="the steering section's intervention: a catalogue name or a folder written by cfgen.save")
    d.add_argument("--steering-scale", type=_finite_float, default=show.STEERING_SCALE, metavar="S",
                   help="multiplies the steering vector (the default: the largest fluent strength in a sweep; "
                        "1 = as saved)")
    d.add_argument("--max-new-tokens", type=_int_in("--max-new-tokens", 1), default=40, metavar="N",
                   help="new tokens per text at most (the patch section stops at 20)")
    d.add_argument("--num-samples", type=_int_in("--num-samples", 1), default=3, metavar="N",
                   help="seeds per section, and posterior draws for the hindsight section")
    d.add_argument("--out", default="cfgen_report.html", help="where to write the HTML report")
    d.set_defaults(func=demo, parser=d)

    r = sub.add_parser("run", help="counterfactual text for any saved intervention directory", formatter_class=fmt,
                       description="Factual and noise-matched counterfactual text for prompts under a saved "
                                   "intervention. With --out, each finished batch is appended to the file at once; "
                                   "Ctrl-C stops after the current batch (exit 130) and --resume continues.")
    r.add_argument("--intervention", required=True, metavar="NAME|DIR",
                   help="a catalogue name (cfgen.catalogue.names()) or a folder written by cfgen.save")
    r.add_argument("--model", default=None, metavar="DIR", help="a local Hugging Face model folder (unset: the embedded model)")
    r.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    r.add_argument("--prompts-file", metavar="FILE", help="a UTF-8 file with one prompt per line (blank lines skipped)")
    r.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    r.add_argument("--observed", action="append", metavar="TEXT",
                   help="hindsight: an observed continuation (one for all prompts, or one per prompt, repeatable)")
    _sampler_flags(r)
    r.add_argument("--num-samples", type=_int_in("--num-samples", 1), default=1, metavar="N",
                   help="(factual, counterfactual) pairs per prompt")
    r.add_argument("--max-new-tokens", type=_int_in("--max-new-tokens", 1), default=None, metavar="N",
                   help="new tokens per text at most (unset: 64, or the observed length with --observed)")
    r.add_argument("--source", action="append", metavar="TEXT",
                   help="interchange source prompt (one for all prompts, or one per prompt, repeatable)")
    r.add_argument("--unit-locations", type=_unit_locations, default=None, metavar="JSON",
                   help="pyvene unit_locations as JSON: an int or list (base positions), or a dict with key "
                        '"base" or "sources->base", whose two-element list means [source, base]; ' + _UNIT_EXAMPLE)
    r.add_argument("--intervene-on", type=_intervene_on, default=None, metavar="WHEN",
                   help="when the intervention applies: prompt, generation, all, or positions such as 3,5,7 "
                        "(unset: prompt with --unit-locations, else all)")
    r.add_argument("--interventional", action="store_true",
                   help="also sample the intervened model with fresh noise (the interventional baseline)")
    r.add_argument("--batch-size", type=_int_in("--batch-size", 1), default=8, metavar="N", help="prompts per batch")
    r.add_argument("--out", metavar="FILE", help="append results to this file as JSON lines, one batch at a time")
    r.add_argument("--resume", action="store_true",
                   help="continue --out: skip the prompts already in it (it must have been written with the same "
                        "settings)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    r.add_argument("--quiet", action="store_true", help="do not print the results")
    r.set_defaults(func=run, parser=r)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the ``cfgen`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> from cfgen.cli import main
        >>> main(["run", "--help"])  # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _Usage as err:
        args.parser.error(str(err))  # one line after the usage, exit 2
    except KeyboardInterrupt:
        print(f"cfgen {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ModuleNotFoundError) as err:
        print(f"cfgen {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
