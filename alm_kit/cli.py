"""The ``alm-kit`` command line. Heavy modules are imported inside each command, so ``--help`` is fast."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

#: exit status of a command that finished but with failed items (``generate --input``, ``eval``,
#: ``rephrase``): the output is complete except those, which a re-run (``--retry-errors``) tries again.
#: 0 is success, 2 a user error (one ``error:`` line), 130 an interrupted ``train``.
EXIT_FAILED_ITEMS = 3


def _recipe(path: str, overrides: Sequence[str]):
    from alm_kit.config import load_recipe

    return load_recipe(path, list(overrides))


def cmd_train(args: argparse.Namespace) -> int:
    from alm_kit.evaluation.scoring import format_table
    from alm_kit.sources import check_sources
    from alm_kit.training.engine import train

    recipe = _recipe(args.recipe, args.overrides)
    check_sources(recipe, args.recipe)  # data files, checkpoints, hub models: before anything is built
    result = train(recipe, progress=not args.quiet, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    print(f"checkpoint: {result.checkpoint}")
    if result.interrupted:
        print(f"interrupted after step {result.steps}; continue with: alm-kit train {args.recipe} --resume")
        return 130
    if result.losses:
        print(f"loss: first {result.losses[0]:.4f}, last {result.losses[-1]:.4f} after {result.steps} steps")
    if result.evaluation:
        print(f"\nheld-out multiple-choice accuracy ({recipe.data.eval}):\n")
        print(format_table(result.evaluation["table"]))
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a recipe: alm-kit train RECIPE.yaml [key.path=value ...]")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. training.lr=3e-4 data.train=x.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints of an earlier run in the same folder and start again")
    p.set_defaults(func=cmd_train)


def cmd_export(args: argparse.Namespace) -> int:
    from alm_kit.checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {out} (LoRA merged; load it like any checkpoint)")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a self-contained inference folder (LoRA merged)")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("out")
    p.set_defaults(func=cmd_export)


def cmd_plot(args: argparse.Namespace) -> int:
    from alm_kit.training.monitor import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's loss and accuracy curves as a PNG (needs matplotlib)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)


def cmd_compare(args: argparse.Namespace) -> int:
    from alm_kit.workflows.compare import compare, format_markdown

    comparison = compare(args.sources, args.eval, steps=args.steps, seeds=args.seeds, out_dir=args.out,
                         overrides=args.set, limit=args.limit, progress=not args.quiet)
    print(format_markdown(comparison))
    written = ", ".join(str(p) for p in sorted(Path(args.out).glob("compare*.*")))
    print(f"\nwrote {written}")
    return 0


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train/load several models, score them on one test file, write a "
                                       "table (Markdown + CSV) and a plot")
    p.add_argument("sources", nargs="+", metavar="RECIPE_OR_RUN",
                   help="recipe files (trained here) or run folders / checkpoints (used as they are)")
    p.add_argument("--eval", help="MMAU-format test file (default: the first recipe's data.eval)")
    p.add_argument("--steps", type=int, help="training steps for every recipe (training.max_steps)")
    p.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="train every recipe K times (training.seed, +1, ...; OUT/runs/NAME/seed-N): the table "
                        "gives mean and 95%% interval over test items and seeds (default: 1)")
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override applied to every recipe (repeatable)")
    p.add_argument("--limit", type=int, help="score only the first N test items")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)


def _generation_overrides(args: argparse.Namespace) -> dict:
    """Generation settings given on the command line (unset ones keep the recipe's)."""
    names = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams", "repetition_penalty",
             "seed", "batch_size", "encoder_batch", "thinking", "thinking_budget", "cuda_graphs")
    out = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.do_sample:
        out["do_sample"] = True
    if args.stop:
        out["stop"] = list(args.stop)
    return out


def _load_for_generate(args: argparse.Namespace, device: str):
    from alm_kit.inference.api import ALM

    alm = ALM.from_pretrained(args.checkpoint, device=device, dtype=args.dtype)
    if args.thinking is not None and not alm.engine.thinking_switch:
        print(f"note: --{'' if args.thinking else 'no-'}thinking is ignored: this model's layout "
              f"({alm.recipe.model.layout.name}) has no thinking mode", file=sys.stderr)
    return alm


