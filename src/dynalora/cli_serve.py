"""``dynalora serve``: the engine behind an OpenAI-compatible HTTP API (:mod:`dynalora.serve.app`)."""

from __future__ import annotations

from dynalora.cli_config import ConfigFlags


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
