"""`python -m paged_jax.server.serve [MODEL] --host H --port P` (and `paged-jax serve`): the
OpenAI-compatible server, as `vllm serve` runs it.

Every EngineArgs field is a flag spelled as vLLM spells it (`block_size` -> `--block-size`,
booleans as `--enable-prefix-caching` / `--no-enable-prefix-caching`), made from the
dataclass itself so a new engine setting is a new flag without touching this file. MODEL
defaults to the embedded `models/stdlib-llama`; a Hugging Face Hub id is downloaded (or found
in the cache) once, before anything loads, and the API names the model as given, as vLLM's
served model name does. The server listens on 127.0.0.1 unless told otherwise (`--host
0.0.0.0` is a decision, not a default) and prints its URL once it accepts connections;
`--port 0` takes a free port and prints which.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import uvicorn

from paged_jax.engine import multihost
from paged_jax.engine.async_llm_engine import AsyncLLMEngine
from paged_jax.engine.data_parallel import make_engine
from paged_jax.engine_args import BATCHING, MEMORY_MANAGERS, PREEMPTION_MODES, EngineArgs
from paged_jax.model import hub
from paged_jax.server.app import DEFAULT_MAX_BODY_BYTES, ServerConfig, build_app
from paged_jax.server.chat_template import load_chat_template
from paged_jax.server.metrics import ServingMetrics

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "stdlib-llama"
API_KEY_ENV = "PAGED_JAX_API_KEY"
CHOICES = {"preemption_mode": PREEMPTION_MODES, "memory_manager": MEMORY_MANAGERS, "batching": BATCHING}
TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict": json.loads}  # a dict is given as JSON

logger = logging.getLogger("paged_jax.server.serve")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paged-jax serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", nargs="?", default=None,
                        help="Hugging Face checkpoint directory, or Hub id (org/name: see --revision, "
                             f"--download-dir); none: the embedded {DEFAULT_MODEL.name}")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    server.add_argument("--served-model-name", nargs="+", default=None,
                        help="the model's name(s) in the API; none: MODEL as given, or stdlib-llama")
    server.add_argument("--chat-template", default=None,
                        help="a jinja2 chat template, or a file holding one; none: the checkpoint's")
    server.add_argument("--api-key", default=None,  # not the environment's: --help would print the key
                        help=f"require 'Authorization: Bearer KEY' on /v1; none: ${API_KEY_ENV} if set")
    server.add_argument("--max-body-size", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body in bytes; larger ones get 413 unread")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_engine_args(parser.add_argument_group("engine (EngineArgs)"))
    hosts = parser.add_argument_group("several hosts (jax.distributed): every process runs this command; "
                                      "process 0 serves HTTP, the others follow")
    hosts.add_argument("--coordinator-address", default=None, help="process 0's HOST:PORT for jax.distributed")
    hosts.add_argument("--num-processes", type=int, default=1)
    hosts.add_argument("--process-id", type=int, default=0)
    return parser


def add_engine_args(group) -> None:
    """One flag per EngineArgs field but `model`, from the dataclass's own types and defaults."""
    for f in dataclasses.fields(EngineArgs):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = TYPES[str(f.type).replace(" ", "").replace("|None", "")]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=f"EngineArgs.{f.name}")
        else:
            group.add_argument(flag, type=kind, default=f.default, choices=CHOICES.get(f.name),
                               metavar=None if f.name in CHOICES else f.name.upper(), help=f"EngineArgs.{f.name}")


def engine_args(args: argparse.Namespace, model: str) -> EngineArgs:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs) if f.name != "model"}
    return EngineArgs(model=model, **values)


class _Server(uvicorn.Server):
    """uvicorn that says where it listens once the socket is bound."""

    def __init__(self, config: uvicorn.Config, model_name: str):
        super().__init__(config)
        self.model_name = model_name

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"paged-jax: serving {self.model_name} at http://{host}:{port}/v1 "
                  f"(health: http://{host}:{port}/health, metrics: http://{host}:{port}/metrics)", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = args.model or str(DEFAULT_MODEL)
    names = tuple(args.served_model_name or [args.model or DEFAULT_MODEL.name])
    try:
        settings = engine_args(args, model)
        settings.validate()
        settings = hub.resolve(settings)  # before the chat template is read; make_engine finds local paths
        chat_template = load_chat_template(settings.tokenizer or settings.model, args.chat_template)
    except (ValueError, OSError) as error:
        print(f"paged-jax serve: {error}", file=sys.stderr)
        return 2
    if args.coordinator_address:
        multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
    logger.info("loading %s and compiling its steps", model)
    engine = make_engine(settings)
    if args.coordinator_address:
        if args.process_id != 0:
            print(f"paged-jax: process {args.process_id} follows process 0", flush=True)
            try:
                multihost.follow(engine)
            except RuntimeError as error:
                print(f"paged-jax serve: {error}", file=sys.stderr, flush=True)
                return 1
            return 0
        engine = multihost.Leader(engine)
    metrics = ServingMetrics(names[0], lambda: async_engine.latest_load)  # scraped only once the app runs
    async_engine = AsyncLLMEngine(engine, on_output=metrics.on_output, on_finish_early=metrics.on_finish_early)
    config = ServerConfig(served_model_names=names, model_path=model,
                          api_key=args.api_key or os.environ.get(API_KEY_ENV),
                          max_body_bytes=args.max_body_size)
    app = build_app(async_engine, config, metrics, chat_template)
    access_log = args.uvicorn_log_level in ("debug", "trace")
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                    timeout_graceful_shutdown=5, access_log=access_log), names[0])
    try:
        server.run()
    finally:
        async_engine.shutdown()
        if args.coordinator_address:
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
