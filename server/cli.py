"""`falcon-serve` (also `python -m server`): parse flags, pick the model, run the HTTP server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
from dataclasses import fields
from pathlib import Path

from engine.config import QUANTIZATION_METHODS, EngineArgs
from engine.lora import LoRAModulePath
from server.presets import PresetError, preset_arguments

logger = logging.getLogger("falcon_serve")

API_KEY_ENV = "FALCON_SERVE_API_KEY"
ENGINE_DEFAULTS = {f.name: f.default for f in fields(EngineArgs)}
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's spellings
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TOOL_CALL_PARSERS = ["hermes"]  # server.tool_parsers.TOOL_PARSERS (not imported: --help stays light)

# vLLM flags that change nothing here, accepted so that a vLLM command line works unchanged: (flag, takes a
# value, why it does not apply). Flags that would change the output are either implemented or refused.
VLLM_NO_OP_FLAGS = [
    ("--trust-remote-code", False, "falcon-serve runs no code from model repositories"),
    ("--disable-log-requests", False, "requests are not logged"),
    ("--enable-log-requests", False, "requests are not logged"),
    ("--disable-log-stats", False, "statistics are in /metrics"),
    ("--disable-uvicorn-access-log", False, "the access log follows --log-level"),
    ("--enable-chunked-prefill", False, "chunked prefill is always on"),
    ("--disable-frontend-multiprocessing", False, "the front end runs in the server process"),
    ("--disable-custom-all-reduce", False, "there is one GPU per server"),
    ("--swap-space", True, "preempted sequences are recomputed, never swapped"),
    ("--max-seq-len-to-capture", True, "CUDA graphs cover every decode length"),
    ("--tokenizer-mode", True, "the tokenizer is always tokenizer.json"),
    ("--max-log-len", True, "requests are not logged"),
]


class _HelpFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" only where there is a default to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def lora_module(value: str) -> LoRAModulePath:
    """--lora-modules item: name=path, or vLLM's JSON form with name, path and optional base_model_name."""
    if value.lstrip().startswith("{"):
        try:
            raw = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {value}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("path"), str) \
                or set(raw) - {"name", "path", "base_model_name"}:
            raise argparse.ArgumentTypeError(f'expected {{"name": ..., "path": ..., "base_model_name": ...}}: {value}')
        return LoRAModulePath(raw["name"], raw["path"], raw.get("base_model_name"))
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=path: {value}")
    return LoRAModulePath(name, path)