def cmd_generate(args: argparse.Namespace) -> int:
    from alm_kit.inference.engine import GenerationError

    if (args.input is None) == (args.prompt is None):
        raise GenerationError("give either --audio/--prompt (one example) or --input FILE.jsonl --output OUT.jsonl")
    if args.prompt is not None and not args.audio:
        raise GenerationError("--prompt needs at least one --audio")
    if args.input is not None and args.output is None:
        raise GenerationError("--input needs --output (the JSONL file the answers go to)")
    if args.input is None:
        alm = _load_for_generate(args, args.device)
        result = alm.generate(args.audio, args.prompt, **vars(alm.engine.params(**_generation_overrides(args))))
        if args.json:
            print(json.dumps({"text": result.text, "answer": result.answer, "thought": result.thought,
                              "finish_reason": result.finish_reason}, ensure_ascii=False))
        else:
            print(result.text)
        if not result.answer:
            print(f"note: {_empty_answer_reason(result)}", file=sys.stderr)
        return 0
    from alm_kit.inference.files import generate_file
    from alm_kit.parallel import joined

    with joined() as ranks:  # under torchrun each rank answers a share of the file
        alm = _load_for_generate(args, ranks.device(args.device))
        report = generate_file(alm.engine, args.input, args.output, alm.engine.params(**_generation_overrides(args)),
                               progress=not args.quiet, retry_errors=args.retry_errors, ranks=ranks)
    if not ranks.is_main:  # rank 0 reports; an early non-zero exit here would make torchrun stop it
        return 0
    print(report.summary())
    if report.empty:
        print(f"note: {report.empty} of the answers are empty (the model ended before any answer text); "
              "--min-new-tokens N makes it generate at least N tokens", file=sys.stderr)
    return EXIT_FAILED_ITEMS if report.failed_rows else 0


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a prompt about audio clips, or a JSONL file of examples (resumable)")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory, or a recipe .yaml")
    p.add_argument("--audio", action="append", help="audio file (repeat for a second clip)")
    p.add_argument("--prompt")
    p.add_argument("--input", help="JSONL of {id, audio, prompt} (paths relative to the file)")
    p.add_argument("--output", help="JSONL the answers are appended to; ids already there are skipped")
    p.add_argument("--retry-errors", action="store_true", help="answer again the examples that failed before")
    p.add_argument("--json", action="store_true", help="one example: print text, answer, thought as JSON")
    add_device_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_generation_options(p)
    p.set_defaults(func=cmd_generate)


def _empty_answer_reason(result) -> str:
    """Why ``generate`` printed an empty answer, and what to try."""
    if result.finish_reason == "stop" and not result.tokens:
        return ("the answer is empty: the model produced its end token first; --min-new-tokens N makes it "
                "generate at least N tokens")
    if result.finish_reason == "length":
        return "the answer is empty: max_new_tokens ran out before the answer began (--max-new-tokens)"
    return (f"the answer is empty (finish reason: {result.finish_reason}; the model generated only special "
            "tokens or a thought); --min-new-tokens N makes it generate at least N tokens")


def cmd_rephrase(args: argparse.Namespace) -> int:
    from alm_kit.workflows.rephrase import load_text_engine, rephrase_file

    engine, recipe = load_text_engine(args.source, device=args.device, overrides=args.overrides)
    params = engine.params(batch_size=args.batch_size, thinking=args.thinking, thinking_budget=args.thinking_budget)
    report = rephrase_file(engine, recipe, args.input, args.output, params, limit=args.limit, retry=args.retry,
                           progress=not args.quiet)
    print(report.summary())
    return EXIT_FAILED_ITEMS if report.failed else 0


