"""The ``epicrisis`` command line: one clear line on stderr on failure, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import NoReturn

from epicrisis import __version__
from epicrisis.errors import ConfigurationError, EpicrisisError, InputError

EXIT_USAGE = 2
EXIT_INPUT = 2
EXIT_CONFIG = 3
EXIT_INTERNAL = 70  # EX_SOFTWARE


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's C core writes its own lines to stderr (e.g. a second line for a taken port),
    # which would break the one-line contract; GRPC_VERBOSITY set by the operator wins.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    parser = _parser()
    # tgi-sim's flags are parsed by the simulator itself, so other commands never import it.
    args, extra = parser.parse_known_args(argv)
    if args.command == "tgi-sim":
        args.sim_argv = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args))
    except InputError as exc:
        return _fail(f"invalid input: {exc}", EXIT_INPUT)
    except ConfigurationError as exc:
        return _fail(f"configuration error: {exc}", EXIT_CONFIG)
    except EpicrisisError as exc:
        return _fail(f"error: {exc}", EXIT_INTERNAL)
    except BrokenPipeError:
        return 0
    except OSError as exc:  # e.g. the simulator's port is taken; strerror names no input
        return _fail(f"error: {exc.strerror or type(exc).__name__}", EXIT_CONFIG)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # last resort: a bug, reported without a traceback or input content
        return _fail(f"internal error ({type(exc).__name__}); please report it", EXIT_INTERNAL)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"epicrisis: {message}\n")
    return code


def _read_input(args: argparse.Namespace) -> bytes:
    if getattr(args, "sample", False):
        return resources.files("epicrisis.samples").joinpath("sample-stay.json").read_bytes()
    if args.file is None:
        raise InputError("no input: give a FILE, '-' for standard input, or --sample")
    if args.file == "-":
        return sys.stdin.buffer.read()
    path = Path(args.file)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise InputError(f"is a directory, not a file: {path}") from None
    except PermissionError:
        raise InputError(f"permission denied: {path}") from None


def _summarize(args: argparse.Namespace) -> int:
    from epicrisis.pipeline import load_stay, render, summarize_stay

    stay = load_stay(
        _read_input(args),
        encounter_id=args.encounter,
        strict=args.strict,
        allow_emergency=args.emergency,
    )
    if args.backend == "llm":
        from epicrisis.llm.backend import summarize_stay_llm  # imports the HTTP client stack

        summary = summarize_stay_llm(stay)
    else:
        summary = summarize_stay(stay)
    sys.stdout.write(render(summary, args.format))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, like every other failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"epicrisis: {message} (see '{self.prog} --help')\n")


def _prompt(args: argparse.Namespace) -> int:
    import orjson

    from epicrisis.pipeline import build_prompt
    from epicrisis.prompt import load_tokenizer

    result = build_prompt(
        _read_input(args),
        encounter_id=args.encounter,
        max_input_tokens=args.max_input_tokens,
        tokenizer=load_tokenizer(args.tokenizer),
        strict=args.strict,
        allow_emergency=args.emergency,
    )
    if args.json:
        sys.stdout.write(orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    for message in result.messages:
        sys.stdout.write(f"===== {message['role']} =====\n{message['content']}\n")
    counted = "exact" if result.exact else "estimated"
    omitted = "; ".join(o.text for o in result.omitted) or "nothing omitted"
    sys.stderr.write(
        f"epicrisis: {result.token_count} tokens ({counted}, {result.tokenizer}) of "
        f"{result.max_input_tokens}; {omitted}\n"
    )
    return 0


def _tgi_sim(args: argparse.Namespace) -> int:
    import asyncio

    from epicrisis.llm import simulator

    parser = _Parser(
        prog="epicrisis tgi-sim",
        description="Serve the TGI simulator: TGI's HTTP protocol with no GPU, "
        "with settable latency and faults.",
    )
    simulator.add_arguments(parser)
    try:
        config = simulator.config_from_args(parser.parse_args(args.sim_argv))
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    asyncio.run(simulator.serve(config))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from epicrisis.config import get_settings
    from epicrisis.observability.logs import configure_logging
    from epicrisis.serving.ingest import settle_heap
    from epicrisis.serving.server import run_server

    settings = get_settings()
    configure_logging("server", log_format=settings.log_format, level=settings.log_level)
    settle_heap()
    asyncio.run(run_server(settings, embedded=args.embedded))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from epicrisis.config import get_settings
    from epicrisis.serving.queue import app, worker_concurrency

    concurrency = args.concurrency or worker_concurrency(get_settings())
    # No settle_heap here: the worker reads sealed stays, not Bundles, and its Celery
    # consumer (whose reconnection to Redis is fragile upstream) runs as Celery tests it.
    app.worker_main(
        [
            "worker",
            "--queues=interactive,batch",  # interactive first: see epicrisis.serving.queue
            "--pool=threads",  # the threads hand their jobs to one event loop
            f"--concurrency={concurrency}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def _api_key(args: argparse.Namespace) -> int:
    from epicrisis.serving.auth import new_key

    key, line = new_key(args.caller, args.rights)
    sys.stdout.write(
        f"# the key, for the caller only (shown once; keep it as a secret):\n{key}\n"
        f"# the line for EPICRISIS_API_KEYS_FILE (it holds the key's hash, not the key):\n"
        f"{line}\n"
    )
    return 0


def _submit(args: argparse.Namespace) -> int:
    from epicrisis.client.bulk import run_submit

    return run_submit(args)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="epicrisis",
        description="Discharge summaries from FHIR R4 Bundles, every fact cited to its source.",
    )
    parser.add_argument("--version", action="version", version=f"epicrisis {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    summarize = commands.add_parser("summarize", help="summarize one hospital stay")
    _input_arguments(summarize)
    summarize.add_argument(
        "--format",
        choices=("json", "text", "fhir"),
        default="json",
        help="json: the API shape; text: for a terminal; fhir: a FHIR R4 document Bundle",
    )
    summarize.add_argument(
        "--backend",
        choices=("extractive", "llm"),
        default="extractive",
        help="who writes the prose: templates from the facts, or the model at EPICRISIS_LLM_URLS",
    )
    summarize.set_defaults(run=_summarize)

    prompt = commands.add_parser("prompt", help="print the Med42-v2 chat messages for one stay")
    _input_arguments(prompt)
    prompt.add_argument(
        "--max-input-tokens",
        type=int,
        metavar="N",
        help="prompt budget in tokens (default: EPICRISIS_MAX_INPUT_TOKENS, else 8192 - 2048)",
    )
    prompt.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="a tokenizer.json for exact counts (default: EPICRISIS_TOKENIZER_PATH, else an estimate)",
    )
    prompt.add_argument(
        "--json", action="store_true", help="one JSON object: messages, token count, omissions"
    )
    prompt.set_defaults(run=_prompt)

    serve = commands.add_parser(
        "serve", help="serve the gRPC API (EPICRISIS_GRPC_HOST, EPICRISIS_GRPC_PORT)"
    )
    serve.add_argument(
        "--embedded",
        action="store_true",
        help="run the jobs in this process (no Redis, no workers); else queue them to Celery",
    )
    serve.set_defaults(run=_serve)

    from epicrisis.client.bulk import add_submit_arguments, positive_int

    worker = commands.add_parser("worker", help="run a Celery worker for the queued jobs")
    worker.add_argument(
        "--concurrency",
        type=positive_int,
        metavar="N",
        help="jobs held at once (default: the LLM endpoints' in-flight limits from /info and "
        "an eighth more; without an LLM, one per CPU)",
    )
    worker.set_defaults(run=_worker)

    api_key = commands.add_parser(
        "api-key", help="make an API key for a caller, and its line for the server's keys file"
    )
    api_key.add_argument("caller", help="the caller's id, e.g. ehr-north")
    api_key.add_argument(
        "--rights",
        default="",
        metavar="R,R",
        help="a subset of submit,read,cancel (default: all)",
    )
    api_key.set_defaults(run=_api_key)

    submit = commands.add_parser(
        "submit", help="send Bundles to a server with bounded concurrency; one result per Bundle"
    )
    add_submit_arguments(submit)
    submit.set_defaults(run=_submit)

    tgi_sim = commands.add_parser(
        "tgi-sim",
        help="serve the TGI simulator (tests, development, load tests); see tgi-sim --help",
        add_help=False,
    )
    tgi_sim.set_defaults(run=_tgi_sim)
    return parser


def _input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "file", nargs="?", metavar="FILE|-", help="a FHIR R4 Bundle as JSON; - for stdin"
    )
    parser.add_argument(
        "--sample", action="store_true", help="use the sample Bundle shipped with Epicrisis"
    )
    parser.add_argument(
        "--encounter", metavar="ID", help="the Encounter to summarize (id, Type/id or fullUrl)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="refuse the Bundle if any entry is invalid"
    )
    parser.add_argument(
        "--emergency",
        action="store_true",
        help="with no inpatient stay, take the latest finished emergency visit",
    )


def entrypoint() -> None:
    """Console-script entry: exit with :func:`main`'s status."""
    sys.exit(main())