def build_parser() -> argparse.ArgumentParser:
    d = ENGINE_DEFAULTS
    p = argparse.ArgumentParser(
        prog="falcon-serve",
        description="OpenAI-compatible server for Falcon-H1 and FalconMamba models. Without a model it "
                    "serves a tiny random-weight demo model whose output is noise.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # --max-model would silently mean --max-model-len
    )
    p.add_argument("model_tag", nargs="?", metavar="MODEL",
                   help="checkpoint directory or Hugging Face repo id, as in `vllm serve MODEL` (same as --model)")
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
    g.add_argument("--download-dir", metavar="DIR",
                   help="where hub checkpoints are downloaded and looked up (default: the Hugging Face cache)")
    g.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default="auto",
                   help="auto/safetensors: the checkpoint's weights; dummy: random weights of the same shapes")

    g = p.add_argument_group("engine")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default=d["device"],
                   help="where to run; auto picks cuda when available")
    g.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "half", "float32", "float"], default=d["dtype"],
                   help="weight and activation dtype; auto uses the checkpoint's (half = float16, float = float32)")
    g.add_argument("--quantization", "-q", choices=list(QUANTIZATION_METHODS),
                   help="gptq / awq / compressed-tensors: check that --model is such a checkpoint (quantized "
                        "checkpoints load as such without this flag); fp8: quantize a 16-bit checkpoint's "
                        "projections to float8_e4m3 at load (default: as the checkpoint is)")
    g.add_argument("--max-model-len", type=int,
                   help="longest prompt + completion in tokens (default: from the model's config)")
    g.add_argument("--max-num-seqs", type=int, default=d["max_num_seqs"],
                   help="most sequences in one batch (also the number of SSM state slots)")
    g.add_argument("--max-num-batched-tokens", type=int,
                   help="token budget of one engine step; longer prompts are prefilled in chunks "
                        "(default: the engine's)")
    g.add_argument("--gpu-memory-utilization", type=float, default=d["gpu_memory_utilization"],
                   help="fraction of GPU memory for weights, activations and caches")
    g.add_argument("--kv-block-size", "--block-size", type=int, default=d["kv_block_size"],
                   help="tokens per paged KV-cache block")
    g.add_argument("--num-kv-blocks", type=int,
                   help="KV-cache blocks to allocate (default: planned from free memory)")
    g.add_argument("--ssm-state-dtype", choices=["float32", "bfloat16", "float16"], default=d["ssm_state_dtype"],
                   help="dtype of the SSM state cache; float32 avoids drift over long sequences")
    g.add_argument("--seed", type=int, default=d["seed"], help="random seed of the engine's sampler")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=d["tensor_parallel_size"], metavar="N",
                   help="split the model over N GPUs of this host (N processes: this one serves HTTP and schedules, "
                        "N-1 workers; on CPU, N processes)")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=d["enforce_eager"],
                   help="never capture CUDA graphs (slower decode and short prefills, faster start)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=d["async_scheduling"],
                   help="launch each decode step before the previous step's tokens reach the host, so the host's "
                        "per-step work overlaps the GPU's (single GPU; --no-async-scheduling: step by step)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=d["enable_prefix_caching"],
                   help="reuse the KV blocks and SSM-state checkpoints of earlier prompts that share a prefix")
    g.add_argument("--prefix-cache-checkpoints", type=int, metavar="N",
                   help="SSM-state checkpoints the prefix cache keeps (default: 10%% of the cache memory on a GPU, "
                        "max-num-seqs on CPU)")

    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=d["enable_lora"],
                   help="serve PEFT LoRA adapters; a request picks one by `model`")
    g.add_argument("--lora-modules", nargs="+", type=lora_module, metavar="NAME=PATH",
                   help="adapters to serve from start-up: name=path (a PEFT adapter directory or hub repo id), or "
                        'JSON \'{"name": ..., "path": ..., "base_model_name": ...}\'')
    g.add_argument("--max-loras", type=int, default=d["max_loras"],
                   help="adapters resident on the device at once; a batch mixes up to this many")
    g.add_argument("--max-lora-rank", type=int, default=d["max_lora_rank"],
                   help="the largest adapter rank served (sizes the device stacks)")
    g.add_argument("--max-cpu-loras", type=int, help="adapters kept in host memory (default: --max-loras)")
    g.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also on with "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")

    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health, /version, /metrics, the "
                        f"API docs and the playground page (also from ${API_KEY_ENV})")
    g.add_argument("--max-queue-len", type=int,
                   help="most sequences (prompts x n) waiting for the engine; beyond it new requests get 429 "
                        "(default: no limit)")
    g.add_argument("--max-request-body-bytes", type=int, default=16 * 2**20,
                   help="larger request bodies are refused with 413 before they are read")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="allow clients to send their own chat template (it is code that runs on the server)")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers before it is closed")
    g.add_argument("--disable-playground", action="store_true",
                   help="do not serve the chat page at / and /playground")
    g.add_argument("--shutdown-timeout", type=int, default=30,
                   help="on SIGTERM, seconds to let in-flight requests finish before cancelling them")
    g.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS,
                   help="the format the model writes tool calls in; needed for tool_choice 'auto' "
                        "(the demo model: hermes)")
    g.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                   help="let the model decide whether to call tools (tool_choice 'auto', the default with tools); "
                        "needs --tool-call-parser (the demo model: on)")
    g.add_argument("--log-level", "--uvicorn-log-level", choices=["debug", "info", "warning", "error", "critical"],
                   default="info", help="log verbosity")

    g = p.add_argument_group("accepted for vLLM compatibility (no effect here)")
    for flag, takes_value, why in VLLM_NO_OP_FLAGS:
        g.add_argument(flag, help=why, **({"metavar": "VALUE"} if takes_value else {"action": "store_true"}))
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="only 1 is supported")
    g.add_argument("--kv-cache-dtype", default="auto", help="only auto (the model's dtype) is supported")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.config:
        try:
            preset = preset_arguments(args.config, parser)
        except PresetError as e:
            parser.error(str(e))
        args = parser.parse_args(preset + argv)  # explicit flags come last, so they win
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            parser.error(f"the model is given twice, as {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    args.dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    if args.enable_auto_tool_choice and (args.model or args.model_tag) and args.tool_call_parser is None:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser")
    if args.lora_modules and not args.enable_lora:
        parser.error("--lora-modules needs --enable-lora")
    names = [m.name for m in args.lora_modules or []]
    clash = set(names) & set(args.served_model_name or [args.model]) or {n for n in names if names.count(n) > 1}
    if clash:
        parser.error(f"--lora-modules names must be unique and differ from the served model's: {sorted(clash)}")
    if args.max_queue_len is not None and args.max_queue_len < 1:
        parser.error("--max-queue-len must be >= 1")
    if args.shutdown_timeout < 0:
        parser.error("--shutdown-timeout must be >= 0")
    if args.max_request_body_bytes < 1 or args.header_timeout <= 0:
        parser.error("--max-request-body-bytes and --header-timeout must be positive")
    if args.tensor_parallel_size < 1:
        parser.error("--tensor-parallel-size must be >= 1")
    for flag, value, supported in (("--pipeline-parallel-size", args.pipeline_parallel_size, 1),
                                   ("--kv-cache-dtype", args.kv_cache_dtype, "auto")):
        if value != supported:
            parser.error(f"{flag} {value} is not supported (only {supported})")
    return args