def add_rephrase_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rephrase", help="ALARM self-rephrasing: the recipe's decoder answers from each example's "
                                        "text description, then rewrites the answer as if it had heard the audio")
    p.add_argument("source", metavar="RECIPE_OR_CHECKPOINT", help="a recipe .yaml (its decoder only) or a checkpoint")
    p.add_argument("--in", dest="input", required=True, help="JSONL with id, audio, prompt, description")
    p.add_argument("--out", dest="output", required=True,
                   help="training manifest written (appended; ids already there or in OUT.rejected.jsonl are skipped)")
    p.add_argument("--batch-size", type=int, help="examples generated together (default: generation.batch_size)")
    p.add_argument("--limit", type=int, help="only the first N examples of the input")
    p.add_argument("--retry", action="store_true", help="run the rejected examples (errors, filtered) again")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="recipe override, e.g. generation.temperature=0.7 (repeatable; a checkpoint takes only "
                        "rephrase.* and generation.*, paths relative to the current directory)")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="thinking on/off (default: generation.thinking)")
    p.add_argument("--thinking-budget", type=int, help="most thought tokens (default: generation.thinking_budget)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_rephrase)


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from alm_kit.inference.api import ALM
    from alm_kit.inference.server import ALMServer, ServerLimits

    alm = ALM.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
    limits = ServerLimits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_audio_seconds=args.max_audio_seconds,
                          max_tokens=args.max_tokens, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                          body_timeout_s=args.body_timeout, max_connections=args.max_connections)
    server = ALMServer(alm.engine, host=args.host, port=args.port, limits=limits,
                       model_name=args.model_name or Path(args.checkpoint).resolve().name, verbose=not args.quiet)
    print(f"serving {args.checkpoint} on {server.url} (POST /v1/chat/completions, GET /health, API page "
          f"{server.url}/docs); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="HTTP server: OpenAI-style chat completions with audio, batched")
    p.add_argument("checkpoint", help="checkpoint or run directory, or a recipe .yaml")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    add_device_options(p)
    p.add_argument("--model-name", help="the model id the API reports (default: the checkpoint folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests answered together")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a request waits for company")
    p.add_argument("--max-upload-mb", type=float, default=25.0)
    p.add_argument("--max-audio-seconds", type=float, default=120.0)
    p.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client has to send its request body (then 408)")
    p.add_argument("--max-connections", type=int, default=64,
                   help="open connections and requests in progress; beyond it new requests get 503")
    p.add_argument("--quiet", action="store_true", help="no request log")
    p.set_defaults(func=cmd_serve)


def add_device_options(p: argparse.ArgumentParser) -> None:
    """--device and --dtype of the commands that load a model for inference."""
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights (default: the recipe's generation.dtype; auto: bf16 on CUDA, fp32 on the CPU)")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (default: the recipe's generation section)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int,
                   help="no end token before this many new tokens (for a model that would answer with nothing)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--num-beams", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--encoder-batch", type=lambda v: v if v in ("auto", "all") else int(v),
                   help="clips per encoder pass: auto (all on CUDA, 4 on CPU), all, or a number")
    g.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="thinking decoders (Qwen3): thinking on/off")
    g.add_argument("--thinking-budget", type=int, help="most thought tokens before the thought is closed")
    g.add_argument("--cuda-graphs", type=lambda v: {"on": True, "off": False}.get(v, v), choices=["auto", True, False],
                   metavar="{auto,on,off}", help="decode steps as CUDA graphs: auto (on CUDA), on, off (eager)")


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from alm_kit.checkpoint import resolve_checkpoint
    from alm_kit.errors import AlmKitError
    from alm_kit.evaluation.formats import read_benchmark
    from alm_kit.evaluation.runner import checkpoint_fingerprint, evaluate_benchmark
    from alm_kit.inference.api import load_model
    from alm_kit.parallel import joined

    if args.plot:
        from alm_kit.evaluation.plots import _pyplot

        _pyplot()  # fail before the run, not after it
    benchmark = read_benchmark(args.file, args.format, audio_root=args.audio_root)
    directory = resolve_checkpoint(args.checkpoint)
    if args.template is not None and args.template_from_data is not None:
        raise AlmKitError("give --template or --template-from-data, not both")
    template = _template_option(args.template) if args.template is not None else None
    if args.template_from_data is not None:
        from alm_kit.checkpoint import read_recipe
        from alm_kit.evaluation.runner import template_from_manifest

        template, source = template_from_manifest(read_recipe(directory), args.template_from_data or None)
        print(f"template from {source}: {_describe_template(template)}", file=sys.stderr)
    with joined() as ranks:  # under torchrun each rank answers a share of the items
        model, recipe = load_model(directory, device=ranks.device(args.device), dtype=args.dtype)
        changes = {"mcq_template": template, "max_new_tokens": args.max_new_tokens,
                   "batch_size": args.batch_size, "dtype": args.dtype}
        try:
            gen = dataclasses.replace(recipe.generation, **{k: v for k, v in changes.items() if v is not None})
        except ValueError as exc:
            raise AlmKitError(f"bad generation setting: {exc}") from None
        out = Path(args.out) if args.out else directory / "eval" / Path(args.file).stem
        result = evaluate_benchmark(model, gen, benchmark, checkpoint=checkpoint_fingerprint(directory),
                                    out_dir=out, limit=args.limit, reuse=not args.fresh, progress=not args.quiet,
                                    plot=args.plot, ranks=ranks, method=args.scoring)
    if not ranks.is_main:  # rank 0 reports; an early non-zero exit here would make torchrun stop it
        return 0
    print(result.markdown)
    if result.reused:
        print(f"\n{result.reused} answer(s) reused from an earlier run with the same checkpoint and settings")
    if result.failed:
        print(f"\n{len(result.failed)} item(s) failed and count as wrong:", file=sys.stderr)
        for failure in result.failed[:10]:
            print(f"  {failure['id']}: {failure['error']}", file=sys.stderr)
        if len(result.failed) > 10:
            print(f"  ... all of them in {result.files['results']}", file=sys.stderr)
    print("\n" + "\n".join(f"{name}: {path}" for name, path in result.files.items()))
    return EXIT_FAILED_ITEMS if result.failed else 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    from alm_kit.evaluation.formats import FORMATS
    from alm_kit.evaluation.runner import SCORING_METHODS

    p = sub.add_parser("eval", help="multiple-choice accuracy of a checkpoint on a benchmark file "
                                    "(MMAU, MMAR, MMSU, AIR-Bench, alm-kit MCQ JSONL)")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("file", help="the benchmark's file as published; audio paths are relative to it")
    p.add_argument("--format", choices=list(FORMATS), help="default: detected from the first record")
    p.add_argument("--out", help="output folder (default: CHECKPOINT/eval/<file stem>)")
    p.add_argument("--plot", action="store_true", help="a bar chart PNG per grouping (needs matplotlib)")
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--scoring", choices=SCORING_METHODS, default="generate",
                   help="generate: the model writes an answer, scored with the benchmark's rule (default); "
                        "likelihood: the option the model finds most likely after the prompt (lm-eval-harness style)")
    p.add_argument("--template", help="generation.mcq_template: auto, mellow, chat, a template string, or a "
                                      "mapping {prompt: ..., choice: '({label}) {choice}', labels: lower, "
                                      "separator: ' '}")
    p.add_argument("--template-from-data", nargs="?", const="", metavar="MANIFEST",
                   help="ask in the style of the training prompts: the template is recovered from MANIFEST "
                        "(default: the checkpoint recipe's data.train)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--audio-root", help="folder the audio paths are relative to (default: the file's folder)")
    p.add_argument("--fresh", action="store_true", help="ignore answers saved by an earlier run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_options(p)
    p.set_defaults(func=cmd_eval)


def _template_option(value: str):
    """``--template``: a name, a prompt string, or a YAML mapping ``{prompt: ..., choice: ..., labels: ...,
    separator: ...}`` that sets how the options are written."""
    import yaml

    from alm_kit.config.parse import parse_dataclass
    from alm_kit.text.mcq import McqTemplate

    try:
        data = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if not isinstance(data, dict) or "prompt" not in data:
        return value
    return parse_dataclass(McqTemplate, data, path="--template", origin=lambda _key: "command line")


def _describe_template(template) -> str:
    import json

    return json.dumps(vars(template), ensure_ascii=False)


def cmd_import(args: argparse.Namespace) -> int:
    from alm_kit.importers import get_importer

    out = get_importer(args.kind)(args.source, args.out_dir, recipe=args.recipe, overrides=args.overrides)
    print(f"wrote {out} (load it with alm-kit generate/eval like any checkpoint)")
    return 0


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    from alm_kit.importers import IMPORTERS

    p = sub.add_parser("import", help="convert another project's checkpoint, e.g. alm-kit import mellow v0.ckpt OUT")
    p.add_argument("kind", choices=sorted(IMPORTERS))
    p.add_argument("source", help="the checkpoint file (e.g. Mellow's v0.ckpt or v0_s.ckpt)")
    p.add_argument("out_dir")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.decoder.params.pretrained=/models/smollm2")
    p.add_argument("--recipe", help="the recipe to build (default: recipes/mellow.yaml for mellow)")
    p.set_defaults(func=cmd_import)


def cmd_plugins(args: argparse.Namespace) -> int:
    from alm_kit.registry import get_registry
    from alm_kit.registry.manager import BUILTIN_PLUGINS

    registry = get_registry()
    rows = [{"kind": e.kind, "name": e.name, "provider": e.provider.distribution, "version": e.provider.version,
             "plugin": e.provider.plugin, "target": e.target_path, "description": e.description} for e in registry]
    if args.json:
        print(json.dumps({"components": rows, "failures": [vars(f) | {"traceback": None}
                                                            for f in registry.failures]}, indent=2))
        return 0
    for r in rows:  # a plugin's entry-point name (what ALM_KIT_LOAD_PLUGINS selects) after its distribution
        r["provider"] += f" {r['version']}" + ("" if r["plugin"] in BUILTIN_PLUGINS else f" ({r['plugin']})")
    widths = [max(len(r[k]) for r in rows) for k in ("kind", "name", "provider")]
    for r in rows:
        print(f"{r['kind']:<{widths[0]}}  {r['name']:<{widths[1]}}  {r['provider']:<{widths[2]}}  {r['description']}")
    for group in registry.duplicates():
        print(f"\nconflict: {group[0].kind} '{group[0].name}' is registered by "
              + " and ".join(str(e.provider) for e in group), file=sys.stderr)
    for failure in registry.failures:
        print(f"\nwarning: {failure}", file=sys.stderr)
    return 0


def add_plugins_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list every registered component and its provider")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)


def cmd_recipe_show(args: argparse.Namespace) -> int:
    from alm_kit.config import dump_recipe

    print(dump_recipe(_recipe(args.recipe, args.overrides)), end="")
    return 0


def cmd_recipe_validate(args: argparse.Namespace) -> int:
    from alm_kit.config.loader import origin_of
    from alm_kit.model import model_entries
    from alm_kit.registry.build import resolve_component

    recipe = _recipe(args.recipe, args.overrides)
    model = recipe.model
    for kind, spec, key in model_entries(model):
        resolve_component(kind, spec, key, origin=lambda k: origin_of(recipe, k))
    print(f"{args.recipe}: ok ({recipe.name}: {len(model.encoders)} encoder(s), projector "
          f"'{model.projector.name}', decoder '{model.decoder.name}', layout '{model.layout.name}')")
    return 0


def add_recipe_parser(sub: argparse._SubParsersAction) -> None:
    recipe = sub.add_parser("recipe", help="show or validate a recipe").add_subparsers(dest="recipe_command",
                                                                                      required=True)
    for name, func, text in (("show", cmd_recipe_show, "print the fully resolved recipe"),
                             ("validate", cmd_recipe_validate, "check a recipe and its component params")):
        p = recipe.add_parser(name, help=text)
        p.add_argument("recipe")
        p.add_argument("overrides", nargs="*")
        p.set_defaults(func=func)


def cmd_cache(args: argparse.Namespace) -> int:
    from alm_kit.workflows.cache import cache_recipe

    recipe = _recipe(args.recipe, args.overrides)
    for label, report in cache_recipe(recipe, progress=not args.quiet, batch_size=args.batch_size).items():
        print(f"{label}: {report}")
    return 0


def add_cache_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="encode a recipe's training clips with its frozen encoders into the "
                                     "disk feature cache ahead of training")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. training.cache_dir=/fast/disk")
    p.add_argument("--batch-size", type=int, default=16, help="clips per encoder call")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache)


