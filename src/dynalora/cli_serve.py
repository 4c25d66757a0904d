"""``dynalora serve``: the engine behind an OpenAI-compatible HTTP API (:mod:`dynalora.serve.app`); ``dynalora
handoff``: a blend's or a session's LoRA handed to a vLLM server (:mod:`dynalora.serve.handoff`)."""

from __future__ import annotations

from pathlib import Path

from dynalora.cli_adapters import add_model_arguments, load_model_and_bank, parse_blend
from dynalora.cli_config import ConfigFlags
from dynalora.serve.handoff import VLLM_DEFAULT_MAX_LORA_RANK


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from dynalora.serve.app import create_app
    except ImportError as error:
        raise RuntimeError(f"dynalora serve needs the web extras ({error.name} is missing): "
                           "pip install 'dynalora[serve]'") from None
    from dynalora.system.assemble import System

    spec, config = args.engine_flags.build(args), args.serve_flags.build(args)
    system = System.from_checkpoints(spec)
    system.merge_trigger_lora()
    app = create_app(system.engine(), config, system.base.name)
    print(f"dynalora serve: {system.base.name} with {len(system.bank)} adapters {system.bank.labels} on "
          f"http://{config.host}:{config.port}/v1 (OpenAI-compatible; Ctrl-C stops)")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    return 0


def add_serve_command(commands) -> None:
    from dynalora.serve.config import ServeConfig
    from dynalora.system.spec import FLAG_ALIASES, EngineSpec

    p = commands.add_parser("serve", help="an OpenAI-compatible server: each request its own LoRA, LoRA events in "
                                          "the responses", description=__doc__)
    engine = ConfigFlags(p, EngineSpec, aliases=FLAG_ALIASES)
    serve = ConfigFlags(p, ServeConfig, config_file=False)
    p.set_defaults(handler=cmd_serve, engine_flags=engine, serve_flags=serve)


def cmd_handoff(args) -> int:
    from dynalora.lora import DynamicLoraModel
    from dynalora.models import dynalora_home
    from dynalora.serve.handoff import export_for_vllm, register_with_vllm

    if (args.blend is None) == (args.session is None):
        raise ValueError("give one of --blend LABEL=WEIGHT,... or --session ID")
    base, bank, _ = load_model_and_bank(args, require_bank=args.blend is not None)
    dyn = DynamicLoraModel.attach(base.model, bank)
    if args.blend is not None:
        dyn.state.set_blend_by_label(0, parse_blend(args.blend, bank.labels))
    else:
        from dynalora.runtime.session import STATE_FILE
        from dynalora.serve.schema import ServeError
        from dynalora.serve.sessions import SessionStore

        sessions_dir = args.sessions_dir or dynalora_home() / "sessions"
        try:
            folder = SessionStore(sessions_dir).folder(args.session)
        except ServeError as error:
            raise ValueError(f"{sessions_dir}: {error.message}") from None
        dyn.state.load(folder / STATE_FILE, row=0)
    out = args.out or dynalora_home() / "handoff" / args.name
    report = export_for_vllm(dyn, 0, out, args.rank, args.max_lora_rank)
    kind = "exact" if report.exact else f"SVD rank {report.rank}, relative error {report.relative_error:.2e}"
    print(f"exported to {out}: rank {report.rank}, {kind}")
    if args.vllm:
        answer = register_with_vllm(args.vllm, args.name, out, args.api_key)
        print(f"registered {args.name!r} with {args.vllm}: {answer}")
    return 0


def add_handoff_command(commands) -> None:
    p = commands.add_parser("handoff", help="hand a blend's or a session's LoRA to a vLLM server (a PEFT folder at a "
                                            "rank it accepts, loaded through its runtime LoRA API)")
    p.add_argument("--blend", default=None, help="LABEL=WEIGHT,... (e.g. news=0.7,scripture=0.3)")
    p.add_argument("--session", default=None, help="a dynalora serve session id: its LoRA as its last turn left it")
    p.add_argument("--sessions-dir", type=Path, default=None, help="the server's --sessions-dir "
                                                                   "(default: $DYNALORA_HOME/sessions)")
    p.add_argument("--name", required=True, help="the adapter's name on vLLM (requests then ask for this model); "
                                                  "handing off again under it replaces it in place")
    p.add_argument("--vllm", default=None, metavar="URL", help="the vLLM server (e.g. http://127.0.0.1:8001); "
                                                               "without it the folder is only written")
    p.add_argument("--api-key", default=None, help="vLLM's --api-key, if it has one")
    p.add_argument("--rank", type=int, default=None, help="compress to this rank by SVD (default: exact if it fits "
                                                          "--max-lora-rank, else that rank)")
    p.add_argument("--max-lora-rank", type=int, default=VLLM_DEFAULT_MAX_LORA_RANK,
                   help="the vLLM server's --max-lora-rank (default: vLLM's, %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="where the PEFT folder goes "
                                                          "(default: $DYNALORA_HOME/handoff/NAME)")
    add_model_arguments(p)
    p.set_defaults(handler=cmd_handoff)