def _vllm_notices(args: argparse.Namespace) -> None:
    for flag, _, why in VLLM_NO_OP_FLAGS:
        if getattr(args, flag[2:].replace("-", "_")) not in (None, False):
            logger.info("%s has no effect: %s", flag, why)


def _check_environment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> socket.socket:
    """Fails fast, before loading anything, on what would fail later; returns the bound listening socket."""
    model = args.model
    looks_like_path = model is not None and (model.startswith((".", "/", "~")) or not HUB_ID.match(model))
    if looks_like_path and not Path(model).exists():
        parser.error(f"model {model!r} is neither a directory nor a Hugging Face repo id (organisation/name)")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device} was asked for but no CUDA device is available (use --device cpu)")
        if torch.cuda.device_count() < args.tensor_parallel_size:
            parser.error(f"--tensor-parallel-size {args.tensor_parallel_size} needs as many GPUs; "
                         f"{torch.cuda.device_count()} are visible")
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        parser.error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    return sock


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
            chat_template=chat_template, quantization=args.quantization,
            enable_prefix_caching=args.enable_prefix_caching, prefix_cache_checkpoints=args.prefix_cache_checkpoints,
            load_format="dummy" if args.load_format == "dummy" else "auto", enable_lora=args.enable_lora,
            max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
            lora_modules=args.lora_modules,
            tensor_parallel_size=args.tensor_parallel_size, async_scheduling=args.async_scheduling)
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = _check_environment(parser, args)
    _vllm_notices(args)
    if args.download_dir:
        os.environ["HF_HUB_CACHE"] = str(Path(args.download_dir).expanduser())  # read by huggingface_hub
    # Imported here so that --help stays quick.
    from engine.async_engine import AsyncEngine
    from server.app import create_app
    from server.demo import DEMO_MODEL_NAME, DEMO_NOTICE, demo_model_dir
    from server.lora_routes import runtime_updating_from_env
    from server.runner import make_server
    from server.state import ServerSettings

    model, names = args.model, args.served_model_name
    tool_call_parser, auto_tool_choice = args.tool_call_parser, bool(args.enable_auto_tool_choice)
    if model is None:
        model, names = str(demo_model_dir()), names or [DEMO_MODEL_NAME]
        logger.warning(DEMO_NOTICE, names[0])
        tool_call_parser, auto_tool_choice = tool_call_parser or "hermes", True  # its template writes Hermes calls
    engine_args = _engine_args(parser, args, model)

    def load_engine() -> AsyncEngine:  # runs in a worker thread while /health already answers 503
        return AsyncEngine.from_engine_args(engine_args)

    settings = ServerSettings(served_model_names=names or [model], model_path=model,
                              api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                              max_queue_len=args.max_queue_len, max_request_body_bytes=args.max_request_body_bytes,
                              trust_request_chat_template=args.trust_request_chat_template,
                              tool_call_parser=tool_call_parser, enable_auto_tool_choice=auto_tool_choice,
                              playground=not args.disable_playground,
                              runtime_lora_updating=args.allow_runtime_lora_updating or runtime_updating_from_env())
    app = create_app(settings, load_engine)
    server = make_server(app, args.host, args.port, log_level=args.log_level, shutdown_timeout=args.shutdown_timeout,
                         header_timeout=args.header_timeout)
    server.run(sockets=[sock])
    if app.state.server.load_error is not None:
        sys.exit(1)  # already logged with its traceback
