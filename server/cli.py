"""`falcon-serve` (also `python -m server`): parse flags, pick the model, run the HTTP server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from engine.config import EngineArgs
from server.presets import PresetError, preset_arguments

logger = logging.getLogger("falcon_serve")

API_KEY_ENV = "FALCON_SERVE_API_KEY"
ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineArgs)}


class _HelpFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" only where there is a default to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    d = ENGINE_DEFAULTS
    p = argparse.ArgumentParser(
        prog="falcon-serve",
        description="OpenAI-compatible server for Falcon-H1 and FalconMamba models. Without --model it "
                    "serves a tiny random-weight demo model whose output is noise.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--config", metavar="FILE",
                   help="YAML preset: top-level keys are these options in snake_case (e.g. max_model_len), "
                        "used as defaults that explicit flags override; a 'metadata' key is ignored")

    g = p.add_argument_group("model")
    g.add_argument("--model", help="checkpoint directory or Hugging Face repo id; omitted: the built-in demo "
                                   "model (random weights, output is noise)")
    g.add_argument("--tokenizer", help="directory or repo id with tokenizer.json (default: the model's)")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    g.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="name(s) clients use in the `model` field (default: the --model value)")
    g.add_argument("--chat-template", metavar="FILE",
                   help="jinja2 chat template file overriding the tokenizer's")

    g = p.add_argument_group("engine")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default=d["device"],
                   help="where to run; auto picks cuda when available")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default=d["dtype"],
                   help="weight and activation dtype; auto uses the checkpoint's")
    g.add_argument("--max-model-len", type=int,
                   help="longest prompt + completion in tokens (default: from the model's config)")
    g.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"],
                   help="most sequences in one batch (also the number of SSM state slots)")
    g.add_argument("--max-num-batched-tokens", type=int,
                   help="token budget of one engine step; longer prompts are prefilled in chunks "
                        "(default: the engine's)")
    g.add_argument("--gpu-memory-utilization", type=float, default=d["gpu_memory_utilization"],
                   help="fraction of GPU memory for weights, activations and caches")
    g.add_argument("--kv-block-size", type=int, default=d["kv_block_size"],
                   help="tokens per paged KV-cache block")
    g.add_argument("--num-kv-blocks", type=int,
                   help="KV-cache blocks to allocate (default: planned from free memory)")
    g.add_argument("--ssm-state-dtype", choices=["float32", "bfloat16", "float16"], default=d["ssm_state_dtype"],
                   help="dtype of the SSM state cache; float32 avoids drift over long sequences")
    g.add_argument("--seed", type=int, default=d["seed"], help="random seed of the engine's sampler")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=d["enforce_eager"],
                   help="never capture CUDA graphs (slower decode, faster start)")

    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (also from ${API_KEY_ENV})")
    g.add_argument("--max-queue-len", type=int,
                   help="refuse new requests with 429 while this many wait for the engine (default: no limit)")
    g.add_argument("--shutdown-timeout", type=int, default=30,
                   help="on SIGTERM, seconds to let in-flight requests finish before cancelling them")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"], default="info",
                   help="log verbosity")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.config:
        try:
            preset = preset_arguments(args.config, parser)
        except PresetError as e:
            parser.error(str(e))
        args = parser.parse_args(preset + argv)  # explicit flags come last, so they win
    if args.max_queue_len is not None and args.max_queue_len < 1:
        parser.error("--max-queue-len must be >= 1")
    if args.shutdown_timeout < 0:
        parser.error("--shutdown-timeout must be >= 0")
    return args


def _engine_args(parser: argparse.ArgumentParser, args: argparse.Namespace, model: str) -> EngineArgs:
    chat_template = None
    if args.chat_template:
        try:
            chat_template = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as e:
            parser.error(f"cannot read --chat-template {args.chat_template}: {e.strerror or e}")
    try:
        return EngineArgs(
            model=model, tokenizer=args.tokenizer, revision=args.revision, device=args.device, dtype=args.dtype,
            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, kv_block_size=args.kv_block_size,
            num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
            ssm_state_dtype=args.ssm_state_dtype, seed=args.seed, enforce_eager=args.enforce_eager,
            chat_template=chat_template)
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Imported here so that --help stays quick.
    from engine.async_engine import AsyncEngine
    from server.app import create_app
    from server.demo import DEMO_MODEL_NAME, DEMO_NOTICE, demo_model_dir
    from server.runner import make_server
    from server.state import ServerSettings

    model, names = args.model, args.served_model_name
    if model is None:
        model, names = str(demo_model_dir()), names or [DEMO_MODEL_NAME]
        logger.warning(DEMO_NOTICE, names[0])
    engine_args = _engine_args(parser, args, model)

    def load_engine() -> AsyncEngine:  # runs in a worker thread while /health already answers 503
        return AsyncEngine.from_engine_args(engine_args)

    settings = ServerSettings(served_model_names=names or [model], model_path=model,
                              api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                              max_queue_len=args.max_queue_len)
    app = create_app(settings, load_engine)
    make_server(app, args.host, args.port, log_level=args.log_level, shutdown_timeout=args.shutdown_timeout).run()
    if app.state.server.load_error is not None:
        sys.exit(1)  # already logged with its traceback
