"""The ``llavakit`` command line: chat, convert (more subcommands arrive with their issues)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

EXAMPLES = {
    "chat": 'example: llavakit chat --image photo.jpg "What is in this picture?"',
    "train": "example: llavakit train recipes/demo/stage1.yaml  (or the original flags: "
    "--model_name_or_path LLM --version plain --data_path data.json --image_folder images "
    "--vision_tower TOWER --tune_mm_mlp_adapter True --output_dir out)",
    "validate-data": "example: llavakit validate-data data.json --image-folder images --model demo",
    "serve": "example: llavakit serve --model demo --port 8000  (then: curl "
    "http://127.0.0.1:8000/v1/models; web UI at http://127.0.0.1:8000/ui)",
    "controller": "example: llavakit controller --port 10000",
    "worker": "example: llavakit worker --controller http://127.0.0.1:10000 --port 40000 --model demo",
    "web": "example: llavakit web --controller http://127.0.0.1:10000 --port 7860",
    "convert": "example: llavakit convert liuhaotian-llava-v1.5-7b llava-1.5-7b-hf --from original --check",
}


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llavakit", description="LLaVA: chat, convert, train, serve, evaluate."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser(
        "chat",
        help="chat about images (one-shot with PROMPT, REPL without)",
        epilog=EXAMPLES["chat"],
    )
    chat.add_argument("prompt", nargs="?", help="the question; omit for an interactive session")
    chat.add_argument(
        "--model", default="demo", help="checkpoint directory or hub id (default: bundled demo)"
    )
    chat.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    chat.add_argument("--system", default=None, help="override the template's system prompt")
    chat.add_argument(
        "--template", default=None, help="override the checkpoint's conversation template"
    )
    chat.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    chat.add_argument("--device", default="cpu")
    chat.add_argument("--no-stream", action="store_true", help="print the answer at the end")
    chat.add_argument(
        "--gguf",
        default=None,
        choices=["f16", "q8_0"],
        help="run the language model in llama.cpp as GGUF f16 / q8_0 (converted once, cached; "
        "needs llama-cpp-python: make llamacpp)",
    )
    chat.add_argument("--allow-url", action="store_true", help="allow http(s) image URLs")
    _add_generation_args(chat)

    conv = sub.add_parser(
        "convert",
        help="convert a checkpoint to the transformers layout",
        epilog=EXAMPLES["convert"],
    )
    conv.add_argument("input", help="checkpoint directory (never modified), or 'demo'")
    conv.add_argument("output", help="new directory to write (refused if it exists)")
    conv.add_argument(
        "--from",
        dest="fmt",
        choices=["original", "hf", "lora"],
        default=None,
        help="input layout (default: detect)",
    )
    conv.add_argument(
        "--vision-tower", default=None, help="vision tower directory for original checkpoints"
    )
    conv.add_argument(
        "--template", default=None, help="template the model was trained with (original: vicuna_v1)"
    )
    conv.add_argument("--dtype", default="float32", help="dtype to save in (float32 | bfloat16)")
    conv.add_argument(
        "--check", action="store_true", help="compare logits of input and output on a sample"
    )
    sub.add_parser(
        "train",
        help="train a LLaVA stage (original LLaVA flags or a YAML recipe)",
        epilog=EXAMPLES["train"],
        add_help=False,
    )
    from llavakit.data.validate import add_validate_parser

    add_validate_parser(sub)
    _add_serving_parsers(sub)
    return parser


def _add_serving_parsers(sub) -> None:
    serve = sub.add_parser(
        "serve", help="OpenAI-compatible API server (+ web UI at /ui)", epilog=EXAMPLES["serve"]
    )
    worker = sub.add_parser(
        "worker", help="LLaVA model worker (registers with a controller)", epilog=EXAMPLES["worker"]
    )
    for p in (serve, worker):
        p.add_argument("--model", default="demo", help="checkpoint (default: bundled demo)")
        p.add_argument("--name", default=None, help="model name clients use (default: dir name)")
        p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
        p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
        p.add_argument("--quantize", default=None, choices=["int8", "int8w", "bnb8", "bnb4"])
        p.add_argument(
            "--gguf",
            default=None,
            choices=["f16", "q8_0"],
            help="run the language model in llama.cpp (GGUF, converted once and cached)",
        )
        p.add_argument("--max-batch", type=int, default=16, help="running batch slots")
        p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
        p.add_argument("--max-images", type=int, default=4, help="images per request")
        p.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit")
        p.add_argument("--max-pixels", type=int, default=16_000_000, help="pixels per image")
        p.add_argument(
            "--allow-url-fetch",
            action="store_true",
            help="fetch http(s) image URLs (public addresses only)",
        )
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("LLAVAKIT_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LLAVAKIT_API_KEY)",
    )
    serve.add_argument("--no-ui", action="store_true", help="do not mount the Gradio UI")
    worker.add_argument("--port", type=int, default=40000)
    worker.add_argument("--controller", default="http://127.0.0.1:10000")
    worker.add_argument(
        "--worker-address", default=None, help="address the controller uses (default: host:port)"
    )
    worker.add_argument("--heartbeat", type=float, default=15.0, help="seconds between beats")
    controller = sub.add_parser(
        "controller",
        help="LLaVA controller: workers register, clients dispatch",
        epilog=EXAMPLES["controller"],
    )
    controller.add_argument("--host", default="127.0.0.1")
    controller.add_argument("--port", type=int, default=10000)
    controller.add_argument(
        "--heartbeat-expiry", type=float, default=45.0, help="drop workers silent this long"
    )
    web = sub.add_parser(
        "web", help="Gradio web UI over a controller's models", epilog=EXAMPLES["web"]
    )
    web.add_argument("--controller", default="http://127.0.0.1:10000")
    web.add_argument("--host", default="127.0.0.1")
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--side-by-side", action="store_true", help="compare two models")


def _limits(args):
    from llavakit.serve.requests import ServeLimits

    return ServeLimits(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_images=args.max_images,
        max_pixels=args.max_pixels,
        allow_url_fetch=args.allow_url_fetch,
    )


def _serving(args) -> int:
    dtype = None if getattr(args, "dtype", "auto") == "auto" else args.dtype
    if args.command == "serve":
        from llavakit.serve.api import serve

        serve(
            args.model,
            args.host,
            args.port,
            api_key=args.api_key,
            name=args.name,
            dtype=dtype,
            limits=_limits(args),
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            ui=not args.no_ui,
            quantize=args.quantize,
            gguf=args.gguf,
        )
    elif args.command == "worker":
        from llavakit.serve.worker import run_worker

        run_worker(
            args.model,
            args.controller,
            args.host,
            args.port,
            args.worker_address,
            name=args.name,
            dtype=dtype,
            limits=_limits(args),
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            heartbeat=args.heartbeat,
            quantize=args.quantize,
            gguf=args.gguf,
        )
    elif args.command == "controller":
        from llavakit.serve.controller import run_controller

        run_controller(args.host, args.port, args.heartbeat_expiry)
    else:
        from llavakit.serve.web import run_web

        run_web(args.controller, args.host, args.port, args.side_by_side)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from llavakit.errors import LlavakitError

    if argv[:1] == ["train"]:
        return _train(argv[1:])
    args = build_parser().parse_args(argv)

    try:
        if args.command == "chat":
            return _chat(args)
        if args.command == "convert":
            return _convert(args)
        if args.command in ("serve", "worker", "controller", "web"):
            return _serving(args)
        if args.command == "validate-data":
            from llavakit.data.validate import run_validate

            return run_validate(args)
    except LlavakitError as exc:
        print(f"llavakit: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"llavakit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 1


def _train(argv: list[str]) -> int:
    from llavakit.errors import LlavakitError

    if any(a in ("-h", "--help") for a in argv):
        print(EXAMPLES["train"])
    try:
        from llavakit.train.run import train

        out = train(argv)
    except (LlavakitError, ValueError, OSError) as exc:  # bad flags / data / paths: one line
        print(f"llavakit: error: {exc}", file=sys.stderr)
        return 2
    print(f"llavakit: training finished; outputs in {out}")
    return 0


def _gen_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _chat(args: argparse.Namespace) -> int:
    import llavakit
    from llavakit.processing.image import ImageLimits

    for path in args.image:  # fail on a bad path before spending time loading the model
        if not path.startswith(("http://", "https://")) and not os.path.isfile(path):
            from llavakit.errors import ImageNotFound

            raise ImageNotFound(f"{path}: no such image file")
    if args.gguf:
        from llavakit.engine.gguf import load_gguf

        pipe = load_gguf(args.model, args.gguf, dtype=args.dtype, template=args.template)
    else:
        pipe = llavakit.load(
            args.model, dtype=args.dtype, device=args.device, template=args.template
        )
    if args.allow_url:
        pipe.processor.limits = ImageLimits(allow_urls=True)
    images = pipe.processor.load_images(args.image)
    gen = _gen_kwargs(args)
    if args.prompt is not None:
        _answer(pipe, images, [{"role": "user", "content": args.prompt}], args, gen)
        return 0
    return _repl(pipe, images, args, gen)


def _answer(pipe, images, messages, args, gen) -> str:
    if args.no_stream:
        text = pipe.chat(images, messages=messages, system=args.system, **gen)
        print(text, flush=True)
        return text
    pieces = []
    for piece in pipe.stream(images, messages=messages, system=args.system, **gen):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print(flush=True)
    return "".join(pieces)


def _repl(pipe, images, args, gen) -> int:
    from llavakit.errors import LlavakitError

    print("llavakit chat — /image PATH adds an image, /reset clears, /exit quits.", file=sys.stderr)
    messages: list[dict] = []
    while True:
        try:
            line = input("USER> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages, images = [], []
            continue
        if line.startswith("/image "):
            try:
                images = images + pipe.processor.load_images([line[7:].strip()])
            except LlavakitError as exc:
                print(f"llavakit: error: {exc}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        print("ASSISTANT> ", end="", flush=True)
        try:
            reply = _answer(pipe, images, messages, args, gen)
        except LlavakitError as exc:
            messages.pop()
            print(f"\nllavakit: error: {exc}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})


def _convert(args: argparse.Namespace) -> int:
    import copy
    from pathlib import Path

    import torch

    from llavakit.checkpoint import detect_format, load_checkpoint, resolve
    from llavakit.checkpoint.hf import save_hf
    from llavakit.checkpoint.io import refuse_existing
    from llavakit.pipeline import parse_dtype

    dtype = parse_dtype(args.dtype)  # a bad dtype fails before anything is loaded
    from llavakit.demo import resolve_model

    args.input = str(resolve_model(args.input))
    src = resolve(args.input).resolve()
    out = Path(args.output).resolve()
    if out == src or src in out.parents:
        raise ValueError(
            f"{args.output} is inside the input checkpoint; convert never writes into its input"
        )
    refuse_existing(out)  # before spending time on loading
    fmt = args.fmt or detect_format(src)
    model, processor = load_checkpoint(
        src, dtype=torch.float32, template=args.template, vision_tower=args.vision_tower, fmt=fmt
    )
    # The float32 source, untouched by the conversion below, to compare against.
    reference = (copy.deepcopy(model), copy.deepcopy(processor)) if args.check else None
    if fmt == "original":
        from llavakit.checkpoint.original import add_image_token

        add_image_token(model, processor)
    save_hf(model.to(dtype), processor, out)
    print(f"wrote {args.output} ({fmt} -> hf)")
    if reference is not None:
        from llavakit.checkpoint.check import compare_logits

        diff, greedy_same = compare_logits(reference[0], reference[1], out)
        print(f"check: max |logit difference| = {diff:.3e}; greedy text identical: {greedy_same}")
        if diff > 1e-3 and dtype == torch.float32:
            print("llavakit: error: converted logits differ by more than 1e-3", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