def cmd_data_shard(args: argparse.Namespace) -> int:
    from alm_kit.data.shards import write_shards

    report = write_shards(args.manifest, args.out_dir, prefix=args.prefix, max_per_shard=args.max_per_shard,
                          max_shard_bytes=args.max_shard_bytes, format=args.format,
                          skip_bad_audio=args.skip_bad_audio, progress=not args.quiet)
    for problem in report.skipped:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"wrote {report.examples} examples ({report.bytes / 2**20:.1f} MiB) to {len(report.shards)} shard(s)")
    print(f"data.train: {report.pattern}")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from alm_kit.data.synth import synthesize

    report = synthesize(args.out_dir, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                        speech=args.speech, progress=not args.quiet, workers=args.workers)
    print(f"wrote {report.n_train} training examples to {report.train_manifest}")
    print(f"wrote {report.n_test} test items to {report.test_file}")
    print(f"tasks: {', '.join(report.tasks)}")
    return 0


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("shard", help="write WebDataset tar shards from a manifest (audio bytes copied as they are)")
    p.add_argument("manifest")
    p.add_argument("out_dir")
    p.add_argument("--max-per-shard", type=int, default=1000, help="examples per shard (default 1000)")
    p.add_argument("--max-shard-bytes", type=float, default=float(1 << 30),
                   help="close a shard once it holds this many bytes (default 1 GiB; 0: no limit)")
    p.add_argument("--prefix", help="shard names PREFIX-000000.tar ... (default: the manifest's name)")
    p.add_argument("--format", choices=["auto", "jsonl", "reasonaqa"], default="auto")
    p.add_argument("--skip-bad-audio", action="store_true", help="leave out examples with unreadable audio")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_data_shard)

    p = data.add_parser("synth", help="write the synthetic audio QA set (train manifest + MMAU-format test)")
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speech", action=argparse.BooleanOptionalAction, default=None,
                   help="spoken-word items with espeak-ng (default: when it is installed)")
    p.add_argument("--workers", type=int, help="processes (default: the usable CPUs, at most 8); "
                   "the data set is the same for any number")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_data_synth)


#: every command, in the order ``alm-kit --help`` lists them
COMMANDS = (add_train_parser, add_export_parser, add_plot_parser, add_compare_parser, add_generate_parser,
            add_rephrase_parser, add_serve_parser, add_eval_parser, add_import_parser, add_cache_parser,
            add_plugins_parser, add_recipe_parser, add_data_parser)


def build_parser() -> argparse.ArgumentParser:
    """The ``alm-kit`` parser: each command adds its own sub-parser (``add_*_parser``, next to its handler)."""
    from alm_kit import __version__

    parser = argparse.ArgumentParser(prog="alm-kit", description="Train and run small audio-language models.")
    parser.add_argument("--version", action="version", version=f"alm-kit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key.path=value`` overrides may also come after options
    (``alm-kit train R.yaml --quiet training.lr=3e-4``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """alm-kit's own warnings as one ``warning: ...`` line (others as Python shows them)."""
    from alm_kit.errors import AlmKitWarning

    if issubclass(category, AlmKitWarning):
        print(f"warning: {message}", file=file or sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from alm_kit.errors import AlmKitError

    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except (AlmKitError, OSError) as exc:  # OSError: a file or the network (transformers' hub errors too)
        if os.environ.get("ALM_KIT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
